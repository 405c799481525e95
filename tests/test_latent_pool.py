"""latent_pool: the spec is ``softmax_n(scale * <query, x_n + pos_n> + bias_n)`` pooling of the
valid tokens by full-width queries; every backend matches a float64 reference forward and
backward — shared and per-sample queries, lengths, biases (0 / finfo.min / -inf masks), positional
embeddings, odd widths, views, empty rows and batches — and bad input is rejected early."""
import pytest
import torch
from hypothesis import given, strategies as st

import mmkernels
from mmkernels import candidates
from mmkernels.ops.latent_pool import triton as tri
from mmkernels.testing import assert_close

from conftest import TRITON_DEVICE, TRITON_DTYPES

BACKENDS = ["reference", "triton", "auto"]


@pytest.fixture(autouse=True, scope="module", params=candidates.SLOTS[tri.BWD_SLOT], ids=lambda c: f"bwd={c}")
def bwd_candidate(request):
    """Every test runs under each candidate of the Triton backward (the GPU check's tournament
    picks one per GPU)."""
    with candidates.use(tri.BWD_SLOT, request.param):
        yield request.param


def make(B, N, D, Q, dtype=torch.float32, device="cpu", per_sample=False, lengths=False, bias=None, pos=False):
    x = torch.randn(B, N, D, dtype=dtype, device=device, requires_grad=True)
    q = torch.randn(*((B, Q, D) if per_sample else (Q, D)), dtype=dtype, device=device, requires_grad=True)
    ln = None
    if lengths:
        ln = torch.randint(0, N + 1, (B,), device=device)
        if B > 1:
            ln[0], ln[-1] = 0, N
    bs = None
    if bias is not None:
        bs = torch.where(torch.rand(B, N, device=device) < 0.3, bias, 0.0)
        if B > 1:
            bs[0] = bias          # one row masked everywhere
    ps = (0.5 * torch.randn(N, D, dtype=dtype, device=device)).requires_grad_() if pos else None
    return x, q, ln, bs, ps


def leaves(x, q, ps):
    return [x, q] + ([ps] if ps is not None else [])


def run(backend, x, q, ln, bs, ps, dy, scale):
    with mmkernels.use_backend(backend):
        out = mmkernels.latent_pool(x, q, ln, bias=bs, pos=ps, scale=scale)
    return out, torch.autograd.grad(out, leaves(x, q, ps), dy)


def expected(x, q, ln, bs, ps, dy, scale):
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    x64, q64, p64 = up(x), up(q), up(ps)
    return run("reference", x64, q64, ln, None if bs is None else bs.double(), p64, dy.double(), scale)


def check(backend, *shape, dtype=torch.float32, device="cpu", scale=0.2, views=None, **kw):
    x, q, ln, bs, ps = make(*shape, dtype=dtype, device=device, **kw)
    if views is not None:
        x = views(x.detach()).requires_grad_()
    dy = torch.randn(x.shape[0], q.shape[-2], x.shape[2], dtype=dtype, device=device)
    out, grads = run(backend, x, q, ln, bs, ps, dy, scale)
    ref, ref_grads = expected(x, q, ln, bs, ps, dy, scale)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, f"{backend} out")
    for name, g, r in zip(["dx", "dquery", "dpos"], grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"{backend} {name}", scale=True)
    return out, grads


def naive(x, q, lengths, bias, pos, scale):
    """Loop over rows with F.softmax: the definition written the obvious way."""
    outs = []
    for b in range(x.shape[0]):
        n = x.shape[1] if lengths is None else int(lengths[b])
        xb = x[b, :n] + (0 if pos is None else pos[:n])
        qb = q if q.dim() == 2 else q[b]
        s = scale * qb @ xb.T + (0 if bias is None else bias[b, :n])
        outs.append(torch.softmax(s, -1) @ xb if n else torch.zeros(qb.shape[0], x.shape[2], dtype=x.dtype))
    return torch.stack(outs)


def test_reference_is_the_definition():
    x, q, ln, bs, ps = make(4, 9, 12, 3, dtype=torch.float64, lengths=True, bias=-1e4, pos=True)
    bs[0] = 0  # the naive loop gives NaN for a row masked everywhere
    out = mmkernels.latent_pool(x, q, ln, bias=bs, pos=ps, scale=0.7, backend="reference")
    torch.testing.assert_close(out, naive(x, q, ln, bs, ps, 0.7))
    assert (out[0] == 0).all()  # length 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(), dict(lengths=True), dict(per_sample=True, pos=True),
                                dict(bias=float("-inf"), pos=True), dict(lengths=True, bias=-3.0e38)],
                         ids=["plain", "lengths", "per-sample+pos", "-inf-bias+pos", "lengths+finfo.min"])
def test_matches_reference_fp32(backend, kw):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    check(backend, 3, 37, 70, 5, device=device, **kw)


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_dtypes_q64_odd_width(dtype):
    check("triton", 2, 21, 100, 64, dtype=dtype, device=TRITON_DEVICE, lengths=True, pos=True, scale=0.1)


# The Triton forward's token plans (BLOCK_N, splits): one split over several blocks (the running sum
# in the fp32 slot, written out at the last block), several splits and the combine kernel, one
# block per split. The default shapes above take one block (N < BLOCK_N) or splits (small B).
PLANS = [(16, 1), (16, 2), (16, 4)]


def _plan(monkeypatch, block_n, splits):
    from mmkernels.ops.latent_pool import triton as impl
    monkeypatch.setattr(impl, "FWD_BLOCK_N", block_n)
    monkeypatch.setattr(impl, "FWD_SPLITS", splits)
    return impl


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"bn{p[0]}-s{p[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_forward_plans(monkeypatch, plan, dtype):
    impl = _plan(monkeypatch, *plan)
    bn, tokens, splits = impl._fwd_plan(3, 53, dtype, torch.device(TRITON_DEVICE))
    assert (bn, splits) == (16, min(plan[1], 4)) and tokens == 64 // splits
    check("triton", 3, 53, 40, 5, dtype=dtype, device=TRITON_DEVICE, lengths=True, bias=float("-inf"), pos=True,
          per_sample=dtype == torch.float16)
    check("triton", 3, 53, 24, 3, dtype=dtype, device=TRITON_DEVICE, bias=-30.0)
    check("triton", 3, 53, 24, 3, dtype=dtype, device=TRITON_DEVICE, lengths=True, bias=-3.0e38)


@pytest.mark.parametrize("candidate,splits", [("one_per_sm", (1, 3, 12)), ("four_per_sm", (3, 6, 12))])
def test_triton_forward_candidates_plan_their_splits_and_match_the_reference(candidate, splits):
    """The token plan's candidates (the GPU check's tournament picks one per GPU): one or four
    programs per SM over the batch (132 SMs stand for a GPU off it), at most one split per block."""
    from mmkernels import candidates
    from mmkernels.ops.latent_pool import triton as impl
    with candidates.use(impl.FWD_SLOT, candidate):
        got = tuple(impl._fwd_plan(b, 729, torch.bfloat16, torch.device("cpu"))[2] for b in (256, 64, 4))
        assert got == splits
        check("triton", 4, 53, 40, 5, dtype=torch.float32, device=TRITON_DEVICE, lengths=True, pos=True)
        check("triton", 2, 77, 24, 3, dtype=torch.float16, device=TRITON_DEVICE, bias=-30.0, per_sample=True)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"bn{p[0]}-s{p[1]}")
def test_triton_forward_plans_masked_blocks_and_splits(monkeypatch, plan):
    """Whole blocks (and splits) with no valid token, before and after live ones: they weigh
    nothing; a row with none gives zeros and statistics (m, log2 l) of -inf."""
    impl = _plan(monkeypatch, *plan)
    x = torch.randn(3, 64, 24, device=TRITON_DEVICE)
    q = torch.randn(1, 4, 24, device=TRITON_DEVICE)
    bias = torch.zeros(3, 64, device=TRITON_DEVICE)
    bias[0] = float("-inf")
    bias[1, :40] = float("-inf")
    bias[2, 20:] = float("-inf")
    ln = torch.tensor([64, 64, 50], device=TRITON_DEVICE)
    from mmkernels.ops.latent_pool.reference import latent_pool_ref
    out, stats = impl.forward(x, q, ln, bias, None, 0.3)
    ref, ref_stats = latent_pool_ref(x.double(), q.double(), ln, bias.double(), None, 0.3)
    assert stats.shape == ref_stats.shape == (3, 4, 2)
    assert (out[0] == 0).all() and torch.isneginf(stats[0]).all() and torch.isfinite(stats[1:]).all()
    assert torch.isneginf(ref_stats[0]).all()
    assert_close(out, ref, torch.float32, "out")
    assert_close(stats[1:].sum(-1), ref_stats[1:].sum(-1), torch.float32, "log-sum-exp (log2)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_masked_rows_give_zeros_and_zero_gradients(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, q, _, _, ps = make(3, 8, 16, 2, device=device, pos=True)
    ln = torch.tensor([0, 8, 3], device=device)
    bias = torch.zeros(3, 8, device=device)
    bias[1] = float("-inf")
    with mmkernels.use_backend(backend):
        out = mmkernels.latent_pool(x, q, ln, bias=bias, pos=ps)
    dx, = torch.autograd.grad(out.sum(), [x])
    assert (out[:2] == 0).all() and (dx[:2] == 0).all() and (dx[2, 3:] == 0).all()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_finfo_min_mask_averages_uniformly_as_softmax_does(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(2, 6, 16, device=device)
    q = torch.randn(3, 16, device=device)
    bias = torch.full((2, 6), torch.finfo(torch.float32).min, device=device)
    out = mmkernels.latent_pool(x, q, bias=bias, backend=backend)
    torch.testing.assert_close(out, x.mean(1, keepdim=True).expand(2, 3, 16), atol=1e-5, rtol=1e-5)


# (backend, FWD_BLOCK_N, FWD_SPLITS): Triton's default plan for B = 4 (several splits and the
# combine kernel), one block, one split over several blocks, three splits; the CPU path
FINFO_PLANS = [("triton", None, None), ("triton", 64, 1), ("triton", 16, 1), ("triton", 16, 3), ("auto", None, None)]


@pytest.mark.parametrize("backend, block_n, splits", FINFO_PLANS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finfo_min_rows_gradients_match_softmax(monkeypatch, backend, block_n, splits, dtype):
    """Rows whose valid tokens are all finfo.min-masked average uniformly, and their gradients are
    autograd's through ``softmax(s + finfo.min)`` (p = 1 / n, not 1): the saved statistics keep m
    (the clamped floor, about -1.44e38) and log2 l apart, since their sum in fp32 loses log2 l.
    Rows: finfo.min everywhere, a 0 / finfo.min mix, -inf everywhere (zeros, zero gradients),
    finfo.min everywhere with lengths (uniform over the valid tokens)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    impl = _plan(monkeypatch, block_n, splits)
    B, N, D, Q = 4, 37, 24, 3
    fmin = torch.finfo(torch.float32).min
    bias = torch.zeros(B, N, device=device)
    bias[0] = fmin
    bias[1] = torch.where(torch.rand(N, device=device) < 0.5, fmin, 0.0)
    bias[2] = float("-inf")
    bias[3] = fmin
    for ln in (None, torch.tensor([N, N, N, 20], device=device)):
        x = torch.randn(B, N, D, dtype=dtype, device=device, requires_grad=True)
        q = torch.randn(Q, D, dtype=dtype, device=device, requires_grad=True)
        ps = (0.5 * torch.randn(N, D, dtype=dtype, device=device)).requires_grad_()
        dy = torch.randn(B, Q, D, dtype=dtype, device=device)
        out, grads = run(backend, x, q, ln, bias, ps, dy, 0.2)
        ref, ref_grads = expected(x, q, ln, bias, ps, dy, 0.2)
        assert_close(out, ref, dtype, f"{backend} out")
        for name, g, r in zip(["dx", "dquery", "dpos"], grads, ref_grads):
            assert_close(g, r, dtype, f"{backend} {name}", scale=True)
        assert (out[2] == 0).all() and (grads[0][2] == 0).all()
        n = N if ln is None else 20
        xp = (x + ps).detach().float()
        torch.testing.assert_close(out[3].float(), xp[3, :n].mean(0).expand(Q, D), atol=2e-3, rtol=2e-3)
        if backend == "triton":
            _, stats = impl.forward(x.detach(), q.detach()[None], ln, bias, ps.detach(), 0.2)
            assert torch.isneginf(stats[2]).all()
            torch.testing.assert_close(stats[3, :, 1], torch.full((Q,), float(n), device=device).log2())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_padding_never_leaks(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(2, 10, 24, device=device)
    x[0, 4:] = float("nan")
    x.requires_grad_()
    q = torch.randn(2, 24, device=device, requires_grad=True)
    out = mmkernels.latent_pool(x, q, torch.tensor([4, 10], device=device), backend=backend)
    dx, dq = torch.autograd.grad(out.sum(), [x, q])
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and (dx[0, 4:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_views_and_vector_query(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    check(backend, 3, 11, 40, 4, device=device, views=lambda t: t.transpose(0, 1).contiguous().transpose(0, 1))
    x = torch.randn(2, 5, 8, device=device)
    out = mmkernels.latent_pool(x, torch.randn(8, device=device), backend=backend)
    assert out.shape == (2, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 5, 8, requires_grad=True)
    q = torch.randn(2, 8, requires_grad=True)
    out = mmkernels.latent_pool(x, q, backend=backend)
    assert out.shape == (0, 2, 8)
    dq, = torch.autograd.grad(out.sum(), [q])
    assert (dq == 0).all()


def test_varlen_matches_padded():
    lens = torch.tensor([3, 0, 7])
    cu = torch.zeros(4, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    x = torch.randn(int(cu[-1]), 16, dtype=torch.float64)
    q = torch.randn(2, 16, dtype=torch.float64)
    got = mmkernels.latent_pool_varlen(x, cu, q)
    pad = torch.zeros(3, 7, 16, dtype=torch.float64)
    for b in range(3):
        pad[b, :lens[b]] = x[cu[b]:cu[b + 1]]
    torch.testing.assert_close(got, mmkernels.latent_pool(pad, q, lens))


def test_gradcheck_fp64():
    x, q, ln, bs, ps = make(2, 5, 6, 3, dtype=torch.float64, lengths=True, bias=-2.0, pos=True)
    for backend in ("reference", "auto"):
        f = lambda x_, q_, p_: mmkernels.latent_pool(x_, q_, ln, bias=bs, pos=p_, scale=0.5, backend=backend)
        assert torch.autograd.gradcheck(f, (x, q, ps))


@given(B=st.integers(1, 3), N=st.integers(1, 20), D=st.integers(1, 40), Q=st.integers(1, 9),
       per_sample=st.booleans(), lengths=st.booleans(), pos=st.booleans())
def test_cpu_path_matches_reference_sweep(B, N, D, Q, per_sample, lengths, pos):
    check("auto", B, N, D, Q, per_sample=per_sample, lengths=lengths, pos=pos, bias=-5.0)


def test_compile_fullgraph_sees_the_registered_op():
    x, q, ln, bs, ps = make(2, 7, 16, 3, lengths=True, bias=-1.0, pos=True)
    f = torch.compile(lambda x_, q_, p_: mmkernels.latent_pool(x_, q_, ln, bias=bs, pos=p_), fullgraph=True,
                      backend="aot_eager")
    got = f(x, q, ps)
    want = mmkernels.latent_pool(x, q, ln, bias=bs, pos=ps, backend="reference")
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got.sum(), [x, q, ps])
    g2 = torch.autograd.grad(want.sum(), [x, q, ps])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 3)), "x: expected shape"),
    (dict(x=torch.randint(0, 3, (2, 3, 4))), "x: expected a floating"),
    (dict(query=torch.randn(2, 5)), "query: expected"),
    (dict(query=torch.randn(3, 2, 4)), "query: expected"),
    (dict(query=torch.randn(2, 4, dtype=torch.float64)), "query: expected dtype"),
    (dict(lengths=torch.tensor([1, 2, 3])), "lengths: expected shape"),
    (dict(lengths=torch.tensor([1.0, 2.0])), "lengths: expected an integer"),
    (dict(lengths=torch.tensor([1, 9])), "lengths: expected values"),
    (dict(bias=torch.zeros(2, 4)), "bias: expected shape"),
    (dict(bias=torch.zeros(2, 3, dtype=torch.int32)), "bias: expected a floating"),
    (dict(pos=torch.zeros(3, 5)), "pos: expected shape"),
    (dict(scale=float("nan")), "scale: expected"),
    (dict(query=torch.randn(0, 4)), "query: expected Q >= 1"),
])
def test_bad_input_is_one_clear_value_error(bad, match):
    args = dict(x=torch.randn(2, 3, 4), query=torch.randn(2, 4), lengths=None, bias=None, pos=None, scale=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mmkernels.latent_pool(args.pop("x"), args.pop("query"), args.pop("lengths"), **args)


def test_varlen_bad_input():
    with pytest.raises(ValueError, match="cu_seqlens"):
        mmkernels.latent_pool_varlen(torch.randn(5, 4), torch.tensor([0, 2, 4], dtype=torch.int32), torch.randn(1, 4))
    with pytest.raises(ValueError, match="max_seqlen"):
        mmkernels.latent_pool_varlen(torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32),
                                     torch.randn(1, 4), max_seqlen=2)


def test_triton_refuses_more_than_64_queries_with_its_reason():
    x = torch.randn(1, 4, 8)
    with pytest.raises(mmkernels.BackendError, match="queries"):
        mmkernels.latent_pool(x, torch.randn(65, 8), backend="triton")
