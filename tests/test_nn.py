"""Layers are thin over the ops and drop in for what users already have."""
import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.nn import NormConcat


@pytest.mark.parametrize("lead", [(4,), (2, 3)])
def test_norm_concat_equals_layernorms_then_cat(lead):
    dims = [6, 11, 3]
    layer = NormConcat(dims)
    lns = nn.ModuleList([nn.LayerNorm(d) for d in dims])
    for ln in lns:  # non-trivial parameters
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
    layer.norms.load_state_dict(lns.state_dict())  # the documented one-to-one mapping
    xs = [torch.randn(*lead, d) for d in dims]
    torch.testing.assert_close(layer(xs), torch.cat([ln(x) for ln, x in zip(lns, xs)], -1))
    assert set(layer.state_dict()) == {f"norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")}


def test_rmsnorm_layer_maps_onto_nn_rmsnorm():
    dims = [5, 8]
    layer = NormConcat(dims, norm="rmsnorm", eps=1e-6)
    rms = nn.ModuleList([nn.RMSNorm(d, eps=1e-6) for d in dims])
    for r in rms:
        nn.init.normal_(r.weight)
    layer.norms.load_state_dict(rms.state_dict())
    xs = [torch.randn(3, d) for d in dims]
    torch.testing.assert_close(layer(xs), torch.cat([r(x) for r, x in zip(rms, xs)], -1))


def test_without_affine_has_no_parameters():
    layer = NormConcat([4, 4], elementwise_affine=False)
    assert not list(layer.parameters())
    xs = [torch.randn(2, 4), torch.randn(2, 4)]
    torch.testing.assert_close(layer(xs), torch.cat([nn.functional.layer_norm(x, (4,)) for x in xs], -1))


def test_layer_gradients_reach_parameters():
    layer = NormConcat([7, 9])
    layer([torch.randn(5, 7), torch.randn(5, 9)]).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@pytest.mark.parametrize("dims,err", [([], r"dims: expected a non-empty list"), ([3, 0], r"dims: expected")])
def test_bad_construction(dims, err):
    with pytest.raises(ValueError, match=err):
        NormConcat(dims)


def test_bad_call():
    layer = NormConcat([3, 4])
    with pytest.raises(ValueError, match=r"xs: expected a list of 2 tensors"):
        layer([torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"xs\[1\]: expected last dim 4"):
        layer([torch.randn(2, 3), torch.randn(2, 5)])
    with pytest.raises(ValueError, match=r"norm: expected one of"):
        NormConcat([3], norm="group")


def test_attention_pool_layer_is_learned_query_attention():
    from mmkernels.nn import AttentionPool
    layer = AttentionPool(12, 3)
    x, ln = torch.randn(4, 7, 12), torch.tensor([7, 3, 1, 5])
    assert layer(x, ln).shape == (4, 12)
    mha_q = layer.query.detach()[0]                                # [H, Dh]
    want = mmkernels.attention_pool(x, mha_q, ln)
    torch.testing.assert_close(layer(x, ln), want)
    assert set(layer.state_dict()) == {"query"}
    multi = AttentionPool(12, 3, num_queries=4, key_proj=True)
    assert multi(x, ln).shape == (4, 4, 12)
    assert set(multi.state_dict()) == {"query", "key_proj.weight", "key_proj.bias"}
    want = mmkernels.attention_pool(x, multi.query, ln, key=multi.key_proj(x))
    torch.testing.assert_close(multi(x, ln), want)


def test_attention_pool_layer_packed_equals_padded():
    from mmkernels.nn import AttentionPool
    layer = AttentionPool(8, 2, num_queries=2)
    x, ln = torch.randn(3, 5, 8), torch.tensor([5, 2, 4])
    valid = torch.arange(5)[None] < ln[:, None]
    cu = torch.tensor([0, 5, 7, 11], dtype=torch.int32)
    torch.testing.assert_close(layer(x[valid], cu_seqlens=cu), layer(x, ln))
    with pytest.raises(ValueError, match="lengths: give either"):
        layer(x[valid], ln, cu_seqlens=cu)


def test_cross_modal_attention_pool_projects_the_context():
    from mmkernels.nn import CrossModalAttentionPool
    layer = CrossModalAttentionPool(6, 8, 2)
    x, text = torch.randn(3, 5, 8), torch.randn(3, 6)
    out = layer(x, text)
    q = layer.query_proj(text).view(3, 1, 2, 4)
    torch.testing.assert_close(out, mmkernels.attention_pool(x, q)[:, 0])
    assert layer(x, torch.randn(3, 4, 6)).shape == (3, 4, 8)
    with pytest.raises(ValueError, match=r"context: expected \[B, 6\]"):
        layer(x, torch.randn(3, 5))


@pytest.mark.parametrize("args,match", [((10, 3), "num_heads: expected a positive divisor of dim=10"),
                                        ((0, 1), "dim: expected a positive int")])
def test_attention_pool_layer_bad_config(args, match):
    from mmkernels.nn import AttentionPool
    with pytest.raises(ValueError, match=match):
        AttentionPool(*args)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_concat_linear_loads_the_state_dict_of_the_linear_after_cat(activation):
    from mmkernels.nn import ConcatLinear
    dims = [6, 11, 3]
    linear = nn.Linear(sum(dims), 7)
    layer = ConcatLinear(dims, 7, activation=activation)
    layer.load_state_dict(linear.state_dict())              # unchanged, both ways
    linear.load_state_dict(layer.state_dict())
    xs = [torch.randn(2, 4, d) for d in dims]
    z = linear(torch.cat(xs, -1))
    torch.testing.assert_close(layer(xs), z if activation is None else torch.nn.functional.gelu(z))
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert ConcatLinear(dims, 7, bias=False).bias is None


def test_concat_linear_layer_initialises_like_linear():
    from mmkernels.nn import ConcatLinear
    torch.manual_seed(3)
    a = ConcatLinear([10, 22], 5)
    torch.manual_seed(3)
    b = nn.Linear(32, 5)
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)


@pytest.mark.parametrize("kwargs,match", [(dict(dims=[], out_features=3), "dims: expected a non-empty list"),
                                          (dict(dims=[3], out_features=0), "out_features: expected a positive int"),
                                          (dict(dims=[3], out_features=2, activation="elu"), "activation: expected one of")])
def test_concat_linear_layer_bad_config(kwargs, match):
    from mmkernels.nn import ConcatLinear
    with pytest.raises(ValueError, match=match):
        ConcatLinear(**kwargs)
