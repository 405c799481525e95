"""tensor_fusion and low_rank_fusion: the specs are ``F.linear`` over the flattened outer product of
``[1, x_m]`` (TFN) and ``Σ_r w_r Π_m ([1, x_m] @ F_m[r]) + b`` (LMF); every backend must match them
forward and backward on odd sizes, views, leading dims and empty batches — and reject bad input."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import mmkernels
from mmkernels import candidates
from mmkernels.ops.low_rank_fusion import triton as lmf_triton
from mmkernels.ops.low_rank_fusion.reference import low_rank_fusion_ref
from mmkernels.ops.tensor_fusion import fused_width
from mmkernels.ops.tensor_fusion import reference
from mmkernels.ops.tensor_fusion.reference import outer, tensor_fusion_chunked, tensor_fusion_ref
from mmkernels.testing import assert_close

from conftest import TRITON_DEVICE, TRITON_DTYPES

BACKENDS = ["reference", "auto", "triton"]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _dtypes(backend):
    return TRITON_DTYPES if backend == "triton" else [torch.float32, torch.float64]


def _up(t):
    return None if t is None else t.detach().double().requires_grad_()


def tfn_case(dims, h, lead, dtype, device, bias=True, view=False):
    def mk(*shape):
        t = torch.randn(*shape, dtype=dtype, device=device)
        return t
    xs = []
    for d in dims:
        x = mk(*lead, 2 * d)[..., ::2] if view else mk(*lead, d)
        xs.append(x.requires_grad_())
    k = fused_width(dims)
    w = (mk(h, k) * k ** -0.5).requires_grad_()
    b = mk(h).requires_grad_() if bias else None
    return xs, w, b


def check_tfn(backend, dims, h, lead, dtype, bias=True, view=False):
    device = _device(backend)
    xs, w, b = tfn_case(dims, h, lead, dtype, device, bias, view)
    leaves = [*xs, w] + ([b] if bias else [])
    dy = torch.randn(*lead, h, dtype=dtype, device=device)
    out = mmkernels.tensor_fusion(xs, w, b, backend=backend)
    grads = torch.autograd.grad(out, leaves, dy)
    x6, w6, b6 = [_up(x) for x in xs], _up(w), _up(b)
    ref = tensor_fusion_ref(x6, w6, b6)
    refg = torch.autograd.grad(ref, [*x6, w6] + ([b6] if bias else []), dy.double())
    assert out.shape == (*lead, h) and out.dtype == dtype
    assert_close(out, ref, dtype, f"{backend} out", scale=True)
    for i, (g, r) in enumerate(zip(grads, refg)):
        assert g.shape == r.shape and g.dtype == dtype
        assert_close(g, r, dtype, f"{backend} grad {i}", scale=True)


def lmf_case(dims, r, h, lead, dtype, device, weights=True, bias=True, view=False):
    xs = []
    for d in dims:
        x = torch.randn(*lead, 2 * d, dtype=dtype, device=device)[..., ::2] if view else \
            torch.randn(*lead, d, dtype=dtype, device=device)
        xs.append(x.requires_grad_())
    fs = [(torch.randn(r, d + 1, h, dtype=dtype, device=device) * (d + 1) ** -0.5).requires_grad_() for d in dims]
    w = torch.randn(r, dtype=dtype, device=device).requires_grad_() if weights else None
    b = torch.randn(h, dtype=dtype, device=device).requires_grad_() if bias else None
    return xs, fs, w, b


LMF_CANDIDATES = candidates.SLOTS[lmf_triton.FWD_SLOT]      # the forward's and the backward's: the same names
assert LMF_CANDIDATES == candidates.SLOTS[lmf_triton.BWD_SLOT]


def _lmf_designs(backend):
    """(forward, backward) candidates to run: each design for both passes, and the two mixed, on triton."""
    if backend != "triton":
        return [(None, None)]
    a, b = LMF_CANDIDATES
    return [(a, a), (b, b), (a, b), (b, a)]


def _run_lmf(design, fn):
    fwd, bwd = design
    if fwd is None:
        return fn()
    with candidates.use(lmf_triton.FWD_SLOT, fwd), candidates.use(lmf_triton.BWD_SLOT, bwd):
        return fn()


def check_lmf(backend, dims, r, h, lead, dtype, weights=True, bias=True, view=False):
    for design in _lmf_designs(backend):
        if design[0] is not None and "fused" in design and not 2 <= len(dims) <= lmf_triton.MAX_M:
            continue                                                  # refused: test_lmf_modality_counts
        _run_lmf(design, lambda: _check_lmf(backend, dims, r, h, lead, dtype, weights, bias, view, design))


def _check_lmf(backend, dims, r, h, lead, dtype, weights, bias, view, design):
    device = _device(backend)
    xs, fs, w, b = lmf_case(dims, r, h, lead, dtype, device, weights, bias, view)
    leaves = [*xs, *fs] + [t for t in (w, b) if t is not None]
    dy = torch.randn(*lead, h, dtype=dtype, device=device)
    out = mmkernels.low_rank_fusion(xs, fs, w, b, backend=backend)
    grads = torch.autograd.grad(out, leaves, dy)
    backend = f"{backend} {design}"
    x6, f6, w6, b6 = [_up(x) for x in xs], [_up(f) for f in fs], _up(w), _up(b)
    ref = low_rank_fusion_ref(x6, f6, w6, b6)
    refg = torch.autograd.grad(ref, [*x6, *f6] + [t for t in (w6, b6) if t is not None], dy.double())
    assert out.shape == (*lead, h) and out.dtype == dtype
    assert_close(out, ref, dtype, f"{backend} out", scale=True)
    for i, (g, rg) in enumerate(zip(grads, refg)):
        assert g.shape == rg.shape and g.dtype == dtype
        assert_close(g, rg, dtype, f"{backend} grad {i}", scale=True)


# --- the references are the compositions of the papers --------------------------------------------

def test_tfn_reference_is_einsum_outer_product_then_linear():
    xs, w, b = tfn_case((3, 2, 4), 5, (6,), torch.float64, "cpu")
    z = [torch.cat([torch.ones(6, 1, dtype=torch.float64), x], -1) for x in xs]
    outer = torch.einsum("bi,bj,bk->bijk", *z).flatten(1)
    torch.testing.assert_close(tensor_fusion_ref(xs, w, b), F.linear(outer, w, b))
    # the CPU path (row chunks x blocks of K columns) is the same function, forward and backward,
    # whatever its budget: 4 x 5 x 3 = several row chunks of several blocks; 15 x 3 = one row
    # chunk of blocks; 1 = a row and one leading index at a time
    dy = torch.randn(6, 5, dtype=torch.float64)
    g2 = torch.autograd.grad(F.linear(outer, w, b), [*xs, w, b], dy)
    for budget in (1, 4 * 5 * 3, 15 * 3, 10 ** 6):
        got = tensor_fusion_chunked(xs, w, b, budget=budget)
        torch.testing.assert_close(got, F.linear(outer, w, b))
        g1 = torch.autograd.grad(got, [*xs, w, b], dy)
        for a, c in zip(g1, g2):
            torch.testing.assert_close(a, c)
    # the registered reference backend's backward (what torch.compile and backend="reference" run)
    dxs, dw, db = reference.backward(dy, xs, w, b)
    for a, c in zip([*dxs, dw, db], g2):
        torch.testing.assert_close(a, c)


def test_lmf_reference_is_sum_of_rank_products():
    xs, fs, w, b = lmf_case((3, 2), 4, 5, (6,), torch.float64, "cpu")
    z = [torch.cat([torch.ones(6, 1, dtype=torch.float64), x], -1) for x in xs]
    want = sum(w[r] * (z[0] @ fs[0][r]) * (z[1] @ fs[1][r]) for r in range(4)) + b
    torch.testing.assert_close(low_rank_fusion_ref(xs, fs, w, b), want)


def test_gradcheck_references_fp64():
    xs, w, b = tfn_case((2, 3), 3, (4,), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, c, w_, b_: mmkernels.tensor_fusion([a, c], w_, b_, backend="reference"),
                                    (*xs, w, b))
    xs, fs, rw, lb = lmf_case((2, 3), 2, 3, (4,), torch.float64, "cpu")
    assert torch.autograd.gradcheck(
        lambda a, c, f0, f1, w_, b_: mmkernels.low_rank_fusion([a, c], [f0, f1], w_, b_, backend="reference"),
        (*xs, *fs, rw, lb))


# --- every backend against the float64 reference -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(3, 5), (4, 2, 6), (2, 3, 2, 5)])
def test_tfn_matches_reference(backend, dims):
    for dtype in _dtypes(backend):
        check_tfn(backend, dims, 5, (7,), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tfn_odd_views_leading_dims_no_bias(backend):
    dtype = _dtypes(backend)[0]
    check_tfn(backend, (17, 3), 19, (2, 5), dtype, bias=False, view=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tfn_empty_batch(backend):
    check_tfn(backend, (3, 4), 5, (0,), _dtypes(backend)[0])


def test_tfn_cpu_path_chunks_long_batches():
    # more rows than one chunk (32 rows of K = 65536): the auto path runs chunk by chunk with the same
    # result; the GPU implementation (triton) in its own blocks (1/32 of the product: 3 i0 per block)
    check_tfn("auto", (63, 31, 31), 6, (100,), torch.float32)
    check_tfn("triton", (63, 31, 31), 6, (100,), torch.float16)


def test_tfn_blocked_path_sums_16_bit_blocks_in_fp32():
    # 7 column blocks and 4 row chunks; integer inputs make the outer product exact in bf16, so the
    # float64 product of the same values is the exact answer and an fp32 sum of the blocks is off
    # by the final rounding alone (half a bf16 ulp: <= 2^-8 relative), in the output and in dweight
    from mmkernels.ops.tensor_fusion.reference import _BlockedTFN
    g = torch.Generator().manual_seed(0)
    dims, rows, h = (6, 3, 3), 40, 5
    xs = [torch.randint(-2, 3, (rows, d), generator=g).to(torch.bfloat16) for d in dims]
    w = torch.randn(h, fused_width(dims), generator=g).to(torch.bfloat16).requires_grad_()
    b = torch.randn(h, generator=g).to(torch.bfloat16)
    dy = torch.randn(rows, h, generator=g).to(torch.bfloat16)
    budget = 16 * 10                                   # K' = 16: 10 rows per chunk, one i0 per block
    out = _BlockedTFN.apply(budget, w, b, *xs)
    (dw,) = torch.autograd.grad(out, [w], dy)
    a = outer([x.double() for x in xs])
    want = a @ w.detach().double().t() + b.double()
    want_dw = dy.double().t() @ a
    for got, ref in ((out, want), (dw, want_dw)):
        err = (got.detach().double() - ref).abs()
        assert (err <= ref.abs() * 2 ** -8 + 1e-6 * ref.abs().max()).all(), float((err / ref.abs()).max())
    # off the CPU the fp32 products come from cuBLAS (``mm`` with ``out_dtype``; meta tensors
    # stand in for a GPU's and check the calls' signatures, dtypes and shapes)
    meta = [x.to("meta") for x in xs]
    wm = w.detach().to("meta").requires_grad_()
    with torch.no_grad():
        assert _gemms(lambda: _BlockedTFN.apply(budget, wm, b.to("meta"), *meta), fp32_out=True) == 7 * 4
    out = _BlockedTFN.apply(budget, wm, b.to("meta"), *meta)
    (dw,) = torch.autograd.grad(out, [wm], dy.to("meta"))
    assert out.dtype == dw.dtype == torch.bfloat16 and dw.shape == w.shape


def _gemms(fn, *args, fp32_out=False) -> int:
    """How many GEMM calls ``fn(*args)`` makes (mm, addmm, in-place addmm; ``fp32_out``: mm with
    an ``out_dtype``)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    gemms = ({aten.mm.dtype} if fp32_out else
             {aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out, aten.addmm_.default})

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in gemms
            return func(*args, **(kwargs or {}))
    with Count():
        fn(*args)
    return Count.n


@pytest.mark.parametrize("dims, rows, h", [((128, 32, 32), 1024, 128), ((64, 64, 64), 4096, 256)],
                         ids=["tfn_mosi_b1024", "tfn_b4096"])
def test_tfn_gpu_implementation_is_the_blocked_path(dims, rows, h):
    # on a GPU every backend (the plain formulation auto takes, reference, triton) runs the blocked
    # cuBLAS path with at most 1/32 of the outer product alive: 33 column blocks at both headline
    # cases (meta tensors stand in for a GPU's), where the CPU's 8 MB budget makes 129 (mosi) and
    # 65 column blocks in each of 9 row chunks (b4096)
    from mmkernels.ops.tensor_fusion import triton as tfn_triton
    from mmkernels.ops.tensor_fusion.cpu import tensor_fusion_cpu

    def args(device):
        return ([torch.empty(rows, d, device=device) for d in dims],
                torch.empty(h, fused_width(dims), device=device), torch.empty(h, device=device))
    with torch.no_grad():
        for path in (tensor_fusion_cpu, reference.forward, tfn_triton.forward):
            assert _gemms(path, *args("meta")) == 33, path
        cpu_blocks = 129 if rows == 1024 else 9 * 65
        assert _gemms(lambda xs, w, b: tensor_fusion_chunked(xs, w, b, reference.BUDGET), *args("meta")) == cpu_blocks


def _peak_bytes(fn, existing):
    """The most bytes of tensor storage that ``fn``'s torch ops (CPU) hold alive at once, the
    ``existing`` tensors' storage not counted (a dispatch mode sees each op's outputs; a weak
    reference to each tells when it is freed)."""
    import weakref
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    skip = {t.untyped_storage().data_ptr() for t in existing}
    live, state = {}, {"now": 0, "peak": 0}

    def free(key):
        n, count = live[key]
        if count == 1:
            del live[key]
            state["now"] -= n
        else:
            live[key] = (n, count - 1)

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if key in skip or n == 0:
                    continue
                if key in live:
                    live[key] = (live[key][0], live[key][1] + 1)
                else:
                    live[key] = (n, 1)
                    state["now"] += n
                    state["peak"] = max(state["peak"], state["now"])
                weakref.finalize(t, free, key)
            return out
    with Track():
        fn()
    return state["peak"]


@pytest.mark.parametrize("dims, rows, h", [((128, 32, 32), 64, 8), ((64, 64, 64), 64, 4)],
                         ids=["mosi widths, rows 8x H", "64^3, rows 16x H"])
def test_tfn_gpu_implementation_peak_memory_under_a_tenth_of_eager(dims, rows, h):
    # the GPU path (triton backend: the forward, then the backward from the inputs, as the op runs
    # them) against eager autograd through the materialised outer product, fwd+bwd, at the headline
    # cases' proportions of batch to H; the blocked path's results are checked by the other tests
    from mmkernels.ops.tensor_fusion import triton as tfn_triton
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(rows, d, generator=g).requires_grad_() for d in dims]
    w = (torch.randn(h, fused_width(dims), generator=g) * 0.01).requires_grad_()
    b = torch.randn(h, generator=g).requires_grad_()
    dy = torch.randn(rows, h, generator=g)

    def gpu_path():
        with torch.no_grad():
            return tfn_triton.forward(xs, w, b), tfn_triton.backward(dy, xs, w, b)
    eager = _peak_bytes(lambda: torch.autograd.grad(tensor_fusion_ref(xs, w, b), [*xs, w, b], dy), [*xs, w, b, dy])
    blocked = _peak_bytes(gpu_path, [*xs, w, b, dy])
    outer = rows * fused_width(dims) * 4
    assert eager >= 2 * outer                      # the product and its gradient, at least
    assert blocked <= eager / 10, (blocked, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(3, 5), (4, 2, 6), (2, 3, 2, 5)])
def test_lmf_matches_reference(backend, dims):
    for dtype in _dtypes(backend):
        check_lmf(backend, dims, 3, 5, (7,), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lmf_odd_views_leading_dims_defaults(backend):
    check_lmf(backend, (19, 3), 2, 21, (2, 5), _dtypes(backend)[0], weights=False, bias=False, view=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lmf_empty_batch(backend):
    check_lmf(backend, (3, 4), 2, 5, (0,), _dtypes(backend)[0])


@pytest.mark.parametrize("dims", [(5,), (3, 2, 4, 2, 3)], ids=["1 modality", "5 modalities"])
def test_lmf_modality_counts(dims):
    # the gemm design takes any number of modalities (one GEMM each, the product over a stacked
    # [M, rows, R·H] buffer); the fused kernels have slots for 2 to 4: other counts are refused with
    # the reason whichever pass runs 'fused' (never computed wrong), and auto moves on
    for dtype in TRITON_DTYPES:
        check_lmf("triton", dims, 2, 5, (6,), dtype)
    xs, fs, rw, lb = lmf_case(dims, 2, 5, (6,), torch.float32, TRITON_DEVICE)
    reason = "1 modality < 2" if len(dims) == 1 else "5 modalities > 4"
    for fwd, bwd in _lmf_designs("triton"):
        if "fused" not in (fwd, bwd):
            continue
        slots = " and ".join(s for s, n in ((lmf_triton.FWD_SLOT, fwd), (lmf_triton.BWD_SLOT, bwd)) if n == "fused")
        with candidates.use(lmf_triton.FWD_SLOT, fwd), candidates.use(lmf_triton.BWD_SLOT, bwd):
            with pytest.raises(mmkernels.BackendError, match=f"{reason} \\(the 'fused' candidate of {slots} has"):
                mmkernels.low_rank_fusion(xs, fs, rw, lb, backend="triton")
            for backend in ("auto", "reference"):
                torch.testing.assert_close(mmkernels.low_rank_fusion(xs, fs, rw, lb, backend=backend),
                                           low_rank_fusion_ref(xs, fs, rw, lb))


def test_lmf_gemm_design_one_gemm_per_modality_and_pass():
    # the gemm candidate's calls, counted on CPU tensors (the GPU's calls are the same torch ops):
    # forward one addmm per modality (all ranks, the leading-1 row as its bias) and one Triton launch;
    # backward the projections again, one launch, then dx and dF as one GEMM each per modality
    from mmkernels import runtime
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    dims, r, h, rows = (6, 3, 5), 4, 7, 9
    xs, fs, w, b = lmf_case(dims, r, h, (rows,), torch.float32, "cpu")
    dy = torch.randn(rows, h)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.addmm.default, aten.addmm.out, aten.mm.default, aten.mm.out, aten.bmm.default):
                seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))
    with torch.no_grad(), candidates.use(lmf_triton.FWD_SLOT, "gemm"), candidates.use(lmf_triton.BWD_SLOT, "gemm"):
        with runtime.capture_launches() as launches, Record():
            lmf_triton.forward(xs, fs, w, b)
        assert seen == ["addmm"] * 3 and [k.fn.__name__ for k, _, _ in launches] == ["_lmf_prod_kernel"]
        seen.clear()
        with runtime.capture_launches() as launches, Record():
            lmf_triton.backward(dy, xs, fs, w, b)
        assert seen == ["addmm"] * 3 + ["mm", "mm"] * 3 and \
            [k.fn.__name__ for k, _, _ in launches] == ["_lmf_grad_kernel"]


@settings(max_examples=6, deadline=None)
@given(dims=st.lists(st.integers(1, 9), min_size=2, max_size=3), h=st.integers(1, 20), rows=st.integers(0, 20))
def test_tfn_triton_hypothesis(dims, h, rows):
    check_tfn("triton", tuple(dims), h, (rows,), torch.float32)


@settings(max_examples=6, deadline=None)
@given(dims=st.lists(st.integers(1, 20), min_size=2, max_size=4), r=st.integers(1, 4), h=st.integers(1, 20),
       rows=st.integers(0, 20))
def test_lmf_triton_hypothesis(dims, r, h, rows):
    check_lmf("triton", tuple(dims), r, h, (rows,), torch.float32)


# --- torch.compile runs through both ops (on CPU tensors with auto: their plain operations) -------

def test_compile_fullgraph():
    xs, w, b = tfn_case((3, 4), 5, (6,), torch.float32, "cpu")
    f = torch.compile(lambda a, c: mmkernels.tensor_fusion([a, c], w, b), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(*xs), tensor_fusion_ref(xs, w, b))
    xs, fs, rw, lb = lmf_case((3, 4), 2, 5, (6,), torch.float32, "cpu")
    g = torch.compile(lambda a, c: mmkernels.low_rank_fusion([a, c], fs, rw, lb), fullgraph=True, backend="eager")
    out = g(*xs)
    torch.testing.assert_close(out, low_rank_fusion_ref(xs, fs, rw, lb))
    out.sum().backward()
    assert xs[0].grad is not None and fs[0].grad is not None


# --- bad input: one ValueError naming the argument ------------------------------------------------

def test_tfn_bad_input():
    x = torch.randn(4, 3)
    w = torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"^xs: expected 2 to 4"):
        mmkernels.tensor_fusion([x], torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^xs: expected 2 to 4"):
        mmkernels.tensor_fusion([x] * 5, w)
    with pytest.raises(ValueError, match=r"^weight: expected shape \[H, 16\].*\(3\+1\) \* \(3\+1\)"):
        mmkernels.tensor_fusion([x, x], torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"^xs\[1\]: expected dtype"):
        mmkernels.tensor_fusion([x, x.double()], w)
    with pytest.raises(ValueError, match=r"^weight: expected dtype"):
        mmkernels.tensor_fusion([x, x], w.double())
    with pytest.raises(ValueError, match=r"^bias: expected shape \(2,\)"):
        mmkernels.tensor_fusion([x, x], w, torch.randn(3))
    with pytest.raises(ValueError, match=r"^xs\[1\]: expected leading dims"):
        mmkernels.tensor_fusion([x, torch.randn(5, 3)], w)


def test_lmf_bad_input():
    x = torch.randn(4, 3)
    f = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"^factors: expected a list of 2"):
        mmkernels.low_rank_fusion([x, x], [f])
    with pytest.raises(ValueError, match=r"^factors\[1\]: expected shape \[R, 4, H\]"):
        mmkernels.low_rank_fusion([x, x], [f, torch.randn(2, 3, 5)])
    with pytest.raises(ValueError, match=r"^factors\[1\]: expected rank 2 and H 5"):
        mmkernels.low_rank_fusion([x, x], [f, torch.randn(2, 4, 6)])
    with pytest.raises(ValueError, match=r"^factors\[1\]: expected dtype"):
        mmkernels.low_rank_fusion([x, x], [f, f.double()])
    with pytest.raises(ValueError, match=r"^rank_weights: expected shape \(2,\)"):
        mmkernels.low_rank_fusion([x, x], [f, f], torch.randn(3))
    with pytest.raises(ValueError, match=r"^bias: expected shape \(5,\)"):
        mmkernels.low_rank_fusion([x, x], [f, f], None, torch.randn(4))


# --- layers ---------------------------------------------------------------------------------------

def test_tensor_fusion_layer_loads_the_linear_over_the_outer_product():
    dims = (3, 2, 4)
    lin = torch.nn.Linear(fused_width(dims), 6)
    layer = mmkernels.nn.TensorFusion(dims, 6)
    layer.load_state_dict(lin.state_dict())
    xs = [torch.randn(5, d) for d in dims]
    z = [torch.cat([torch.ones(5, 1), x], -1) for x in xs]
    torch.testing.assert_close(layer(xs), lin(torch.einsum("bi,bj,bk->bijk", *z).flatten(1)))
    lin.load_state_dict(layer.state_dict())  # and the other way round
    with pytest.raises(ValueError, match=r"^dims: expected 2 to 4"):
        mmkernels.nn.TensorFusion((3,), 6)


class _OfficialLMF(torch.nn.Module):
    """The fusion part of the official LMF repository's module (its parameter names, shapes and
    forward), the sub-networks left out."""

    def __init__(self, audio, video, text, out, rank):
        super().__init__()
        p = torch.nn.Parameter
        self.audio_factor = p(torch.randn(rank, audio + 1, out) * 0.3)
        self.video_factor = p(torch.randn(rank, video + 1, out) * 0.3)
        self.text_factor = p(torch.randn(rank, text + 1, out) * 0.3)
        self.fusion_weights = p(torch.randn(1, rank))
        self.fusion_bias = p(torch.randn(1, out))

    def forward(self, a, v, t):
        one = lambda x: torch.cat([torch.ones(x.shape[0], 1), x], 1)
        zy = (torch.matmul(one(a), self.audio_factor) * torch.matmul(one(v), self.video_factor)
              * torch.matmul(one(t), self.text_factor))
        return torch.matmul(self.fusion_weights, zy.permute(1, 0, 2)).squeeze(1) + self.fusion_bias


def test_low_rank_fusion_layer_loads_the_official_state_dict():
    off = _OfficialLMF(4, 3, 6, 5, 2)
    layer = mmkernels.nn.LowRankFusion((4, 3, 6), 5, 2)
    layer.load_state_dict(mmkernels.nn.lmf_state_dict_from_official(off.state_dict()))
    a, v, t = torch.randn(7, 4), torch.randn(7, 3), torch.randn(7, 6)
    torch.testing.assert_close(layer([a, v, t]), off(a, v, t))
    assert {k for k, _ in layer.named_parameters()} == {"factors.0", "factors.1", "factors.2", "rank_weights", "bias"}
    with pytest.raises(ValueError, match=r"^state_dict: expected key 'text_factor'"):
        mmkernels.nn.lmf_state_dict_from_official({k: v for k, v in off.state_dict().items() if k != "text_factor"})
    with pytest.raises(ValueError, match=r"^rank: expected a positive int"):
        mmkernels.nn.LowRankFusion((4, 3), 5, 0)


def test_layers_train_under_compile():
    tf = mmkernels.nn.TensorFusion((3, 4), 5)
    lf = mmkernels.nn.LowRankFusion((3, 4), 5, 2)
    xs = [torch.randn(6, 3), torch.randn(6, 4)]
    for layer in (tf, lf):
        f = torch.compile(layer, fullgraph=True, backend="eager")
        f(xs).square().sum().backward()
        assert all(p.grad is not None for p in layer.parameters())
