"""The reference backends' backward (what the registered op runs on CPU tensors, e.g. under
``torch.compile``) uses explicit formulas, not ``torch.func.vjp``: each must give what autograd gives
through the op's specification, for every activation, norm, gate kind, mask, partial affine
parameters and dtype."""
import pytest
import torch

from mmkernels.ops.concat_linear import reference as cl
from mmkernels.ops.gated_sum import reference as gs
from mmkernels.ops.norm_concat import reference as nc

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-4),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def autograd_of(f, inputs, dy):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = f(*leaves)
    return torch.autograd.grad(out, leaves, dy, allow_unused=True)


def close(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype], msg=what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_norm_concat_reference_backward_is_autograd_of_the_spec(dtype, rms):
    torch.manual_seed(0)
    dims = (5, 3, 8)
    xs = [torch.randn(2, 3, d, dtype=dtype) for d in dims]
    weights = [torch.randn(5, dtype=dtype), None, torch.randn(8, dtype=dtype)]     # partial affine
    biases = [None, None, torch.randn(8, dtype=dtype)] if not rms else [None, None, None]
    dy = torch.randn(2, 3, sum(dims), dtype=dtype)
    params = [t for t in weights + biases if t is not None]

    def spec(*ts):
        it = iter(ts[3:])
        ws = [None if w is None else next(it) for w in weights]
        bs = [None if b is None else next(it) for b in biases]
        return nc.norm_concat_ref(list(ts[:3]), ws, bs, rms, 1e-5)
    want = autograd_of(spec, xs + params, dy)
    dxs, dws, dbs = nc.backward(dy, xs, weights, biases, rms, 1e-5)
    got = dxs + [t for t in dws + dbs if t is not None]
    assert [t is None for t in dws] == [w is None for w in weights]
    assert [t is None for t in dbs] == [b is None for b in biases]
    for i, (g, w) in enumerate(zip(got, want)):
        close(g, w, dtype, f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False])
def test_concat_linear_reference_backward_is_autograd_of_the_spec(dtype, act, bias):
    torch.manual_seed(1)
    xs = [torch.randn(3, 4, d, dtype=dtype) for d in (5, 2, 7)]
    w = torch.randn(6, 14, dtype=dtype)
    b = torch.randn(6, dtype=dtype) if bias else None
    dy = torch.randn(3, 4, 6, dtype=dtype)
    inputs = xs + [w] + ([b] if bias else [])
    want = autograd_of(lambda *ts: cl.concat_linear_ref(list(ts[:3]), ts[3], ts[4] if bias else None, act),
                       inputs, dy)
    out, z = cl.forward(xs, w, b, act)
    dxs, dw, db = cl.backward(dy, xs, w, b, out, z, act)
    assert (db is None) == (not bias)
    for i, (g, r) in enumerate(zip(dxs + [dw] + ([db] if bias else []), want)):
        close(g, r, dtype, f"gradient {i}")


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
@pytest.mark.parametrize("act", ["gelu", "tanh", None])
def test_concat_linear_reference_backward_of_an_empty_batch(lead, act):
    xs = [torch.randn(*lead, d) for d in (3, 4)]
    w, b = torch.randn(5, 7), torch.randn(5)
    out, z = cl.forward(xs, w, b, act)
    dxs, dw, db = cl.backward(torch.randn(*lead, 5), xs, w, b, out, z, act)
    assert [tuple(d.shape) for d in dxs] == [(*lead, 3), (*lead, 4)]
    assert (dw == 0).all() and dw.shape == (5, 7) and (db == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("feature", [True, False], ids=["feature", "modality"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_gated_sum_reference_backward_is_autograd_of_the_spec(dtype, feature, masked):
    torch.manual_seed(2)
    h = torch.randn(4, 3, 3, 6, dtype=dtype)
    z = torch.randn(*((4, 3, 3, 6) if feature else (4, 3, 3)), dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(4, 3, 3) > 0.4
        mask[0, 0] = False                      # a row with nothing present
    dy = torch.randn(4, 3, 6, dtype=dtype)
    ct = torch.float64 if dtype == torch.float64 else torch.float32     # the backend computes in fp32
    want = autograd_of(lambda a, c: gs.gated_sum_ref(a, c, mask), [h.to(ct), z.to(ct)], dy.to(ct))
    dh, dz = gs.backward(dy, h, z, mask)
    close(dh, want[0].to(dtype), dtype, "dh_pre")
    close(dz, want[1].to(dtype), dtype, "dz")


def test_gated_sum_reference_backward_is_zero_where_absent_even_for_infinite_dy():
    h, z = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    h[~mask] = float("nan")
    z[~mask] = float("nan")
    dy = torch.full((2, 4), float("inf"))
    dh, dz = gs.backward(dy, h, z, mask)
    assert (dh[~mask] == 0).all() and (dz[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_fusion_projections_reference_backward_is_autograd_of_the_spec(dtype, bias):
    from mmkernels.ops.gated_fusion import reference as gf
    torch.manual_seed(3)
    dims, h = (5, 3, 8), 6
    xs = [torch.randn(2, 3, d, dtype=dtype) for d in dims]
    ws = [torch.randn(h, d, dtype=dtype) for d in dims]
    bs = [torch.randn(h, dtype=dtype) for _ in dims] if bias else []
    gw = torch.randn(h, sum(dims), dtype=dtype)
    gb = torch.randn(h, dtype=dtype) if bias else None
    dh = torch.randn(2, 3, 3, h, dtype=dtype)
    dz = torch.randn(2, 3, h, dtype=dtype)
    inputs = xs + ws + bs + [gw] + ([gb] if bias else [])

    def spec(*ts):
        return gf.fusion_projections_ref(ts[:3], ts[3:6], ts[6:6 + len(bs)], ts[6 + len(bs)],
                                         ts[7 + len(bs)] if bias else None)
    leaves = [t.detach().requires_grad_() for t in inputs]
    hh, zz = spec(*leaves)
    want = torch.autograd.grad((hh, zz), leaves, (dh, dz))
    dxs, dws, dbs, dgw, dgb = gf.backward(dh, dz, xs, ws, bs, gw, gb)
    assert (dgb is None) == (not bias) and len(dbs) == len(bs)
    for i, (g, r) in enumerate(zip(dxs + dws + dbs + [dgw] + ([dgb] if bias else []), want)):
        close(g, r, dtype, f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_key", [False, True], ids=["keys-are-x", "key"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared-query", "per-sample-query"])
@pytest.mark.parametrize("lengths", [None, [5, 0, 2, 7]], ids=["full", "ragged"])
def test_attention_pool_reference_backward_is_autograd_of_the_spec(dtype, with_key, per_sample, lengths):
    from mmkernels.ops.attention_pool import reference as ap
    torch.manual_seed(4)
    B, L, H, Dh, Q = 4, 7, 2, 3, 2
    x = torch.randn(B, L, H * Dh, dtype=dtype)
    key = torch.randn(B, L, H * Dh, dtype=dtype) if with_key else None
    query = torch.randn(B if per_sample else 1, Q, H, Dh, dtype=dtype)
    lens = None if lengths is None else torch.tensor(lengths)
    if lens is not None:                                 # padding holds NaN: it must reach nothing
        pad = torch.arange(L)[None, :] >= lens[:, None]
        x[pad] = float("nan")
        if key is not None:
            key[pad] = float("nan")
    dy = torch.randn(B, Q, H * Dh, dtype=dtype)
    scale = 0.7
    inputs = [x, query] + ([key] if with_key else [])
    want = autograd_of(lambda x_, q_, *k_: ap.attention_pool_ref(x_, q_, lens, k_[0] if k_ else None, scale)[0],
                       inputs, dy)
    out, lse = ap.forward(x, key, query, lens, None, -1, scale)
    dx, dkey, dq = ap.backward(dy, x, key, query, lens, None, out, lse, -1, scale)
    assert (dkey is None) == (not with_key)
    for name, g, r in [("dx", dx, want[0]), ("dquery", dq, want[1])] + ([("dkey", dkey, want[2])] if with_key else []):
        assert torch.isfinite(g).all(), name
        close(g, r, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("weighted", [True, False], ids=["rank-weights", "no-rank-weights"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dims", [(5, 3, 8), (4,), (2, 6)], ids=str)
def test_low_rank_fusion_reference_backward_is_autograd_of_the_spec(dtype, weighted, bias, dims):
    from mmkernels.ops.low_rank_fusion import reference as lmf
    torch.manual_seed(5)
    r, h = 3, 6
    xs = [torch.randn(2, 3, d, dtype=dtype) for d in dims]
    fs = [torch.randn(r, d + 1, h, dtype=dtype) for d in dims]
    w = torch.randn(r, dtype=dtype) if weighted else None
    b = torch.randn(h, dtype=dtype) if bias else None
    dy = torch.randn(2, 3, h, dtype=dtype)
    m = len(dims)
    inputs = xs + fs + ([w] if weighted else []) + ([b] if bias else [])

    def spec(*ts):
        rest = list(ts[2 * m:])
        return lmf.low_rank_fusion_ref(list(ts[:m]), list(ts[m:2 * m]), rest.pop(0) if weighted else None,
                                       rest.pop(0) if bias else None)
    want = autograd_of(spec, inputs, dy)
    dxs, dfs, dw, db = lmf.backward(dy, xs, fs, w, b)
    assert (dw is None) == (not weighted) and (db is None) == (not bias)
    got = dxs + dfs + ([dw] if weighted else []) + ([db] if bias else [])
    for i, (g, r_) in enumerate(zip(got, want)):
        close(g, r_, dtype, f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared-query", "per-sample-query"])
@pytest.mark.parametrize("extras", ["none", "lengths", "bias", "pos", "all"])
def test_latent_pool_reference_backward_is_autograd_of_the_spec(dtype, shared, extras):
    from mmkernels.ops.latent_pool import reference as lp
    torch.manual_seed(6)
    B, N, D, Q = 4, 6, 5, 3
    x = torch.randn(B, N, D, dtype=dtype)
    query = torch.randn(1 if shared else B, Q, D, dtype=dtype)
    lengths = torch.tensor([6, 0, 3, 5]) if extras in ("lengths", "all") else None
    bias = None
    if extras in ("bias", "all"):
        bias = torch.randn(B, N, dtype=dtype)
        bias[2, 1] = float("-inf")                         # a token that is out
        bias[3] = float("-inf")                            # a row with nothing to attend to
    pos = torch.randn(N, D, dtype=dtype) if extras in ("pos", "all") else None
    dy = torch.randn(B, Q, D, dtype=dtype)
    scale = 0.6
    inputs = [x, query] + ([pos] if pos is not None else [])
    want = autograd_of(lambda x_, q_, *p_: lp.latent_pool_ref(x_, q_, lengths, bias, p_[0] if p_ else None, scale)[0],
                       inputs, dy)
    out, stats = lp.forward(x, query, lengths, bias, pos, scale)
    dx, dq, dpos = lp.backward(dy, x, query, lengths, bias, pos, out, stats, scale)
    assert (dpos is None) == (pos is None)
    for name, g, r in [("dx", dx, want[0]), ("dquery", dq, want[1])] + ([("dpos", dpos, want[2])] if pos is not None else []):
        assert torch.isfinite(g).all(), name
        close(g, r, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_key", [False, True], ids=["keys-are-x", "key"])
@pytest.mark.parametrize("seqlens", [[3, 0, 5, 1], [4]], ids=["ragged", "one"])
def test_attention_pool_varlen_reference_backward_is_autograd_of_the_spec(dtype, with_key, seqlens):
    from mmkernels.ops.attention_pool import reference as ap
    torch.manual_seed(7)
    H, Dh, Q = 2, 3, 2
    cu = torch.tensor([0] + list(torch.tensor(seqlens).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    x = torch.randn(T, H * Dh, dtype=dtype)
    key = torch.randn(T, H * Dh, dtype=dtype) if with_key else None
    query = torch.randn(1, Q, H, Dh, dtype=dtype)
    dy = torch.randn(len(seqlens), Q, H * Dh, dtype=dtype)
    inputs = [x, query] + ([key] if with_key else [])
    want = autograd_of(lambda x_, q_, *k_: ap.attention_pool_varlen_ref(x_, cu, q_, k_[0] if k_ else None, 0.8)[0],
                       inputs, dy)
    out, lse = ap.forward(x, key, query, None, cu, -1, 0.8)
    dx, dkey, dq = ap.backward(dy, x, key, query, None, cu, out, lse, -1, 0.8)
    for name, g, r in [("dx", dx, want[0]), ("dquery", dq, want[1])] + ([("dkey", dkey, want[2])] if with_key else []):
        close(g, r, dtype, name)
