"""norm_concat: the spec is ``cat([LayerNorm_m(x_m) for m], -1)`` (or RMSNorm); every backend must
match it forward and backward, on odd shapes, views, empty batches, and reject bad input early."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import mmkernels
from mmkernels import candidates
from mmkernels.ops.norm_concat import triton as tri
from mmkernels.ops.norm_concat.reference import norm_concat_ref
from mmkernels.testing import assert_close

from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_DTYPES


def make(dims, lead, dtype, device, affine=True, rms=False, wdtype=None, grad=False):
    xs = [torch.randn(*lead, d, dtype=dtype, device=device) * 3 + 1 for d in dims]
    ws = [torch.randn(d, dtype=wdtype or dtype, device=device) for d in dims] if affine else None
    bs = [torch.randn(d, dtype=wdtype or dtype, device=device) for d in dims] if affine and not rms else None
    if grad:
        for t in xs + (ws or []) + (bs or []):
            t.requires_grad_()
    return xs, ws, bs


def expected(xs, ws, bs, rms, eps=1e-5, dy=None):
    """float64 reference forward (and gradients for ``dy``), from the plain composition."""
    up = lambda ts: None if ts is None else [t.detach().double().requires_grad_() for t in ts]
    xs64, ws64, bs64 = up(xs), up(ws), up(bs)
    n = len(xs)
    out = norm_concat_ref(xs64, ws64 or [None] * n, bs64 or [None] * n, rms, eps)
    if dy is None:
        return out, None
    leaves = xs64 + (ws64 or []) + (bs64 or [])
    return out, torch.autograd.grad(out, leaves, dy.double())


def run(backend, xs, ws, bs, rms, dy=None, eps=1e-5):
    with mmkernels.use_backend(backend):
        out = mmkernels.norm_concat(xs, ws, bs, norm="rmsnorm" if rms else "layernorm", eps=eps)
        if dy is None:
            return out, None
        leaves = [t for t in xs + (ws or []) + (bs or []) if t is not None]
        return out, torch.autograd.grad(out, leaves, dy)


def check(backend, dims, lead, dtype, device, rms=False, affine=True, wdtype=None, views=None):
    xs, ws, bs = make(dims, lead, dtype, device, affine, rms, wdtype, grad=True)
    if views is not None:
        xs = [views(x.detach()).requires_grad_() for x in xs]
    dy = torch.randn(*lead, sum(dims), dtype=dtype, device=device)
    out, grads = run(backend, xs, ws, bs, rms, dy)
    ref, ref_grads = expected(xs, ws, bs, rms, dy=dy)
    assert out.dtype == dtype and out.shape == (*lead, sum(dims))
    assert_close(out, ref, dtype, f"{backend} out")
    names = [f"dx{i}" for i in range(len(xs))] + [f"dw{i}" for i in range(len(ws or []))] + \
        [f"db{i}" for i in range(len(bs or []))]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == (dtype if name.startswith("dx") else (wdtype or dtype))
        assert_close(g, r, dtype, f"{backend} {name}", scale=True)


# --- the reference is the plain PyTorch composition ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("lead", [(5,), (3, 4), ()])
def test_reference_is_layer_norm_then_cat(dtype, lead):
    dims = (7, 16, 33)
    xs, ws, bs = make(dims, lead, dtype, "cpu")
    want = torch.cat([F.layer_norm(x, (x.shape[-1],), w, b, 1e-5) for x, w, b in zip(xs, ws, bs)], -1)
    torch.testing.assert_close(mmkernels.norm_concat(xs, ws, bs), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_rmsnorm_formula(dtype):
    xs, ws, _ = make((9, 40), (6,), dtype, "cpu", rms=True)
    want = torch.cat([x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w for x, w in zip(xs, ws)], -1)
    torch.testing.assert_close(mmkernels.norm_concat(xs, ws, None, norm="rmsnorm", eps=1e-6), want)
    want_nn = torch.cat([F.rms_norm(x, (x.shape[-1],), w, 1e-6) for x, w in zip(xs, ws)], -1)
    torch.testing.assert_close(mmkernels.norm_concat(xs, ws, None, norm="rmsnorm", eps=1e-6), want_nn)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_reference_fp64(norm, affine):
    rms = norm == "rmsnorm"
    xs, ws, bs = make((3, 5), (4,), torch.float64, "cpu", affine, rms, grad=True)
    leaves = xs + (ws or []) + (bs or [])
    n = len(xs)

    def f(*ts):
        it = iter(ts[n:])
        w = [next(it) for _ in range(n)] if affine else None
        b = [next(it) for _ in range(n)] if affine and not rms else None
        with mmkernels.use_backend("reference"):
            return mmkernels.norm_concat(list(ts[:n]), w, b, norm=norm)
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(lambda *ts: norm_concat_ref(list(ts[:n]), [None] * n, [None] * n, rms, 1e-5),
                                        xs)


# --- the Triton kernels against the reference -----------------------------------------------------

DIM_SETS = [(1,), (7,), (33, 5), (16, 100, 3), (1, 2, 3, 4, 129), (300, 17)]


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("dims", DIM_SETS, ids=lambda d: "+".join(map(str, d)))
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_triton_matches_reference(dtype, dims, norm):
    check("triton", dims, (13,), dtype, TRITON_DEVICE, rms=norm == "rmsnorm")


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_batch_and_time_leading_dims(dtype):
    check("triton", (24, 9), (3, 5), dtype, TRITON_DEVICE)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_without_affine(dtype):
    check("triton", (10, 31), (7,), dtype, TRITON_DEVICE, affine=False)
    check("triton", (10, 31), (7,), dtype, TRITON_DEVICE, affine=False, rms=True)


def test_triton_fp16_inputs_with_fp32_params():
    check("triton", (40, 24), (9,), torch.float16, TRITON_DEVICE, wdtype=torch.float32)


def test_triton_some_modalities_without_params():
    xs, ws, bs = make((8, 12, 5), (6,), torch.float32, TRITON_DEVICE, grad=True)
    ws[1] = None
    bs[0] = None
    dy = torch.randn(6, 25, device=TRITON_DEVICE)
    out, grads = run("triton", xs, ws, bs, False, dy)
    leaves = xs + [w for w in ws if w is not None] + [b for b in bs if b is not None]
    ref = norm_concat_ref(xs, ws, bs, False, 1e-5)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    assert_close(out, ref, torch.float32, "out")
    want = {id(t): g for t, g in zip(leaves, ref_grads)}
    got = dict(zip([id(t) for t in xs + ws + bs if t is not None], grads))
    for k in want:
        assert_close(got[k], want[k], torch.float32, "grad", scale=True)


VIEWS = {
    "column-slice": lambda x: torch.cat([x, x], -1)[..., ::2],               # last-dim stride 2
    "row-stride": lambda x: torch.cat([x, x], -1)[..., : x.shape[-1]],       # padded rows
    "transposed-lead": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),  # lead dims not collapsible
}


@pytest.mark.parametrize("view", VIEWS, ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_non_contiguous_inputs(view, dtype):
    check("triton", (9, 20), (4, 3), dtype, TRITON_DEVICE, views=VIEWS[view])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_strided_weights_and_biases(backend):
    # parameters that are views (every other element of a buffer), as the CUDA test checks too
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    dims = (24, 40)
    xs = [torch.randn(6, d, device=device, requires_grad=True) for d in dims]
    ws = [torch.randn(2 * d, device=device)[::2].requires_grad_() for d in dims]
    bs = [torch.randn(2 * d, device=device)[::2].requires_grad_() for d in dims]
    dy = torch.randn(6, sum(dims), device=device)
    out, grads = run(backend, xs, ws, bs, False, dy)
    ref, ref_grads = expected(xs, ws, bs, False, dy=dy)
    assert_close(out, ref, torch.float32, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad", scale=True)


def test_triton_non_contiguous_grad_out():
    xs, ws, bs = make((6, 10), (5,), torch.float32, TRITON_DEVICE, grad=True)
    dy = torch.randn(16, 5, device=TRITON_DEVICE).t()  # [5, 16] with column stride 5
    _, grads = run("triton", xs, ws, bs, False, dy)
    _, ref_grads = expected(xs, ws, bs, False, dy=dy)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad", scale=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch(backend):
    xs, ws, bs = make((5, 7), (0,), torch.float32, TRITON_DEVICE, grad=True)
    out, grads = run(backend, xs, ws, bs, False, torch.zeros(0, 12, device=TRITON_DEVICE))
    assert out.shape == (0, 12)
    assert [tuple(g.shape) for g in grads] == [(0, 5), (0, 7), (5,), (7,), (5,), (7,)]
    assert all((g == 0).all() for g in grads[2:])


def test_triton_many_rows_exercise_the_persistent_backward():
    # more row tiles than programs: every program walks several tiles of the backward
    check("triton", (3, 8), (1000,), torch.float32, TRITON_DEVICE)


def test_triton_wide_rows_keep_parameter_sums_in_memory():
    from mmkernels.ops.norm_concat.triton import WIDE_ROW
    check("triton", (WIDE_ROW + 3, 40), (5,), torch.float32, TRITON_DEVICE)


@pytest.mark.parametrize("candidate", candidates.SLOTS[tri.BWD_SLOT])
@pytest.mark.parametrize("dims,lead,norm,dtype", [
    ((16, 100, 3), (13,), "layernorm", torch.float32),
    ((33, 5), (300,), "rmsnorm", torch.float16),           # more row tiles than programs
    ((1, 2, 3, 4, 129), (7, 3), "layernorm", torch.float16),
    ((300, 17), (40,), "layernorm", torch.float32),
], ids=["3-modalities", "many-rows-rms", "5-modalities", "300+17"])
def test_triton_backward_candidates_match_reference(candidate, dims, lead, norm, dtype):
    # the tournament's candidates of the backward's tile (norm_concat.bwd): each against float64
    with candidates.use(tri.BWD_SLOT, candidate):
        check("triton", dims, lead, dtype, TRITON_DEVICE, rms=norm == "rmsnorm")


def test_triton_backward_candidates_differ_in_their_tile():
    # deep_rows: twice the rows of four_per_sm's tile, the same warps (twice the elements per thread)
    from mmkernels import runtime
    from mmkernels.testing import _jit_fn
    xs, ws, bs = make((768, 1024, 512), (64,), torch.float32, "cpu")
    dy = torch.randn(64, 2304)
    metas = {}
    for name in candidates.SLOTS[tri.BWD_SLOT]:
        with candidates.use(tri.BWD_SLOT, name), runtime.capture_launches() as launches:
            tri.backward(dy, xs, ws, bs, False, 1e-5)
        metas[name] = next(meta for kernel, _, meta in launches if _jit_fn(kernel).__name__ == "_norm_concat_bwd_kernel")
    assert metas["deep_rows"]["ROWS"] == 2 * metas["four_per_sm"]["ROWS"] == 4
    assert metas["deep_rows"]["num_warps"] == metas["four_per_sm"]["num_warps"]


@pytest.mark.parametrize("candidate", candidates.SLOTS[tri.BWD_SLOT])
def test_triton_backward_is_deterministic(candidate):
    # dweight / dbias: per-program partial rows summed in a fixed order, never atomics
    xs, ws, bs = make((24, 9), (500,), torch.float32, TRITON_DEVICE, grad=True)
    dy = torch.randn(500, 33, device=TRITON_DEVICE)
    with candidates.use(tri.BWD_SLOT, candidate):
        a = run("triton", xs, ws, bs, False, dy)[1]
        b = run("triton", xs, ws, bs, False, dy)[1]
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@given(m=st.integers(1, 5), dims=st.lists(st.integers(1, 70), min_size=5, max_size=5),
       lead=st.lists(st.integers(0, 6), min_size=1, max_size=2), norm=st.sampled_from(["layernorm", "rmsnorm"]),
       affine=st.booleans(), dtype=st.sampled_from(TRITON_DTYPES))
def test_triton_shape_sweep(m, dims, lead, norm, affine, dtype):
    check("triton", tuple(dims[:m]), tuple(lead), dtype, TRITON_DEVICE, rms=norm == "rmsnorm", affine=affine)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (large shapes and bf16 on real hardware)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dims,lead", [((768, 1024, 512), (4096,)), ((16384,), (64,)), ((4096, 300), (8, 257)),
                                       ((64,) * 8, (999,))])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_large(dtype, dims, lead, backend):
    check(backend, dims, lead, dtype, "cuda")
    check(backend, dims, lead, dtype, "cuda", rms=True, wdtype=torch.float32)


# --- bad input: one ValueError naming the argument -----------------------------------------------

def _bad_cases():
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    return {
        "empty list": (dict(xs=[]), r"xs: expected a non-empty list"),
        "tensor not list": (dict(xs=x), r"xs: expected a non-empty list"),
        "leading dims": (dict(xs=[x, torch.randn(3, 5)]), r"xs\[1\]: expected leading dims \(4,\)"),
        "zero-width": (dict(xs=[x, torch.randn(4, 0)]), r"xs\[1\]: expected shape \[..., D\] with D >= 1"),
        "int dtype": (dict(xs=[x, torch.ones(4, 5, dtype=torch.int32)]), r"xs\[1\]: expected a floating dtype"),
        "mixed dtype": (dict(xs=[x, y.half()]), r"xs\[1\]: expected dtype torch.float32"),
        "mixed device": (dict(xs=[x, y.to("meta")]), r"xs\[1\]: expected device cpu"),
        "weight size": (dict(xs=[x, y], weights=[torch.ones(3), torch.ones(4)]), r"weights\[1\]: expected shape \(5,\)"),
        "weight count": (dict(xs=[x, y], weights=[torch.ones(3)]), r"weights: expected 2 entries"),
        "bias size": (dict(xs=[x, y], biases=[torch.ones(2), None]), r"biases\[0\]: expected shape \(3,\)"),
        "weight dtype": (dict(xs=[x.half(), y.half()], weights=[torch.ones(3, dtype=torch.bfloat16), None]),
                         r"weights\[0\]: expected dtype torch.float16 \(as xs\) or torch.float32"),
        "unknown norm": (dict(xs=[x], norm="batchnorm"), r"norm: expected one of"),
        "negative eps": (dict(xs=[x], eps=-1.0), r"eps: expected a number >= 0"),
        "rms bias": (dict(xs=[x], biases=[torch.ones(3)], norm="rmsnorm"), r"biases: rmsnorm takes no bias"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error(case):
    kwargs, pattern = _bad_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        mmkernels.norm_concat(**kwargs)
