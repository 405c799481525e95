"""Benchmark cases and providers for attention_pool (used by mmkernels-bench and benchmarks/).

Every provider takes ``(x, query, lengths, packed, cu_seqlens, max_seqlen)``: the padded batch with
its lengths (None when nothing is padded, as a user would call it), and (for cases with ragged
lengths) the same tokens packed ``[T, D]``. Padded providers use the first three; ``triton_varlen``
uses the packed ones (for full-length cases it packs by a view of x). The floor counts only the
valid tokens: what a method that never touches padding moves.

The baselines are what a user would write, in the input dtype: ``eager`` is the einsum / softmax
pooling (a -inf mask only when something is padded), ``compile`` its ``torch.compile``, ``sdpa``
``F.scaled_dot_product_attention`` with ``attn_mask=None`` unless something is padded (the runner
records which SDPA kernel ran). The robust reference (fp32 copy, empty rows) is for correctness.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...bench.spec import BenchSpec, Case, Inputs, backend_provider, compiled_provider, traffic
from . import attention_pool, attention_pool_varlen

CASES = [
    # CLIP ViT-L/14 at 336 px: 576 patch tokens of width 1024, 8 heads; the headline case.
    Case("b512_l576_d1024_h8", dict(B=512, L=576, D=1024, H=8, Q=1), ("quick",)),
    # Short text / audio segments: 64 tokens of width 768, 12 heads.
    Case("b4096_l64_d768_h12", dict(B=4096, L=64, D=768, H=12, Q=1), ("quick",)),
    # Ragged speech-frame sequences, lengths uniform in [L/4, L]: padded vs packed.
    Case("varlen_b1024_l512_d768_h12", dict(B=1024, L=512, D=768, H=12, Q=1, ragged=True), ("quick",)),
    # Perceiver / SigLIP-style latent queries over ViT-B/16 tokens.
    Case("b256_l197_d768_h12_q16", dict(B=256, L=197, D=768, H=12, Q=16)),
    # Few long sequences (long audio): needs the split-sequence (flash-decoding) path.
    Case("b4_l32768_d1024_h8", dict(B=4, L=32768, D=1024, H=8, Q=1)),
    # CPU-sized cases.
    Case("cpu_b32_l64_d256_h4", dict(B=32, L=64, D=256, H=4, Q=1), ("cpu",)),
    Case("cpu_varlen_b32_l64_d128_h2", dict(B=32, L=64, D=128, H=2, Q=2, ragged=True), ("cpu",)),
    # Per-call cost: [4, 16, 64], 4 heads.
    Case("tiny_b4_l16_d64_h4", dict(B=4, L=16, D=64, H=4, Q=1), ("cpu", "overhead")),
]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    B, L, D, H, Q = p["B"], p["L"], p["D"], p["H"], p["Q"]
    x = torch.randn(B, L, D, dtype=dtype, device=device)
    query = torch.randn(Q, H, D // H, dtype=dtype, device=device)
    if p.get("ragged"):
        lengths = _lengths(case).to(device)
        valid = torch.arange(L, device=device)[None, :] < lengths[:, None]
        packed = x[valid].contiguous()
        cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
        cu[1:] = lengths.cumsum(0)
        leaves = [x, packed, query]
    else:
        lengths = None
        packed, cu = None, torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)
        leaves = [x, query]
    dy = torch.randn(B, Q, D, dtype=dtype, device=device)
    return Inputs(args=(x, query, lengths, packed, cu, L), leaves=leaves, grad_out=dy)


def _lengths(case: Case) -> torch.Tensor:
    """The ragged cases' lengths: uniform in [L/4, L], the same draw every time."""
    p = case.params
    return torch.randint(p["L"] // 4, p["L"] + 1, (p["B"],), generator=torch.Generator().manual_seed(0))


def _tokens(case: Case) -> int:
    p = case.params
    return int(_lengths(case).sum()) if p.get("ragged") else p["B"] * p["L"]


def traffic_of(case: Case, dtype: torch.dtype):
    """fwd reads the valid tokens of x and the queries, writes out; bwd reads dy, x, the queries and
    out (for the softmax's rowsum term), writes dx and dquery."""
    e = torch.empty((), dtype=dtype).element_size()
    p = case.params
    act = _tokens(case) * p["D"] * e
    small, q = p["B"] * p["Q"] * p["D"] * e, p["Q"] * p["D"] * e
    sizes = dict(x=act, q=q, y=small, dy=small, dx=act, dq=q)
    return traffic(sizes, fwd=(("x", "q"), ("y",)), bwd=(("dy", "x", "q", "y"), ("dx", "dq")))


def flops(case: Case, mode: str) -> int:
    one = 2 * case.params["Q"] * _tokens(case) * case.params["D"]  # one [Q x Dh] by [Dh x L] product per head
    return int({"fwd": 2 * one, "bwd": 5 * one, "fwd+bwd": 7 * one}[mode])


def _eager(x, query, lengths, packed, cu, max_len):
    """Attention pooling as users write it, in x's dtype: scores by einsum, (masked) softmax, einsum."""
    B, L, D = x.shape
    Q, H, Dh = query.shape
    xh = x.view(B, L, H, Dh)
    s = torch.einsum("qhd,blhd->bhql", query, xh) * Dh ** -0.5
    if lengths is not None:
        s = s.masked_fill(~(torch.arange(L, device=x.device) < lengths[:, None])[:, None, None, :], float("-inf"))
    return torch.einsum("bhql,blhd->bqhd", s.softmax(-1), xh).reshape(B, Q, D)


def _sdpa(x, query, lengths, packed, cu, max_len):
    B, L, D = x.shape
    Q, H, Dh = query.shape
    q = query.permute(1, 0, 2).unsqueeze(0).expand(B, H, Q, Dh)
    kv = x.view(B, L, H, Dh).transpose(1, 2)
    mask = None if lengths is None else (torch.arange(L, device=x.device)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask).transpose(1, 2).reshape(B, Q, D)


def _backend(name):
    run = backend_provider(attention_pool, name)
    return lambda x, query, lengths, packed, cu, max_len: run(x, query, lengths)


def _varlen(backend):
    run = backend_provider(attention_pool_varlen, backend)

    def f(x, query, lengths, packed, cu, max_len):
        return run(x.reshape(-1, x.shape[-1]) if packed is None else packed, cu, query, max_seqlen=max_len)
    return f


SPEC = BenchSpec(
    op="attention_pool",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": _eager,                        # einsum + (masked) softmax + einsum, in x's dtype
        "compile": compiled_provider(_eager),   # torch.compile of that
        "sdpa": _sdpa,                          # F.scaled_dot_product_attention (a mask only when padded)
        "auto": _backend("auto"),               # what users get: SDPA on CPU tensors
        "triton": _backend("triton"),           # padded [B, L, D] + lengths
        "triton_varlen": _varlen("triton"),     # packed [T, D] + cu_seqlens
        "cuda": _backend("cuda"),               # the CUDA C++ kernels (csrc/attention_pool.cu), padded
        "cuda_varlen": _varlen("cuda"),         # and packed
    },
    traffic=traffic_of,
    flops=flops,
    baselines=("eager", "compile", "sdpa"),
)
