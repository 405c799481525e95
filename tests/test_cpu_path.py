"""The eager paths. The ``torch`` backend — ``auto`` on CPU tensors, or requested by name — runs
every op's fastest plain-PyTorch formulation under autograd (the CPU path); every other eager call
runs the registered op's bodies through a ``torch.autograd.Function`` (the direct path). Both must
give what the registered op gives (forward and gradients, NaN in padding and empty rows included),
raise the same errors. Under ``torch.compile`` the graph holds the plain operations for the
``torch`` backend (in a form that reads no value on the host) and the registered op otherwise, with
no host sync in either; the compiled results equal the registered op's. On a GPU whose dispatch
table's verdict is ``torch``, ``auto`` takes the same plain route, eager and compiled (tested on
CPU tensors routed as if on a GPU, and on a real GPU where one is present)."""
import pytest
import torch

import mmkernels
from mmkernels.ops import attention_pool as ap
from mmkernels.ops import concat_linear as cl
from mmkernels.ops import gated_fusion as gf
from mmkernels.ops import gated_sum as gs
from mmkernels.ops import latent_pool as lp
from mmkernels.ops import low_rank_fusion as lmf
from mmkernels.ops import norm_concat as nc
from mmkernels.ops import tensor_fusion as tfn
from mmkernels.ops import _register
from mmkernels.ops._register import Op
from conftest import compiled_targets

OPS = (nc.OP, ap.OP, cl.OP, gs.OP, gf.OP, lp.OP, tfn.OP, lmf.OP)


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64).float().requires_grad_()


def _cases():
    """name -> (call(backend), leaves): each op on odd shapes with its hard parts."""
    xs = [_leaf(5, 7), _leaf(5, 3)]
    w, b = [_leaf(7), None], [_leaf(7), _leaf(3)]
    x = _leaf(4, 6, 8)
    x.data[2, 3:] = float("nan")                                  # padding of row 2 (length 3)
    x2 = _leaf(4, 6, 8)
    x2.data[2, 3:] = 1e4                                          # finite padding: the mask alone keeps it out
    q = _leaf(3, 2, 4)
    lengths = torch.tensor([6, 0, 3, 1])
    full = torch.tensor([6, 2, 3, 1])                              # no row of length 0: the plain mask
    x3 = _leaf(4, 6, 8)
    x3.data[2, 3:] = float("nan")
    key = _leaf(4, 6, 8)
    packed, cu = _leaf(9, 8), torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    cw, cb = _leaf(4, 10), _leaf(4)
    h, z = _leaf(6, 3, 5), _leaf(6, 3, 5)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)
    h.data[~mask] = float("nan")
    pw, pb = [_leaf(4, 7), _leaf(4, 3)], [_leaf(4), _leaf(4)]
    gw, gb = _leaf(8, 10), _leaf(8)
    lq, lx = _leaf(2, 8), _leaf(4, 6, 8)
    tw, tb = _leaf(3, 8 * 4), _leaf(3)
    fac, rw = [_leaf(2, 8, 3), _leaf(2, 4, 3)], _leaf(2)
    lb = _leaf(3)
    xs3 = [_leaf(2, 3, 7), _leaf(2, 3, 3)]                          # two leading dims
    xh = [t.detach().half().requires_grad_() for t in xs]         # fp16 inputs, fp32 norm parameters
    qs = _leaf(4, 3, 2, 4)                                         # per-sample queries [B, Q, H, Dh]
    hh, zh = h.detach().half().requires_grad_(), z.detach().half().requires_grad_()
    zm = _leaf(6, 3)                                               # one gate per modality
    gm, gmb = _leaf(2, 10), _leaf(2)
    return {
        "norm_concat": (lambda be: mmkernels.norm_concat(xs, w, b, backend=be), [*xs, w[0], *b]),
        "rmsnorm_concat": (lambda be: mmkernels.norm_concat(xs, w, None, "rmsnorm", backend=be), [*xs, w[0]]),
        "attention_pool": (lambda be: mmkernels.attention_pool(x, q, lengths, backend=be), [x, q]),
        "attention_pool_key": (lambda be: mmkernels.attention_pool(x, q[0], lengths, key=key, scale=0.3, backend=be),
                               [x, q, key]),
        "attention_pool_finite_padding": (lambda be: mmkernels.attention_pool(x2, q, lengths, backend=be), [x2, q]),
        "attention_pool_no_empty_rows": (lambda be: mmkernels.attention_pool(x2, q, full, backend=be), [x2, q]),
        "attention_pool_no_empty_rows_nan": (lambda be: mmkernels.attention_pool(x3, q, full, backend=be), [x3, q]),
        "latent_pool": (lambda be: mmkernels.latent_pool(lx, lq, lengths, backend=be), [lx, lq]),
        "tensor_fusion": (lambda be: mmkernels.tensor_fusion(xs, tw, tb, backend=be), [*xs, tw, tb]),
        "low_rank_fusion": (lambda be: mmkernels.low_rank_fusion(xs, fac, rw, backend=be), [*xs, *fac, rw]),
        "attention_pool_varlen": (lambda be: mmkernels.attention_pool_varlen(packed, cu, q, backend=be), [packed, q]),
        "attention_pool_varlen_max_seqlen": (lambda be: mmkernels.attention_pool_varlen(packed, cu, q, max_seqlen=5,
                                                                                        backend=be), [packed, q]),
        "concat_linear": (lambda be: mmkernels.concat_linear(xs, cw, cb, "gelu_tanh", backend=be), [*xs, cw, cb]),
        "gated_sum": (lambda be: mmkernels.gated_sum(h, z, mask, backend=be), [h, z]),
        "gated_fusion": (lambda be: gf.gated_fusion(xs, pw, pb, gw, gb, mask[:5, :2], "feature", backend=be),
                         [*xs, *pw, *pb, gw, gb]),
        # the CPU formulations' other branches
        "norm_concat_fp16_fp32_params": (lambda be: mmkernels.norm_concat(xh, w, b, backend=be).float(), [*xh, w[0], *b]),
        "rmsnorm_concat_fp16": (lambda be: mmkernels.norm_concat(xh, None, None, "rmsnorm", backend=be).float(), xh),
        "attention_pool_per_sample_queries": (lambda be: mmkernels.attention_pool(x2, qs, lengths, backend=be),
                                              [x2, qs]),
        "attention_pool_full_rows": (lambda be: mmkernels.attention_pool(lx, q, backend=be), [lx, q]),
        "tensor_fusion_3d": (lambda be: mmkernels.tensor_fusion(xs3, tw, None, backend=be), [*xs3, tw]),
        "low_rank_fusion_bias": (lambda be: mmkernels.low_rank_fusion(xs3, fac, None, lb, backend=be),
                                 [*xs3, *fac, lb]),
        "gated_sum_fp16_modality_gates": (lambda be: mmkernels.gated_sum(hh, zh[..., 0], mask, backend=be).float(),
                                          [hh, zh]),
        "gated_fusion_modality_gates": (lambda be: gf.gated_fusion(xs, pw, None, gm, gmb, mask[:5, :2], "modality",
                                                                   backend=be), [*xs, *pw, gm, gmb]),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_direct_path_without_autograd_skips_the_function_and_equals_the_registered_op(name, monkeypatch):
    # nothing for autograd to record (no_grad): the forward body alone, same outputs
    call, _ = _cases()[name]
    with torch.no_grad():
        for op in OPS:
            monkeypatch.setattr(op, "direct", False)
        want = call("reference")                                 # the registered op's dispatch
        for op in OPS:
            monkeypatch.setattr(op, "direct", True)
        monkeypatch.setattr(_register, "_direct_apply", lambda *a: pytest.fail("the autograd.Function ran"))
        got = call("reference")
    assert got.grad_fn is None
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_direct_path_under_forward_ad_still_goes_through_the_function():
    import torch.autograd.forward_ad as fwad
    h, z = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    with torch.no_grad(), fwad.dual_level():
        dual = fwad.make_dual(h, torch.ones_like(h))
        with pytest.raises(NotImplementedError, match="jvp"):    # as before: the Function has no jvp
            mmkernels.gated_sum(dual, z, backend="reference")


def _assert_matches(got, got_g, want, want_g, leaves):
    """Finite, and equal to the registered op's output and gradients within fp32 rounding (fp16: a
    rounding step) relative to each tensor's scale: the formulations sum in other orders."""
    got, want = got.detach(), want.detach()
    tol = 2e-3 if any(t.dtype == torch.float16 for t in leaves) else 1e-5
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=tol * float(want.abs().max().clamp_min(1)), rtol=tol)
    for g, r in zip(got_g, want_g):
        assert (g is None) == (r is None)
        if g is not None:
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, r, atol=tol * float(r.abs().max().clamp_min(1)), rtol=tol)


@pytest.mark.parametrize("name", list(_cases()))
def test_cpu_path_equals_the_registered_op(name, monkeypatch):
    call, leaves = _cases()[name]
    want = call("reference")                                     # through the registered op
    want_g = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    for op in OPS:                                               # the CPU path never reaches them
        monkeypatch.setattr(op, "forward_op", lambda *a: pytest.fail("the registered op ran"))
    # nor the schema's packing: the public functions call their plain formulation themselves
    monkeypatch.setattr(Op, "__call__", lambda *a, **k: pytest.fail("Op.__call__ ran"))
    got = call("auto")
    got_g = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    _assert_matches(got, got_g, want, want_g, leaves)
    if name == "attention_pool_finite_padding":   # padding and the empty row (1): exactly no gradient
        assert not got_g[0][2, 3:].any() and not got_g[0][1].any() and not got[1].any()


@pytest.mark.parametrize("name", list(_cases()))
def test_direct_path_equals_the_registered_op(name, monkeypatch):
    call, leaves = _cases()[name]
    got = call("reference")                                      # eager: the direct path
    got_g = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    for op in OPS:
        monkeypatch.setattr(op, "direct", False)
    want = call("reference")                                     # the registered op's dispatch
    want_g = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for g, r in zip(got_g, want_g):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_cpu_path_attention_pool_nan_at_a_valid_position_is_nan_as_in_the_reference():
    # the padded path pools once with the mask, sees a non-finite output and pools again with the
    # padding zeroed: NaN in the padding vanishes, NaN at a valid position stays, as in the reference
    x = torch.randn(3, 5, 8)
    x[0, 4] = float("nan")                                       # padding of row 0 (length 2)
    x[1, 1] = float("nan")                                       # a valid position of row 1
    q, lengths = torch.randn(2, 4), torch.tensor([2, 5, 0])
    got = mmkernels.attention_pool(x, q, lengths)
    want = mmkernels.attention_pool(x, q, lengths, backend="reference")
    assert torch.isfinite(got[0]).all() and torch.isnan(got[1]).all() and not got[2].any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_cpu_path_leaves_empty_inputs_to_the_registered_op():
    x = torch.randn(3, 0, 8, requires_grad=True)
    q = torch.randn(2, 4, requires_grad=True)
    out = mmkernels.attention_pool(x, q)
    gx, gq = torch.autograd.grad(out.sum(), [x, q])
    assert out.shape == (3, 8) and not out.any() and gx.shape == x.shape and not gq.any()


def test_cpu_path_takes_16_bit_inputs_in_fp32():
    x = torch.randn(2, 9, 16).to(torch.bfloat16)
    q = torch.randn(2, 8).to(torch.bfloat16)
    got = mmkernels.attention_pool(x, q)
    want = mmkernels.attention_pool(x, q, backend="reference")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_eager_and_compiled_paths_raise_the_same_errors():
    def bad():
        return mmkernels.norm_concat([torch.randn(3, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError) as eager:
        bad()
    torch._dynamo.reset()
    with pytest.raises(ValueError) as compiled:
        torch.compile(bad)()
    assert str(compiled.value) == str(eager.value)
    # fullgraph=True: dynamo refuses to trace a raise, and its error carries ours
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"xs\[1\]: expected leading dims \(3,\) \(as xs\[0\]\), got \(2,\)"):
        torch.compile(bad, fullgraph=True)()


def _compiled_targets(fn):
    """``fn()`` compiled with ``fullgraph=True`` (its result), and the targets of the graph's calls."""
    got, targets = compiled_targets(fn)
    return got, {str(t) for t in targets}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_cases()))
def test_compiled_cpu_path_equals_the_registered_op(name):
    call, leaves = _cases()[name]
    want = call("reference")
    want_g = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    _, targets = _compiled_targets(lambda: call("auto"))
    registered = {t for t in targets if t.startswith("mmkernels.")}
    # packed rows without max_seqlen: the padded shape would depend on values, the registered op reads it
    assert registered == ({"mmkernels.attention_pool.default"} if name == "attention_pool_varlen" else set())
    torch._dynamo.reset()
    compiled = torch.compile(lambda: call("auto"), fullgraph=True)
    got = compiled()
    got_g = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    _assert_matches(got, got_g, want, want_g, leaves)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "auto", "torch"])
def test_compiled_graphs_hold_the_registered_ops_except_the_torch_backend_and_no_host_sync(backend):
    layers = [mmkernels.nn.NormConcat([7, 3]), mmkernels.nn.ConcatLinear([7, 3], 4, activation="silu"),
              mmkernels.nn.GatedFusion([7, 3], 4), mmkernels.nn.AttentionPool(8, 2, num_queries=3)]
    xs = [torch.randn(5, 7), torch.randn(5, 3)]
    x, lengths = torch.randn(4, 6, 8), torch.tensor([6, 0, 3, 1])

    def model(xs, x, lengths):
        return (layers[0](xs).sum() + layers[1](xs).sum() + layers[2](xs).sum()
                + layers[3](x, lengths).sum())
    with mmkernels.use_backend(backend):
        _, found = compiled_targets(model, xs, x, lengths, kinds=("call_function", "call_method"))
    targets = {str(t) for t in found}
    for op in ("norm_concat", "concat_linear", "fusion_projections", "gated_sum", "attention_pool"):
        assert (f"mmkernels.{op}.default" in targets) == (backend == "reference"), targets
    syncs = {t for t in targets if t in ("item", "tolist", "aten._local_scalar_dense.default", "nonzero")}
    assert not syncs, syncs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_every_layer_under_reduce_overhead_compile_matches_eager():
    # mode="reduce-overhead" records CUDA graphs: no host sync and no Python between the kernels
    torch._dynamo.reset()
    dev = "cuda"
    layers = {
        "norm_concat": (mmkernels.nn.NormConcat([64, 32]), lambda m, xs, x, n: m(xs)),
        "concat_linear": (mmkernels.nn.ConcatLinear([64, 32], 48, activation="gelu"), lambda m, xs, x, n: m(xs)),
        "gated_fusion": (mmkernels.nn.GatedFusion([64, 32], 48), lambda m, xs, x, n: m(xs)),
        "attention_pool": (mmkernels.nn.AttentionPool(64, 4, num_queries=2), lambda m, xs, x, n: m(x, n)),
    }
    xs = [torch.randn(16, 64, device=dev), torch.randn(16, 32, device=dev)]
    x, n = torch.randn(16, 20, 64, device=dev), torch.randint(0, 21, (16,), device=dev)
    for name, (layer, call) in layers.items():
        layer = layer.to(dev)
        want = call(layer, xs, x, n)
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up, record, replay
            got = call(compiled, xs, x, n)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


# --- a GPU whose dispatch table's verdict is torch ------------------------------------------------
# (CPU tensors routed as if they were on a GPU: ``_register._device_type`` is the seam; the
# public functions' CPU shortcut is turned off so every call goes through ``Op.__call__``)

# the ops whose ``plain_devices`` list GPUs: their verdicts' evidence timed the plain formulation there
_GPU_PLAIN = ("concat_linear", "tensor_fusion", "tensor_fusion_3d")


def _as_if_on_a_gpu(monkeypatch, first):
    """Route CPU tensors as CUDA ones whose table entry is ``first`` for every op."""
    monkeypatch.setattr(_register, "_device_type", lambda device: "cuda")
    monkeypatch.setattr(_register, "_auto_first", lambda op, device: first)
    monkeypatch.setattr(Op, "cpu_path", lambda *a, **k: False)


@pytest.mark.parametrize("name", _GPU_PLAIN)
def test_auto_routed_to_torch_on_a_gpu_runs_the_plain_formulation(name, monkeypatch):
    call, leaves = _cases()[name]
    want = call("reference")                                     # the reference backend's bodies
    want_g = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    _as_if_on_a_gpu(monkeypatch, "torch")
    for op in OPS:
        monkeypatch.setattr(op, "forward_op", lambda *a: pytest.fail("the registered op ran"))
    monkeypatch.setattr(_register, "_direct_apply", lambda *a: pytest.fail("the autograd.Function ran"))
    got = call("auto")
    got_g = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    _assert_matches(got, got_g, want, want_g, leaves)


@pytest.mark.parametrize("name", list(_cases()))
def test_torch_by_name_runs_the_plain_formulation_on_any_device(name, monkeypatch):
    # a GPU whose table names a kernel: torch requested by name is still the plain formulation
    # (the registered op never runs eagerly; inputs the plain formulation does not take get the
    # reference bodies under the autograd.Function), with the reference backend's results
    call, leaves = _cases()[name]
    want = call("reference")
    want_g = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    _as_if_on_a_gpu(monkeypatch, "triton")
    for op in OPS:
        monkeypatch.setattr(op, "forward_op", lambda *a: pytest.fail("the registered op ran"))
    got = call("torch")
    got_g = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    _assert_matches(got, got_g, want, want_g, leaves)


@pytest.mark.parametrize("first, name", [("triton", "concat_linear"), ("cuda", "gated_sum"),
                                         ("reference", "concat_linear"), ("reference", "attention_pool"),
                                         ("torch", "attention_pool"), ("torch", "latent_pool"),
                                         ("torch", "norm_concat"), ("torch", "gated_sum"),
                                         ("torch", "gated_fusion"), ("torch", "low_rank_fusion")])
def test_auto_on_a_gpu_otherwise_takes_the_direct_path(first, name, monkeypatch):
    # a kernel or the reference backend first in the table, or a torch verdict for an op whose plain
    # formulation is CPU-only (attention and latent pooling read lengths on the host) or was not what
    # a verdict timed on the GPU: a backend's bodies under the autograd.Function (GatedFusion: two ops)
    call, leaves = _cases()[name]
    _as_if_on_a_gpu(monkeypatch, first)
    ran = []
    real = _register._direct_apply
    monkeypatch.setattr(_register, "_direct_apply", lambda *a: ran.append(a[1]) or real(*a))
    got = call("auto")
    torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    assert ran == ["auto"] * (2 if name == "gated_fusion" else 1)


def test_the_first_choice_is_read_once_per_op_and_gpu(monkeypatch):
    # the table's choice for an op on a GPU is kept: neither the plain route's check nor auto's
    # order asks the driver for the GPU's name again
    import types
    import mmkernels.cuda
    from mmkernels import backend
    asked = []
    monkeypatch.setattr(mmkernels.cuda, "preferred", lambda op, t: asked.append((op, t.device)) or "torch")
    monkeypatch.setattr(backend, "_FIRST", {})
    gpu = torch.device("cuda", 0)
    assert [_register._auto_first("concat_linear", gpu) for _ in range(3)] == ["torch"] * 3
    on_gpu = {"x": types.SimpleNamespace(device=gpu)}
    assert [backend.auto_order("concat_linear", on_gpu) for _ in range(2)] == [("torch", "triton", "cuda",
                                                                                  "reference")] * 2
    assert backend.auto_order("gated_sum", on_gpu)[0] == "torch"
    assert asked == [("concat_linear", gpu), ("gated_sum", gpu)]


@pytest.mark.slow
@pytest.mark.parametrize("first", ["torch", "triton"])
def test_compiled_auto_on_a_gpu_holds_plain_ops_where_the_table_says_torch(first, monkeypatch):
    # the table lookup is a constant of the trace (``assume_constant_result``), fullgraph holds
    import mmkernels.cuda
    monkeypatch.setattr(_register, "_device_type", lambda device: "cuda")
    monkeypatch.setattr(mmkernels.backend, "_FIRST", {})
    monkeypatch.setattr(mmkernels.cuda, "preferred", lambda op, t: first)
    monkeypatch.setattr(Op, "cpu_path", lambda *a, **k: False)
    call, leaves = _cases()["concat_linear"]
    want = call("reference")
    want_g = torch.autograd.grad(want.square().sum(), leaves, allow_unused=True)
    got, targets = _compiled_targets(lambda: call("auto"))
    got_g = torch.autograd.grad(got.square().sum(), leaves, allow_unused=True)
    assert ("mmkernels.concat_linear.default" in targets) == (first != "torch"), targets
    _assert_matches(got, got_g, want, want_g, leaves)
    torch._dynamo.reset()


def _auto_on_this_gpu(name, dev, monkeypatch):
    """Eager and compiled ``auto`` on ``dev`` against the reference backend; whether the eager call
    went through the autograd.Function and whether the graph holds the registered op."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dev).requires_grad_()
    xs = [leaf(37, 24), leaf(37, 8)]
    if name == "concat_linear":
        w, b = leaf(16, 32), leaf(16)

        def call(be):
            return mmkernels.concat_linear(xs, w, b, "gelu", backend=be)
    else:
        w, b = leaf(16, 25 * 9), leaf(16)

        def call(be):
            return mmkernels.tensor_fusion(xs, w, b, backend=be)
    leaves = [*xs, w, b]
    want = call("reference")
    want_g = torch.autograd.grad(want.square().sum(), leaves)
    ran = []
    real = _register._direct_apply
    monkeypatch.setattr(_register, "_direct_apply", lambda *a: ran.append(a[1]) or real(*a))
    got = call("auto")
    _assert_matches(got, torch.autograd.grad(got.square().sum(), leaves), want, want_g, leaves)
    got, targets = _compiled_targets(lambda: call("auto"))
    _assert_matches(got, torch.autograd.grad(got.square().sum(), leaves), want, want_g, leaves)
    torch._dynamo.reset()
    return bool(ran), f"mmkernels.{name}.default" in targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the real dispatch table)")
@pytest.mark.parametrize("name", ["concat_linear", "tensor_fusion"])
def test_auto_on_this_gpu_takes_the_route_its_dispatch_table_names(name, monkeypatch, tf32):
    # the plain route on a real GPU: where this GPU's table names the torch backend (the hand-set
    # entries of these two ops), no autograd.Function runs and the compiled graph holds plain ops;
    # elsewhere the registered op's bodies run, eager and compiled
    dev = torch.device("cuda")
    tf32(False)
    plain = _register._auto_first(name, dev) == "torch"
    assert _auto_on_this_gpu(name, dev, monkeypatch) == (not plain, not plain)


@pytest.mark.parametrize("used", ["h_pre", "z"])
def test_direct_path_with_one_output_unused_equals_the_registered_op(used, monkeypatch):
    # the unused differentiable output's gradient is absent: the direct path makes it zeros itself
    torch.manual_seed(0)
    xs = [_leaf(5, 7), _leaf(5, 3)]
    pw, pb, gw, gb = [_leaf(4, 7), _leaf(4, 3)], [_leaf(4), _leaf(4)], _leaf(8, 10), _leaf(8)
    leaves = [*xs, *pw, *pb, gw, gb]

    def grads():
        h_pre, z = gf.OP(xs, pw, pb, gw, gb, backend="reference")
        return torch.autograd.grad((h_pre if used == "h_pre" else z).square().sum(), leaves, allow_unused=True)
    got = grads()                                                # eager: the direct path
    monkeypatch.setattr(gf.OP, "direct", False)
    want = grads()
    for g, r in zip(got, want):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the torch backend on GPU tensors)")
def test_torch_by_name_on_gpu_tensors_with_lengths_equals_the_reference():
    # the plain formulations build their position indices on the inputs' device
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(4, 6, 8, generator=g).to(dev), torch.randn(2, 4, generator=g).to(dev)
    lengths = torch.tensor([6, 0, 3, 1], device=dev)
    packed, cu = torch.randn(9, 8, generator=g).to(dev), torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=dev)
    lq = torch.randn(3, 8, generator=g).to(dev)
    calls = {"attention_pool": lambda be: mmkernels.attention_pool(x, q, lengths, backend=be),
             "attention_pool_varlen": lambda be: mmkernels.attention_pool_varlen(packed, cu, q, max_seqlen=5,
                                                                                 backend=be),
             "latent_pool": lambda be: mmkernels.latent_pool(x, lq, lengths, backend=be)}
    for name, call in calls.items():
        torch.testing.assert_close(call("torch"), call("reference"), atol=1e-5, rtol=1e-5, msg=name)
