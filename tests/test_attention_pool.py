"""attention_pool: the spec is per-head ``softmax(scale * q k^T) v`` over the valid positions of each
row; every backend must match it forward and backward — padded and packed, shared and per-sample
queries, key = x or not, empty rows, NaN in padding, odd head dims, views — and reject bad input
early."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import mmkernels
from mmkernels import candidates, runtime
from mmkernels.ops.attention_pool import triton as tri
from mmkernels.ops.attention_pool.reference import attention_pool_ref, attention_pool_varlen_ref
from mmkernels.testing import assert_close

from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_DTYPES


@pytest.fixture(autouse=True, scope="module",
                params=list(zip(candidates.SLOTS[tri.FWD_SLOT], candidates.SLOTS[tri.BWD_SLOT])),
                ids=lambda c: f"fwd={c[0]},bwd={c[1]}")
def candidate(request):
    """Every test runs under each candidate of the Triton forward and backward (the GPU check's
    tournament picks one per GPU and pass): the tiled kernels, then ``short`` forward (one query per
    head over rows of at most 128 tokens) with the ``fma`` backward (one query per head); other
    shapes take the tiled kernels."""
    fwd, bwd = request.param
    with candidates.use(tri.FWD_SLOT, fwd), candidates.use(tri.BWD_SLOT, bwd):
        yield request.param


def make(B, L, H, Dh, Q=None, dtype=torch.float32, device="cpu", per_sample=False, key=False, lengths="random",
         grad=True):
    """x [B, L, H*Dh]; query [H, Dh] (Q None), [Q, H, Dh] or [B, Q, H, Dh]; lengths None / random
    (first row empty when B > 1) / full."""
    x = torch.randn(B, L, H * Dh, dtype=dtype, device=device)
    qshape = (H, Dh) if Q is None else ((B, Q, H, Dh) if per_sample else (Q, H, Dh))
    q = torch.randn(*qshape, dtype=dtype, device=device)
    k = torch.randn(B, L, H * Dh, dtype=dtype, device=device) if key else None
    ln = None
    if lengths == "random":
        ln = torch.randint(0, L + 1, (B,), device=device)
        if B > 1:
            ln[0] = 0
            ln[-1] = L
    elif lengths == "full":
        ln = torch.full((B,), L, device=device, dtype=torch.int32)
    if grad:
        for t in (x, q, k):
            if t is not None:
                t.requires_grad_()
    return x, q, ln, k


def leaves(x, q, k):
    return [x, q] + ([k] if k is not None else [])


def expected(x, q, ln, k, dy, scale=None):
    """float64 reference output and gradients."""
    up = lambda t: None if t is None else t.detach().double().requires_grad_()
    x64, q64, k64 = up(x), up(q), up(k)
    with mmkernels.use_backend("reference"):
        out = mmkernels.attention_pool(x64, q64, ln, key=k64, scale=scale)
    return out, torch.autograd.grad(out, leaves(x64, q64, k64), dy.double())


def run(backend, x, q, ln, k, dy, scale=None):
    with mmkernels.use_backend(backend):
        out = mmkernels.attention_pool(x, q, ln, key=k, scale=scale)
    return out, torch.autograd.grad(out, leaves(x, q, k), dy)


def check(backend, *args, scale=None, dtype=torch.float32, device="cpu", views=None, **kw):
    x, q, ln, k = make(*args, dtype=dtype, device=device, **kw)
    if views is not None:
        x = views(x.detach()).requires_grad_()
    out_shape = (x.shape[0], x.shape[2]) if q.dim() == 2 else (x.shape[0], q.shape[-3], x.shape[2])
    dy = torch.randn(out_shape, dtype=dtype, device=device)
    out, grads = run(backend, x, q, ln, k, dy, scale)
    ref, ref_grads = expected(x, q, ln, k, dy, scale)
    assert out.dtype == dtype and out.shape == out_shape
    assert_close(out, ref, dtype, f"{backend} out")
    for name, g, r in zip(["dx", "dquery", "dkey"], grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"{backend} {name}", scale=True)
    return out, grads


# --- the reference is multi-head softmax attention over the valid positions ----------------------

def naive(x, q, lengths, k=None, scale=None):
    """Loop over rows and heads with F.softmax: the definition, written the obvious way."""
    B, L, D = x.shape
    H, Dh = q.shape[-2:]
    q4 = q.reshape((1,) * (4 - q.dim()) + tuple(q.shape)).expand(B, -1, H, Dh)
    k = x if k is None else k
    scale = Dh ** -0.5 if scale is None else scale
    out = torch.zeros(B, q4.shape[1], D, dtype=x.dtype)
    for b in range(B):
        n = L if lengths is None else int(lengths[b])
        for h in range(H):
            if n == 0:
                continue
            sl = slice(h * Dh, (h + 1) * Dh)
            a = F.softmax(scale * q4[b, :, h] @ k[b, :n, sl].T, dim=-1)
            out[b, :, sl] = a @ x[b, :n, sl]
    return out[:, 0] if q.dim() == 2 else out


@pytest.mark.parametrize("qshape", ["shared1", "sharedQ", "per-sample"])
@pytest.mark.parametrize("with_key", [False, True])
def test_reference_is_the_definition(qshape, with_key):
    x, q, ln, k = make(4, 9, 3, 5, Q=None if qshape == "shared1" else 2, dtype=torch.float64,
                       per_sample=qshape == "per-sample", key=with_key, grad=False)
    with mmkernels.use_backend("reference"):
        got = mmkernels.attention_pool(x, q, ln, key=k, scale=0.7)
    torch.testing.assert_close(got, naive(x, q, ln, k, scale=0.7))


def test_reference_equals_sdpa_with_boolean_mask():
    x, q, ln, _ = make(5, 11, 2, 8, Q=3, dtype=torch.float64, grad=False)
    ln[0] = 4  # SDPA gives NaN for empty rows; compare on non-empty ones
    B, L, D = x.shape
    kv = x.view(B, L, 2, 8).transpose(1, 2)
    mask = (torch.arange(L)[None] < ln[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q.permute(1, 0, 2).expand(B, 2, 3, 8), kv, kv, attn_mask=mask)
    with mmkernels.use_backend("reference"):
        got = mmkernels.attention_pool(x, q, ln)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(B, 3, D))


@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_reference_fp64(with_key, per_sample):
    x, q, ln, k = make(3, 4, 2, 3, Q=2, dtype=torch.float64, per_sample=per_sample, key=with_key)

    def f(x_, q_, *k_):
        with mmkernels.use_backend("reference"):
            return mmkernels.attention_pool(x_, q_, ln, key=k_[0] if k_ else None)
    assert torch.autograd.gradcheck(f, leaves(x, q, k))


def test_gradcheck_reference_varlen_fp64():
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)

    def f(x_, q_):
        with mmkernels.use_backend("reference"):
            return mmkernels.attention_pool_varlen(x_, cu, q_)
    assert torch.autograd.gradcheck(f, (x, q))


# --- the Triton kernels against the reference -----------------------------------------------------

CONFIGS = {
    # name: (B, L, H, Dh, Q, per_sample, key)
    "pooled-1q": (6, 37, 2, 16, None, False, False),
    "latents-q5": (3, 50, 2, 32, 5, False, False),
    "per-sample-q3": (4, 29, 3, 24, 3, True, False),
    "distinct-key": (3, 41, 2, 16, 2, False, True),
    "odd-dh-40": (2, 17, 1, 40, None, False, False),
    "q16": (2, 20, 1, 16, 16, False, False),
    "L1": (5, 1, 2, 16, 2, False, False),
}


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("lengths", ["random", None])
def test_triton_matches_reference(dtype, config, lengths):
    B, L, H, Dh, Q, per_sample, key = CONFIGS[config]
    check("triton", B, L, H, Dh, Q, dtype=dtype, device=TRITON_DEVICE, per_sample=per_sample, key=key,
          lengths=lengths)


@pytest.mark.parametrize("dh", [20, 80, 256])
def test_triton_head_dims(dh):
    check("triton", 2, 9, 1, dh, 2, device=TRITON_DEVICE)


def test_triton_custom_scale():
    check("triton", 3, 12, 2, 16, 2, scale=0.3, device=TRITON_DEVICE, key=True)


def test_triton_long_rows_split_the_sequence():
    # B*H = 2 programs would leave a GPU idle: the forward splits L into chunks and combines them,
    # the backward writes one dquery partial per chunk.
    n_split, _ = tri._chunks(700, 2, tri.CHUNK_GRAIN, torch.device(TRITON_DEVICE))
    assert n_split > 1
    check("triton", 2, 700, 1, 32, 3, device=TRITON_DEVICE, lengths="random", key=True)
    check("triton", 1, 700, 2, 16, None, device=TRITON_DEVICE, lengths=None)


def test_split_and_unsplit_forward_agree(monkeypatch):
    x, q, ln, _ = make(2, 300, 2, 16, 2, device=TRITON_DEVICE, grad=False)
    with mmkernels.use_backend("triton"):
        split = mmkernels.attention_pool(x, q, ln)
        monkeypatch.setattr(tri, "_chunks", lambda n, bh, bl, dev: (1, max(bl, n)))
        whole = mmkernels.attention_pool(x, q, ln)
    assert_close(split, whole.double(), torch.float32, "split vs whole")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_rows_give_zeros_and_zero_gradients(backend):
    x, q, _, k = make(3, 10, 2, 16, 2, device=TRITON_DEVICE, key=True, lengths=None)
    ln = torch.tensor([0, 4, 0], device=TRITON_DEVICE)
    dy = torch.randn(3, 2, 32, device=TRITON_DEVICE)
    out, (dx, dq, dk) = run(backend, x, q, ln, k, dy)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[[0, 2]] == 0).all() and (out[1] != 0).any()
    assert (dx[[0, 2]] == 0).all() and (dk[[0, 2]] == 0).all()
    assert (dx[1, 4:] == 0).all() and (dk[1, 4:] == 0).all()  # padded positions get no gradient


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_in_padding_does_not_leak(backend):
    x, q, _, k = make(3, 12, 2, 16, 2, per_sample=True, device=TRITON_DEVICE, key=True, lengths=None, grad=False)
    ln = torch.tensor([5, 0, 12], device=TRITON_DEVICE)
    clean = [t.clone().requires_grad_() for t in (x, k)]
    dirty = [t.clone() for t in (x, k)]
    for t in dirty:
        t[0, 5:] = float("nan")
        t[1] = float("inf")
    dirty = [t.requires_grad_() for t in dirty]
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    dy = torch.randn(3, 2, 32, device=TRITON_DEVICE)
    out_c, g_c = run(backend, clean[0], qa, ln, clean[1], dy)
    out_d, g_d = run(backend, dirty[0], qb, ln, dirty[1], dy)
    assert torch.isfinite(out_d).all() and all(torch.isfinite(g).all() for g in g_d)
    torch.testing.assert_close(out_d, out_c)
    for a, b in zip(g_d, g_c):
        torch.testing.assert_close(a, b)


def packed_from(x, ln):
    valid = torch.arange(x.shape[1], device=x.device)[None] < ln[:, None]
    cu = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu[1:] = ln.cumsum(0)
    return x[valid], cu


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("per_sample,with_key", [(False, False), (True, True)])
def test_varlen_equals_padded_on_the_same_data(backend, per_sample, with_key):
    x, q, ln, k = make(5, 23, 2, 16, 3, device=TRITON_DEVICE, per_sample=per_sample, key=with_key)
    dy = torch.randn(5, 3, 32, device=TRITON_DEVICE)
    out, grads = run(backend, x, q, ln, k, dy)
    xp = packed_from(x.detach(), ln)[0].requires_grad_()
    kp = None if k is None else packed_from(k.detach(), ln)[0].requires_grad_()
    cu = packed_from(x.detach(), ln)[1]
    qv = q.detach().clone().requires_grad_()
    with mmkernels.use_backend(backend):
        outv = mmkernels.attention_pool_varlen(xp, cu, qv, key=kp)
    gv = torch.autograd.grad(outv, leaves(xp, qv, kp), dy)
    assert_close(outv, out.double(), torch.float32, "varlen out")
    valid = torch.arange(23, device=TRITON_DEVICE)[None] < ln[:, None]
    assert_close(gv[0], grads[0][valid].double(), torch.float32, "varlen dx", scale=True)
    assert_close(gv[1], grads[1].double(), torch.float32, "varlen dquery", scale=True)
    if k is not None:
        assert_close(gv[2], grads[2][valid].double(), torch.float32, "varlen dkey", scale=True)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_varlen_matches_reference(dtype):
    lens = torch.tensor([3, 0, 40, 1, 17])
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.to(TRITON_DEVICE)
    x = torch.randn(61, 48, dtype=dtype, device=TRITON_DEVICE, requires_grad=True)
    q = torch.randn(2, 3, 16, dtype=dtype, device=TRITON_DEVICE, requires_grad=True)
    dy = torch.randn(5, 2, 48, dtype=dtype, device=TRITON_DEVICE)
    with mmkernels.use_backend("triton"):
        out = mmkernels.attention_pool_varlen(x, cu, q)
    g = torch.autograd.grad(out, [x, q], dy)
    x64, q64 = x.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    ref = attention_pool_varlen_ref(x64, cu, q64.unsqueeze(0))[0]
    rg = torch.autograd.grad(ref, [x64, q64], dy.double())
    assert_close(out, ref, dtype, "out")
    assert (out[1] == 0).all()
    assert_close(g[0], rg[0], dtype, "dx", scale=True)
    assert_close(g[1], rg[1], dtype, "dquery", scale=True)


VIEWS = {
    "column-slice": lambda x: torch.cat([x, x], -1)[..., ::2],
    "row-stride": lambda x: torch.cat([x, x], 1)[:, ::2],
    "batch-major-transposed": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
}


@pytest.mark.parametrize("view", VIEWS, ids=str)
def test_triton_non_contiguous_x(view):
    check("triton", 3, 14, 2, 16, 2, device=TRITON_DEVICE, views=VIEWS[view])


def test_triton_non_contiguous_query_and_grad_out():
    x, _, ln, _ = make(3, 10, 2, 16, 2, device=TRITON_DEVICE)
    q = torch.randn(2, 16, 2, device=TRITON_DEVICE).permute(2, 0, 1).requires_grad_()  # [Q, H, Dh], strided
    dy = torch.randn(32, 2, 3, device=TRITON_DEVICE).permute(2, 1, 0)
    out, grads = run("triton", x, q, ln, None, dy)
    ref, ref_grads = expected(x, q, ln, None, dy)
    assert_close(out, ref, torch.float32, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad", scale=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_and_empty_sequence(backend):
    for B, L in [(0, 5), (3, 0)]:
        x, q, _, _ = make(B, L, 2, 16, 2, device=TRITON_DEVICE, lengths=None)
        dy = torch.randn(B, 2, 32, device=TRITON_DEVICE)
        out, (dx, dq) = run(backend, x, q, None, None, dy)
        assert out.shape == (B, 2, 32) and (out == 0).all()
        assert dx.shape == x.shape and dq.shape == q.shape and (dq == 0).all()
    cu = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    with mmkernels.use_backend(backend):
        out = mmkernels.attention_pool_varlen(torch.randn(0, 32, device=TRITON_DEVICE), cu,
                                              torch.randn(2, 16, device=TRITON_DEVICE))
    assert out.shape == (0, 32)


@pytest.mark.parametrize("L,Q,H,Dh,short,fma", [(64, None, 12, 64, True, True), (128, 1, 8, 128, True, True),
                                                 (129, None, 4, 64, False, True), (700, None, 3, 40, False, True),
                                                 (64, 2, 4, 64, False, False), (64, None, 2, 256, False, False)])
def test_candidates_take_their_shape_class(candidate, L, Q, H, Dh, short, fma):
    # the short forward: one query per head over at most 128 tokens; the fma backward: one query
    # per head, heads up to 128 wide; other shapes and the tiled candidates: the tiled kernels
    from mmkernels.testing import _jit_fn
    x, q, _, _ = make(2, L, H, Dh, Q, grad=False, lengths=None)
    q4 = q.reshape(1, -1, H, Dh)
    with runtime.capture_launches() as fwd:
        out, lse = tri.forward(x, None, q4, None, None, L, Dh ** -0.5)
    with runtime.capture_launches() as bwd:
        tri.backward(torch.randn_like(out), x, None, q4, None, None, out, lse, L, Dh ** -0.5)
    names = [_jit_fn(k).__name__ for k, _, _ in fwd + bwd]
    names = [n for n in names if n != "_attn_pool_combine_kernel"]     # the tiled forward's split rows
    fwd_short, bwd_fma = candidate == ("short", "fma") and short, candidate == ("short", "fma") and fma
    assert names == ["_attn_pool_fwd_short_kernel" if fwd_short else "_attn_pool_fwd_kernel",
                     "_attn_pool_bwd_fma_kernel" if bwd_fma else "_attn_pool_bwd_kernel"], names


@pytest.mark.parametrize("B,L,H,Dh,lengths,key", [(3, 700, 3, 40, "random", False), (2, 300, 4, 64, "full", True),
                                                  (5, 9, 1, 8, "random", True)])
def test_fma_backward_walks_chunks_of_long_rows(candidate, B, L, H, Dh, lengths, key):
    # rows of several chunks per program (the CPU stand-in splits long rows over programs too),
    # odd head counts and widths, lengths with an empty row, a separate key
    check("triton", B, L, H, Dh, None, dtype=torch.float32, device=TRITON_DEVICE, key=key, lengths=lengths)


def test_triton_backward_is_deterministic():
    x, q, ln, _ = make(2, 400, 2, 16, 3, device=TRITON_DEVICE)
    dy = torch.randn(2, 3, 32, device=TRITON_DEVICE)
    a = run("triton", x, q, ln, None, dy)[1]
    b = run("triton", x, q, ln, None, dy)[1]
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@given(B=st.integers(0, 4), L=st.integers(1, 70), H=st.integers(1, 3), Dh=st.sampled_from([16, 24, 33, 64]),
       Q=st.sampled_from([None, 1, 3, 16]), per_sample=st.booleans(), key=st.booleans(),
       lengths=st.sampled_from(["random", None, "full"]), dtype=st.sampled_from(TRITON_DTYPES))
def test_triton_shape_sweep(B, L, H, Dh, Q, per_sample, key, lengths, dtype):
    check("triton", B, L, H, Dh, Q, dtype=dtype, device=TRITON_DEVICE, per_sample=per_sample and Q is not None,
          key=key, lengths=lengths)


def test_reference_serves_what_triton_cannot():
    x, q, _, _ = make(2, 5, 1, 16, 17, grad=False, lengths=None)  # 17 queries > MAX_Q
    with mmkernels.use_backend("triton"), pytest.raises(mmkernels.BackendError, match="17 queries"):
        mmkernels.attention_pool(x.to(TRITON_DEVICE), q.to(TRITON_DEVICE))
    torch.testing.assert_close(mmkernels.attention_pool(x, q), naive(x, q, None))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (large shapes and bf16 on real hardware)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(64, 576, 8, 128, None), (512, 64, 12, 64, None), (2, 8192, 8, 128, 4),
                                   (16, 197, 12, 64, 16), (8, 100, 4, 256, 2), (32, 77, 8, 80, 1)])
def test_gpu_large(dtype, shape):
    B, L, H, Dh, Q = shape
    check("triton", B, L, H, Dh, Q, dtype=dtype, device="cuda")
    check("auto", B, L, H, Dh, Q, dtype=dtype, device="cuda", key=True, per_sample=Q is not None, lengths=None)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_lengths_outside_range_act_clamped():
    x, q, _, _ = make(3, 20, 2, 64, 2, device="cuda", grad=False, lengths=None)
    ln = torch.tensor([-3, 25, 7], device="cuda")
    got = mmkernels.attention_pool(x, q, ln)
    want = mmkernels.attention_pool(x, q, ln.clamp(0, 20))
    torch.testing.assert_close(got, want)


# --- bad input: one ValueError naming the argument -----------------------------------------------

def _bad_cases():
    x, q = torch.randn(2, 5, 8), torch.randn(2, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    xp = torch.randn(5, 8)
    return {
        "x rank": (dict(x=torch.randn(5, 8), query=q), r"x: expected shape \[B, L, D\]"),
        "x int": (dict(x=x.int(), query=q), r"x: expected a floating dtype"),
        "query rank": (dict(x=x, query=torch.randn(8)), r"query: expected \[H, Dh\]"),
        "query type": (dict(x=x, query=[[1.0] * 4] * 2), r"query: expected a tensor, got list"),
        "heads": (dict(x=x, query=torch.randn(3, 3)), r"query: expected its last two dims \[H, Dh\] with H \* Dh == D == 8"),
        "per-sample B": (dict(x=x, query=torch.randn(3, 1, 2, 4)), r"query: per-sample queries .* need B == 2"),
        "query dtype": (dict(x=x, query=q.double()), r"query: expected dtype torch.float32"),
        "key shape": (dict(x=x, query=q, key=torch.randn(2, 6, 8)), r"key: expected shape \(2, 5, 8\)"),
        "key dtype": (dict(x=x, query=q, key=x.half()), r"key: expected dtype torch.float32"),
        "lengths shape": (dict(x=x, query=q, lengths=torch.tensor([1, 2, 3])), r"lengths: expected shape \(2,\)"),
        "lengths dtype": (dict(x=x, query=q, lengths=torch.tensor([1.0, 2.0])), r"lengths: expected an integer dtype"),
        "lengths device": (dict(x=x, query=q, lengths=torch.tensor([1, 2], device="meta")), r"lengths: expected device cpu"),
        "lengths range": (dict(x=x, query=q, lengths=torch.tensor([1, 6])), r"lengths: expected values in \[0, 5\]"),
        "scale": (dict(x=x, query=q, scale=float("nan")), r"scale: expected None or a finite number"),
        "varlen x rank": (dict(x=x, cu_seqlens=cu, query=q, varlen=True), r"x: expected shape \[T, D\]"),
        "cu dtype": (dict(x=xp, cu_seqlens=cu.float(), query=q, varlen=True), r"cu_seqlens: expected dtype torch.int32"),
        "cu rank": (dict(x=xp, cu_seqlens=cu[None], query=q, varlen=True), r"cu_seqlens: expected shape \[B \+ 1\]"),
        "cu start": (dict(x=xp, cu_seqlens=torch.tensor([1, 2, 5], dtype=torch.int32), query=q, varlen=True),
                     r"cu_seqlens: expected to start at 0"),
        "cu decreasing": (dict(x=xp, cu_seqlens=torch.tensor([0, 4, 3, 5], dtype=torch.int32), query=q, varlen=True),
                          r"cu_seqlens: expected non-decreasing"),
        "cu end": (dict(x=xp, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32), query=q, varlen=True),
                   r"cu_seqlens: expected to end at T = 5"),
        "max_seqlen": (dict(x=xp, cu_seqlens=cu, query=q, varlen=True, max_seqlen=2),
                       r"max_seqlen: expected at least the longest sample \(3\)"),
        "varlen per-sample B": (dict(x=xp, cu_seqlens=cu, query=torch.randn(3, 1, 2, 4), varlen=True),
                                r"query: per-sample queries .* need B == 2"),
        "varlen query type": (dict(x=xp, cu_seqlens=cu, query=None, varlen=True), r"query: expected a tensor, got NoneType"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error(case):
    kwargs, pattern = _bad_cases()[case]
    fn = mmkernels.attention_pool_varlen if kwargs.pop("varlen", False) else mmkernels.attention_pool
    with pytest.raises(ValueError, match=pattern):
        fn(**kwargs)


def test_triton_strided_lengths_and_cu_seqlens():
    x, q, ln, _ = make(4, 15, 2, 16, 2, device=TRITON_DEVICE, grad=False)
    strided = torch.stack([ln, ln * 0], 1)[:, 0]                  # stride 2
    with mmkernels.use_backend("triton"):
        got = mmkernels.attention_pool(x, q, strided)
    assert_close(got, expected(x, q, ln, None, torch.zeros(4, 2, 32, device=TRITON_DEVICE))[0], torch.float32, "out")
    xp, cu = packed_from(x, ln)
    cu2 = torch.stack([cu, cu], 1)[:, 0]
    with mmkernels.use_backend("triton"):
        got_v = mmkernels.attention_pool_varlen(xp, cu2, q)
    assert_close(got_v, got.double(), torch.float32, "varlen out")


def test_triton_offsets_past_2_31_inside_one_sample():
    # a batch-first view of a sequence-first buffer: row stride 2^26 elements, so row 39 of a sample
    # sits past 2^31 elements from its first one. The buffer is reserved, not touched (lazy pages).
    L, B, D = 40, 2, 16
    stride_l = 2 ** 26
    buf = torch.empty(stride_l * L + B * D, dtype=torch.float16, device=TRITON_DEVICE)
    x = buf.as_strided((B, L, D), (D, stride_l, 1))
    x.copy_(torch.randn(B, L, D, dtype=torch.float16))
    assert (L - 1) * stride_l >= 2 ** 31
    q = torch.randn(2, 8, dtype=torch.float16, device=TRITON_DEVICE)
    ln = torch.tensor([40, 33], device=TRITON_DEVICE)
    with mmkernels.use_backend("triton"):
        got = mmkernels.attention_pool(x, q, ln)
    want = attention_pool_ref(x.contiguous().double(), q.double().view(1, 1, 2, 8), ln)[0][:, 0]
    assert_close(got, want, torch.float16, "out")


def test_triton_huge_lengths_act_clamped_without_wrapping():
    # (CUDA tensors skip the host check; call the kernels directly to see the device-side clamp)
    x, q, _, _ = make(2, 9, 1, 16, 1, device=TRITON_DEVICE, grad=False, lengths=None)
    q4 = q.view(1, 1, 1, 16)
    huge = torch.tensor([2 ** 32 + 5, -(2 ** 33)], dtype=torch.int64, device=TRITON_DEVICE)
    out, _ = tri.forward(x, None, q4, huge, None, 9, 0.25)
    full, _ = tri.forward(x, None, q4, None, None, 9, 0.25)
    torch.testing.assert_close(out[0], full[0])
    assert (out[1] == 0).all()


@pytest.mark.parametrize("bdh", [16, 64, 128, 256])
def test_autotune_search_space_pruning(bdh):
    # what a GPU's autotuner may try: tiles within the register budgets, fp32 on its heuristic
    nargs = {"X": torch.empty(0, dtype=torch.bfloat16)}     # no chip: no shared-memory bound
    fwd = tri._fwd_prune(tri._space_configs(tri.FWD_SPACE), nargs, BLOCK_DH=bdh, DOT_PREC="tf32", SAME_KV=True)
    bwd = tri._bwd_prune(tri._space_configs(tri.BWD_SPACE), nargs, BLOCK_DH=bdh, DOT_PREC="tf32", SAME_KV=True)
    assert fwd and all(c.kwargs["BLOCK_L"] * bdh <= 16384 for c in fwd)
    assert bwd and all(c.kwargs["BLOCK_L"] * bdh <= 8192 for c in bwd)
    nargs = {"X": torch.empty(0, dtype=torch.float32)}
    for prune, heuristic in [(tri._fwd_prune, tri._fwd_config(bdh)), (tri._bwd_prune, tri._bwd_config(bdh, torch.float32))]:
        (only,) = prune(tri._space_configs(tri.FWD_SPACE), nargs, BLOCK_DH=bdh, DOT_PREC="ieee", SAME_KV=True)
        assert (only.kwargs["BLOCK_L"], only.num_warps, only.num_stages) == heuristic


@pytest.mark.parametrize("arch", runtime.AOT_TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("same_kv", [True, False])
def test_forward_configurations_fit_each_chips_shared_memory(arch, dtype, same_kv):
    # per chip class (sm_86/89/120: 99 KB a block), the autotuner's configurations and the untuned
    # one fit the chip by the forward's estimate (the AOT test checks the compiled kernels)
    limit = runtime.SHARED_MEMORY_PER_BLOCK[arch]
    nargs = {"X": torch.empty(0, dtype=dtype)}
    es = nargs["X"].element_size()
    prec = "ieee" if dtype == torch.float32 else "tf32"
    with runtime.compile_target(arch):
        for bdh in (16, 64, 128, 256):
            meta = dict(BLOCK_DH=bdh, DOT_PREC=prec, SAME_KV=same_kv)
            kept = tri._fwd_prune(tri._space_configs(tri.FWD_SPACE), nargs, **meta)
            untuned = tri._fwd_heuristic(nargs, meta)
            for bl, st in [(c.kwargs["BLOCK_L"], c.num_stages) for c in kept] + [(untuned[0], untuned[2])]:
                assert tri._fwd_smem(bl, st, bdh, es, same_kv) <= limit, (arch, bdh, bl, st)
    # wide tiles of a separate key are left out on 99 KB chips but kept on Hopper
    wide = dict(BLOCK_DH=128, DOT_PREC="tf32", SAME_KV=False)
    bf16 = {"X": torch.empty(0, dtype=torch.bfloat16)}
    for arch, kept in ((86, False), (90, True)):
        with runtime.compile_target(arch):
            configs = tri._fwd_prune(tri._space_configs(tri.FWD_SPACE), bf16, **wide)
        assert any(c.kwargs["BLOCK_L"] == 128 and c.num_stages == 3 for c in configs) == kept, arch


@pytest.mark.gpu
@pytest.mark.gpu_configs
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (every autotune configuration, bf16, on real hardware)")
@pytest.mark.parametrize("space", ["fwd", "bwd"])
def test_gpu_every_autotune_configuration_matches_reference(monkeypatch, space):
    # The autotuner may pick any configuration of the search space: each must be right, not only
    # the heuristic one the other GPU tests run (gpu_check runs them with autotuning off).
    from mmkernels import runtime
    monkeypatch.setattr(runtime, "AUTOTUNE", False)  # launch the heuristic, patched to each config below
    for config in (tri.FWD_SPACE if space == "fwd" else tri.BWD_SPACE):
        monkeypatch.setattr(tri, "_fwd_config" if space == "fwd" else "_bwd_config", lambda *a, c=config: c)
        check("triton", 4, 300, 2, 128 if space == "fwd" else 64, 3, dtype=torch.bfloat16, device="cuda",
              key=True, per_sample=True)


def test_chunks_are_multiples_of_every_tile_height():
    heights = {bl for bl, _, _ in tri.FWD_SPACE + tri.BWD_SPACE}
    heights |= {tri._fwd_config(b)[0] for b in (16, 32, 64, 128, 256)}
    heights |= {tri._bwd_config(b, d)[0] for b in (16, 32, 64, 128, 256) for d in (torch.float16, torch.float32)}
    assert all(tri.CHUNK_GRAIN % h == 0 for h in heights), heights
