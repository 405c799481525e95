"""concat_linear: the spec is ``act(F.linear(torch.cat(xs, -1), weight, bias))``; every backend must
match it forward and backward for every activation, on odd sizes, views, empty batches, split-K
weight gradients — and reject bad input early."""
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import mmkernels
from mmkernels import candidates
from mmkernels.ops.concat_linear import triton as tri
from mmkernels.ops.concat_linear import vendor
from mmkernels.ops.concat_linear.reference import ACT_FNS, concat_linear_ref
from mmkernels.testing import assert_close

from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_DTYPES

ACTS = [None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"]


@pytest.fixture(params=candidates.SLOTS[tri.FWD_SLOT], ids=lambda c: f"fwd={c}")
def fwd_candidate(request):
    """The tests that run the forward run under each of its candidates (the GPU check's tournament
    picks one per GPU): the in-place Triton GEMM and the copy + vendor GEMM."""
    with candidates.use(tri.FWD_SLOT, request.param):
        yield request.param


FWD = pytest.mark.usefixtures("fwd_candidate")


def make(dims, n, lead, dtype, device, bias=True):
    k = sum(dims)
    xs = [torch.randn(*lead, d, dtype=dtype, device=device).requires_grad_() for d in dims]
    w = (torch.randn(n, k, dtype=dtype, device=device) * k ** -0.5).requires_grad_()
    b = torch.randn(n, dtype=dtype, device=device).requires_grad_() if bias else None
    return xs, w, b


def leaves(xs, w, b):
    return list(xs) + [w] + ([b] if b is not None else [])


def expected(xs, w, b, act, dy):
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    xs64, w64, b64 = [up(x) for x in xs], up(w), up(b)
    out = concat_linear_ref(xs64, w64, b64, act)
    return out, torch.autograd.grad(out, leaves(xs64, w64, b64), dy.double())


def check(backend, dims, n, lead, dtype, device, act=None, bias=True, views=None, w_view=None):
    xs, w, b = make(dims, n, lead, dtype, device, bias)
    if views is not None:
        xs = [views(x.detach()).requires_grad_() for x in xs]
    if w_view is not None:
        w = w_view(w.detach()).requires_grad_()
    dy = torch.randn(*lead, n, dtype=dtype, device=device)
    with mmkernels.use_backend(backend):
        out = mmkernels.concat_linear(xs, w, b, act)
    grads = torch.autograd.grad(out, leaves(xs, w, b), dy)
    ref, ref_grads = expected(xs, w, b, act, dy)
    assert out.dtype == dtype and out.shape == (*lead, n)
    assert_close(out, ref, dtype, f"{backend} out", scale=True)
    names = [f"dx{i}" for i in range(len(xs))] + ["dweight"] + (["dbias"] if bias else [])
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close(g, r, dtype, f"{backend} {name}", scale=True)


# --- the reference is cat + linear + activation ---------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_reference_is_cat_linear_activation(act):
    xs, w, b = make((3, 5), 4, (6,), torch.float64, "cpu")
    want = {None: lambda z: z, "relu": torch.relu, "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2 ** 0.5)),
            "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3))),
            "silu": lambda z: z * torch.sigmoid(z), "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act]
    z = torch.cat(xs, -1) @ w.T + b
    with mmkernels.use_backend("reference"):
        torch.testing.assert_close(mmkernels.concat_linear(xs, w, b, act), want(z))


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_reference_fp64(act):
    xs, w, b = make((2, 3), 3, (4,), torch.float64, "cpu")

    def f(x0, x1, w_, b_):
        with mmkernels.use_backend("reference"):
            return mmkernels.concat_linear([x0, x1], w_, b_, act)
    assert torch.autograd.gradcheck(f, (*xs, w, b))


# --- the Triton kernels against the reference -----------------------------------------------------

@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@FWD
def test_triton_matches_reference(dtype, act):
    check("triton", (40, 24, 9), 70, (50,), dtype, TRITON_DEVICE, act=act)


@pytest.mark.parametrize("dims,n,lead", [((1,), 1, (1,)), ((7, 33), 5, (13,)), ((64,), 33, (3, 5)),
                                         ((3, 1, 4, 1, 5), 9, (11,)), ((100,), 130, (2,))],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False])
@FWD
def test_triton_odd_sizes(dims, n, lead, bias):
    check("triton", dims, n, lead, torch.float32, TRITON_DEVICE, act="gelu", bias=bias)


VIEWS = {
    "column-slice": lambda x: torch.cat([x, x], -1)[..., ::2],
    "row-stride": lambda x: torch.cat([x, x], -1)[..., : x.shape[-1]],
    "transposed-lead": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
}


@pytest.mark.parametrize("view", VIEWS, ids=str)
@FWD
def test_triton_non_contiguous_inputs(view):
    check("triton", (9, 20), 12, (4, 3), torch.float32, TRITON_DEVICE, act="silu", views=VIEWS[view])


@pytest.mark.parametrize("case", [((40, 24, 9), 70, (50,), "gelu", True, None),
                                  ((7, 33), 5, (13,), "tanh", False, "column-slice"),
                                  ((5, 7), 4, (0,), None, True, None),
                                  ((9, 20), 12, (4, 3), "relu", True, "transposed-lead")],
                         ids=["gelu", "tanh-views", "empty", "relu-lead"])
@FWD
def test_triton_backward_on_vendor_gemms(monkeypatch, case):
    # on a GPU the backward's GEMMs are cuBLAS's (torch.mm); the same code on CPU tensors
    dims, n, lead, act, bias, view = case
    monkeypatch.setattr(tri, "vendor_backward", lambda t: True)
    check("triton", dims, n, lead, torch.float32, TRITON_DEVICE, act=act, bias=bias,
          views=VIEWS[view] if view else None)
    assert tri.vendor_backward(torch.empty(0))


def test_vendor_backward_only_on_gpus():
    assert not tri.vendor_backward(torch.empty(0))   # CPU tensors: the package's GEMM (interpreter, AOT capture)


@FWD
def test_triton_non_contiguous_weight_and_grad_out():
    check("triton", (9, 20), 12, (7,), torch.float32, TRITON_DEVICE, act="tanh", w_view=lambda w: w.t().contiguous().t())
    xs, w, b = make((6, 10), 5, (8,), torch.float32, TRITON_DEVICE)
    dy = torch.randn(5, 8, device=TRITON_DEVICE).t()
    with mmkernels.use_backend("triton"):
        grads = torch.autograd.grad(mmkernels.concat_linear(xs, w, b, "relu"), leaves(xs, w, b), dy)
    _, ref = expected(xs, w, b, "relu", dy)
    for g, r in zip(grads, ref):
        assert_close(g, r, torch.float32, "grad", scale=True)


def test_triton_weight_gradient_splits_k_over_many_rows():
    # few [N, D_m] output tiles and many rows: the weight gradient sums K in parallel ranges
    assert tri._split_k(8, 16, 4096, torch.device(TRITON_DEVICE)) > 1
    check("triton", (16, 8), 8, (4096,), torch.float32, TRITON_DEVICE, act="gelu")


def test_split_k_equals_one_pass(monkeypatch):
    xs, w, b = make((16, 8), 8, (2100,), torch.float32, TRITON_DEVICE)
    dy = torch.randn(2100, 8, device=TRITON_DEVICE)

    def grads():
        with mmkernels.use_backend("triton"):
            return torch.autograd.grad(mmkernels.concat_linear(xs, w, b, None), [w], dy)[0]
    monkeypatch.setattr(tri, "_split_k", lambda m, n, k, dev: 3)
    split = grads()
    monkeypatch.setattr(tri, "_split_k", lambda m, n, k, dev: 1)
    assert_close(split, grads().double(), torch.float32, "dweight split vs one pass", scale=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@FWD
def test_empty_batch(backend):
    xs, w, b = make((5, 7), 4, (0,), torch.float32, TRITON_DEVICE)
    with mmkernels.use_backend(backend):
        out = mmkernels.concat_linear(xs, w, b, "gelu")
    grads = torch.autograd.grad(out, leaves(xs, w, b), torch.zeros(0, 4, device=TRITON_DEVICE))
    assert out.shape == (0, 4)
    assert [tuple(g.shape) for g in grads] == [(0, 5), (0, 7), (4, 12), (4,)]
    assert (grads[2] == 0).all() and (grads[3] == 0).all()


def test_triton_backward_is_deterministic():
    xs, w, b = make((16, 8), 8, (3000,), torch.float32, TRITON_DEVICE)
    dy = torch.randn(3000, 8, device=TRITON_DEVICE)

    def grads():
        with mmkernels.use_backend("triton"):
            return torch.autograd.grad(mmkernels.concat_linear(xs, w, b, "silu"), leaves(xs, w, b), dy)
    for a, c in zip(grads(), grads()):
        assert torch.equal(a, c)


def test_fp32_uses_tf32_only_when_pytorch_does(tf32):
    tf32(False)
    assert tri.dot_precision(torch.float32) == "ieee"
    tf32(True)
    assert tri.dot_precision(torch.float32) == "tf32"


@given(m=st.integers(1, 4), dims=st.lists(st.integers(1, 70), min_size=4, max_size=4), n=st.integers(1, 70),
       rows=st.integers(0, 40), act=st.sampled_from(ACTS), bias=st.booleans(), dtype=st.sampled_from(TRITON_DTYPES),
       fwd=st.sampled_from(candidates.SLOTS[tri.FWD_SLOT]))
def test_triton_shape_sweep(m, dims, n, rows, act, bias, dtype, fwd):
    with candidates.use(tri.FWD_SLOT, fwd):
        check("triton", tuple(dims[:m]), n, (rows,), dtype, TRITON_DEVICE, act=act, bias=bias)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (large shapes, bf16 and autotuning on real hardware)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dims,n,rows,act", [((768, 1024, 512), 1024, 4096, "gelu"), ((4096, 300), 512, 2048, "tanh"),
                                             ((768,) * 3, 10, 16384, None), ((129, 65), 77, 999, "silu")])
@FWD
def test_gpu_large(dtype, dims, n, rows, act):
    check("triton", dims, n, (rows,), dtype, "cuda", act=act)
    check("auto", dims, n, (rows,), dtype, "cuda", act=act, bias=False)


# --- bad input: one ValueError naming the argument -----------------------------------------------

def _bad_cases():
    x, y, w = torch.randn(4, 3), torch.randn(4, 5), torch.randn(6, 8)
    return {
        "empty list": (dict(xs=[], weight=w), r"xs: expected a non-empty list"),
        "tensor not list": (dict(xs=x, weight=w), r"xs: expected a non-empty list"),
        "leading dims": (dict(xs=[x, torch.randn(3, 5)], weight=w), r"xs\[1\]: expected leading dims \(4,\)"),
        "int dtype": (dict(xs=[x, y.int()], weight=w), r"xs\[1\]: expected a floating dtype"),
        "mixed dtype": (dict(xs=[x, y.half()], weight=w), r"xs\[1\]: expected dtype torch.float32"),
        "weight width": (dict(xs=[x, y], weight=torch.randn(6, 9)), r"weight: expected shape \[N, 8\]"),
        "weight rank": (dict(xs=[x, y], weight=torch.randn(8)), r"weight: expected shape \[N, 8\]"),
        "weight dtype": (dict(xs=[x, y], weight=w.half()), r"weight: expected dtype torch.float32"),
        "weight device": (dict(xs=[x, y], weight=w.to("meta")), r"weight: expected device cpu"),
        "bias shape": (dict(xs=[x, y], weight=w, bias=torch.randn(5)), r"bias: expected shape \(6,\)"),
        "bias dtype": (dict(xs=[x, y], weight=w, bias=torch.randn(6).double()), r"bias: expected dtype torch.float32"),
        "activation": (dict(xs=[x, y], weight=w, activation="swish"), r"activation: expected one of"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error(case):
    kwargs, pattern = _bad_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        mmkernels.concat_linear(**kwargs)


def test_untuned_launch_keeps_one_fitting_configuration_per_kind():
    # MMKERNELS_AUTOTUNE=0 and CUDA-graph capture launch the pruning's one choice among the
    # untuned configurations, whatever the autotune list is
    k = tri._concat_linear_gemm_kernel
    configs = tri._configs(interpret=False, autotune=False)
    assert len(configs) == 7, configs
    c = torch.empty(8, 8)
    # (precision, activation, N, operand bytes) -> the tile width the one configuration must have
    for prec, act, n, e, bn in [("tf32", "none", 1024, 2, 128), ("tf32", "gelu", 10, 2, 32), ("ieee", "none", 64, 4, 64),
                                ("tf32", "none", 1024, 4, 64)]:
        (kept,) = tri._prune(configs, dict(N=n, M=4096, C_ALIGNED=1, C=c, ELEM_BYTES=e), DOT_PREC=prec, ACT=act,
                             UNTUNED=True)
        assert kept.kwargs["BN"] == bn, (prec, act, n, e, kept)
        assert tri._smem(kept, e) <= tri.SMEM_BUDGET, (prec, act, n, e, kept)
        assert (kept.kwargs["BK"] == 32) == (prec == "ieee")
    assert [str(c) for c in k.untuned_configs] == [str(c) for c in tri._configs(autotune=False)]


def test_autotune_key_covers_everything_the_pruning_reads():
    # a choice cached for aligned output rows must not be reused for unaligned ones (the pruning
    # caps accumulators there), nor across activations
    import inspect
    key = set(tri._concat_linear_gemm_kernel.keys)
    read = set(re.findall(r'nargs\["(\w+)"\]', inspect.getsource(tri._prune)))
    read |= set(re.findall(r'meta\.get\("(\w+)"', inspect.getsource(tri._prune)))
    read -= {"UNTUNED", "C", "M", "N"}  # set by the untuned launch only; C's dtype, M and N by their buckets
    assert read <= key, read - key


@FWD
def test_more_inputs_than_descriptor_slots():
    # past MAX_SEGMENTS inputs the last descriptor slot takes the remaining ones concatenated
    dims = tuple(range(3, 3 + tri.MAX_SEGMENTS + 3))
    check("triton", dims, 9, (5,), torch.float32, TRITON_DEVICE, act="gelu")


def test_every_tensor_core_configuration_fits_shared_memory_for_16_bit_types():
    # fp32 (TF32) configurations that do not fit are pruned per problem; 16-bit ones must all fit
    for autotune in (True, False):
        configs = [c for c in tri._configs(interpret=False, autotune=autotune) if c.kwargs["BK"] != 32]
        assert configs and all(tri._smem(c, 2) <= tri.SMEM_BUDGET for c in configs)


@FWD
def test_triton_strided_bias_and_expanded_inputs():
    xs, w, _ = make((8, 16), 6, (5,), torch.float32, TRITON_DEVICE)
    b = torch.randn(6, 2, device=TRITON_DEVICE)[:, 0].requires_grad_()       # stride 2
    row = torch.randn(1, 8, device=TRITON_DEVICE).expand(5, 8).requires_grad_()  # row stride 0
    xs = [row, xs[1]]
    dy = torch.randn(5, 6, device=TRITON_DEVICE)
    with mmkernels.use_backend("triton"):
        out = mmkernels.concat_linear(xs, w, b, "silu")
    grads = torch.autograd.grad(out, leaves(xs, w, b), dy)
    ref, ref_grads = expected(xs, w, b, "silu", dy)
    assert_close(out, ref, torch.float32, "out", scale=True)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad", scale=True)


@pytest.mark.parametrize("lead", [(), (1,), (1, 1)])
def test_single_row_backward_returns_separate_gradients(lead):
    # the reference's gradients of one row are slices of one tensor: the op must not return aliases
    xs, w, b = make((8, 16), 4, lead, torch.float32, "cpu")
    out = mmkernels.concat_linear(xs, w, b)
    grads = torch.autograd.grad(out.sum(), leaves(xs, w, b))
    _, ref = expected(xs, w, b, None, torch.ones_like(out))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r)


@pytest.mark.gpu
@pytest.mark.gpu_configs
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (every autotune configuration, bf16, on real hardware)")
def test_gpu_every_autotune_configuration_matches_reference(monkeypatch):
    # The autotuner may pick any configuration: each must be right forward and backward, not only
    # the one-per-kind choice the other GPU tests run (gpu_check runs them with autotuning off).
    from mmkernels import runtime
    monkeypatch.setattr(runtime, "AUTOTUNE", False)  # launch the pruning's choice, patched to each config below
    for config in tri._configs(interpret=False, autotune=True):
        monkeypatch.setattr(tri._concat_linear_gemm_kernel, "early_config_prune",
                            lambda configs, nargs, c=config, **meta: [c])
        check("triton", (96, 40), 70, (300,), torch.bfloat16, "cuda", act="gelu")


# --- the cublas candidate: one copy into a reused aligned buffer, then the vendor GEMM -------------

def _vendor_call(xs, w, b, act):
    with candidates.use(tri.FWD_SLOT, "cublas"), mmkernels.use_backend("triton"):
        return mmkernels.concat_linear(xs, w, b, act)


def test_cublas_candidate_reuses_its_buffer_but_never_one_still_referenced():
    vendor.clear()
    vendor.stats.clear()
    xs, w, b = make((40, 24), 16, (32,), torch.float32, TRITON_DEVICE)
    with torch.no_grad():
        first = _vendor_call(xs, w, b, "tanh")
        kept = first.clone()
        second = _vendor_call([x * 2 for x in xs], w, b, "tanh")
    assert vendor.stats == {"buffers made": 1, "buffers reused": 1}
    assert torch.equal(first, kept)                       # the second call wrote its own output
    (buf,) = vendor._buffers.values()
    held = buf[:, :8]                                     # a view still alive: that buffer is not reused
    with torch.no_grad():
        third = _vendor_call(xs, w, b, "tanh")
    assert vendor.stats["buffers made"] == 2 and torch.equal(held, buf[:, :8])
    del held
    assert_close(third, expected(xs, w, b, "tanh", torch.ones_like(third))[0], torch.float32, "out", scale=True)
    twice = [(x * 2).detach().requires_grad_() for x in xs]
    assert_close(second, expected(twice, w, b, "tanh", torch.ones_like(second))[0], torch.float32, "out", scale=True)
    with torch.no_grad():
        for _ in range(vendor.MAX_BUFFERS + 2):           # more shapes than the cache keeps
            _vendor_call([x[: 1 + len(vendor._buffers)] for x in xs], w, b, None)
    assert len(vendor._buffers) == vendor.MAX_BUFFERS


def test_cublas_candidate_pads_unaligned_rows_with_zeros():
    # K = 3 + 5 = 8 fp32 is aligned; 3 + 6 = 9 is not: a [rows, 12] buffer whose last columns are
    # zero (garbage there would reach the output through the padded weight's zero columns: NaN * 0)
    vendor.clear()
    vendor.stats.clear()
    assert vendor.padded_width(9, 4) == 12 and vendor.padded_width(4396, 2) == 4400 and vendor.padded_width(8, 4) == 8
    xs, w, b = make((3, 6), 5, (7,), torch.float32, TRITON_DEVICE)
    buf = vendor.concat_buffer(7, 9, 12, torch.float32, torch.device(TRITON_DEVICE))
    buf.fill_(float("nan"))
    buf[:, 9:].zero_()
    del buf
    def check_out():
        want = expected(xs, w, b, "gelu", torch.ones(7, 5, device=TRITON_DEVICE))[0]
        with torch.no_grad():
            assert_close(_vendor_call(xs, w, b, "gelu"), want, torch.float32, "out", scale=True)
    check_out()
    check_out()
    assert vendor.stats["weights padded"] == 1            # kept while the weight is unchanged
    with torch.no_grad():
        w.mul_(-1.0)                                      # an in-place update: a new padded copy
    check_out()
    assert vendor.stats["weights padded"] == 2
    (buf,) = vendor._buffers.values()
    assert buf.shape == (7, 12) and (buf[:, 9:] == 0).all()


@pytest.mark.parametrize("act", ACTS)
def test_cublas_candidate_returns_what_the_backward_needs(act):
    # z, the pre-activation, for the activations whose derivative needs it; else an empty tensor
    xs, w, b = make((16, 8), 12, (9,), torch.float32, TRITON_DEVICE)
    with torch.no_grad():
        out, z = vendor.forward(xs, w, b, act)
        ref_z = F.linear(torch.cat(xs, -1), w, b)
    assert_close(out, ACT_FNS[act](ref_z).double(), torch.float32, "out", scale=True)
    if act in tri.NEEDS_Z:
        assert_close(z, ref_z.double(), torch.float32, "z", scale=True)
    else:
        assert z.numel() == 0


# shared memory a block may use per chip class (bytes): A100; RTX 30/40, L4, RTX 50; H100/H200, B200
CHIP_SMEM = {"sm_80": 166912, "sm_86/89/120": 101376, "sm_90/100": 232448}


@pytest.mark.parametrize("chip", CHIP_SMEM)
def test_tiles_fit_each_chip_class_and_the_untuned_one_suits_it(monkeypatch, chip):
    budget = CHIP_SMEM[chip] - tri.SMEM_RESERVE
    monkeypatch.setattr(tri, "smem_budget", lambda device: budget)
    arch = {"sm_80": 80, "sm_86/89/120": 86, "sm_90/100": 90}[chip]
    monkeypatch.setattr(tri, "chip_arch", lambda device: arch)
    c = torch.empty(8, 8)
    for autotune in (True, False):
        configs = tri._configs(interpret=False, autotune=autotune)
        for prec, e in [("tf32", 2), ("tf32", 4), ("ieee", 4)]:
            for n, act in [(1024, "none"), (512, "gelu"), (10, "none")]:
                nargs = dict(N=n, M=8192, C_ALIGNED=1, C=c, ELEM_BYTES=e)
                kept = tri._prune(configs, nargs, DOT_PREC=prec, ACT=act, UNTUNED=not autotune)
                assert kept and all(tri._smem(k, e) <= budget for k in kept), (chip, autotune, prec, e, n, kept)
                if budget >= 128 * 1024:     # deep pipelines fit: no 2-stage tile
                    assert all(k.num_stages >= 3 for k in kept), (chip, kept)
                if arch < 90:                # register-staged plain loads: no 256-deep K tile, <= 64 accumulators
                    assert all(k.kwargs["BK"] <= 128 and tri._acc_per_thread(k) <= 64 for k in kept), (chip, kept)
    # the untuned choice for a wide bf16 layer: 128 x 128 in 4 stages where they fit, else 128 x 64
    # in 3 (the tiles that compiled without spills for sm_86)
    (one,) = tri._prune(tri._configs(interpret=False, autotune=False),
                        dict(N=1024, M=8192, C_ALIGNED=1, C=c, ELEM_BYTES=2), DOT_PREC="tf32", ACT="gelu", UNTUNED=True)
    want = (128, 64, 3) if budget < 128 * 1024 else (128, 128, 4)
    assert (one.kwargs["BM"], one.kwargs["BN"], one.num_stages) == want
