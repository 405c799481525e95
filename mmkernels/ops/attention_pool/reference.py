"""attention_pool in plain PyTorch: the specification, the CPU backend, and the eager/compile
baselines of the benchmark (``torch.compile`` of :func:`attention_pool_ref`).

Written so that a row with no valid position gives zeros and zero gradients, and values at padded
positions (even NaN) reach neither the output nor any gradient: keys and values are zeroed there
(``torch.where``, whose gradient is 0 on the unselected side), scores are -inf there, and the
softmax is taken as ``e / max(sum e, tiny)`` around a detached row maximum, so an empty row is
``0 / tiny = 0`` instead of ``0 / 0``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...backend import Capabilities


def attention_pool_ref(x: torch.Tensor, query: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                       key: Optional[torch.Tensor] = None, scale: Optional[float] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded layout. ``x``/``key`` ``[B, L, H*Dh]``, ``query`` ``[1 or B, Q, H, Dh]``, ``lengths``
    ``[B]`` or None. Returns ``(out [B, Q, H*Dh]`` in x's dtype, ``lse [B, Q, H]`` fp32 natural-log
    log-sum-exp of the scaled scores, -inf for empty rows)."""
    B, L, D = x.shape
    _, Q, H, Dh = query.shape
    if scale is None:
        scale = Dh ** -0.5
    acc = torch.promote_types(x.dtype, torch.float32)
    if L == 0:
        return x.new_zeros((B, Q, D)), torch.full((B, Q, H), float("-inf"), dtype=torch.float32, device=x.device)
    v, k, q, s = _scores(x, query, lengths, key, scale, acc)
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / den.clamp_min(torch.finfo(acc).tiny)
    out = torch.einsum("bqhl,blhd->bqhd", p, v).reshape(B, Q, D).to(x.dtype)
    with torch.no_grad():
        lse = (m + torch.log(den)).squeeze(-1).float()
    return out, lse


def _scores(x, query, lengths, key, scale: float, acc: torch.dtype):
    """``(v, k, q, s)`` in ``acc``: values and keys ``[B, L, H, Dh]`` zeroed at padded positions,
    the queries expanded to ``[B, Q, H, Dh]``, the scaled scores ``[B, Q, H, L]`` with -inf there."""
    B, L, _ = x.shape
    _, Q, H, Dh = query.shape
    pos = torch.arange(L, device=x.device)
    valid = pos[None, :] < lengths[:, None].to(pos.dtype) if lengths is not None else \
        torch.ones(B, L, dtype=torch.bool, device=x.device)
    vmask = valid[:, :, None, None]
    v = torch.where(vmask, x.view(B, L, H, Dh).to(acc), 0.0)
    k = v if key is None else torch.where(vmask, key.view(B, L, H, Dh).to(acc), 0.0)
    q = query.to(acc).expand(B, Q, H, Dh)
    s = torch.einsum("bqhd,blhd->bqhl", q, k) * scale
    return v, k, q, s.masked_fill(~valid[:, None, None, :], float("-inf"))


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """``[T, D]`` packed rows -> ``([B, max_seqlen, D]``, lengths ``[B]``). Differentiable: the
    gradient of the padded tensor scatters back to the packed rows (padding gets none)."""
    B = cu_seqlens.shape[0] - 1
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    idx = starts[:, None] + torch.arange(max_seqlen, device=x.device)[None, :]
    idx = torch.where(idx < starts[:, None] + lengths[:, None], idx, 0).clamp_(0, max(x.shape[0] - 1, 0))
    if x.shape[0] == 0:
        return x.new_zeros((B, max_seqlen, x.shape[1])), lengths.clamp(max=0)
    return x[idx.reshape(-1)].view(B, max_seqlen, x.shape[1]), lengths


def attention_pool_varlen_ref(x, cu_seqlens, query, key=None, scale=None, max_seqlen: Optional[int] = None):
    """Packed layout ``[T, D]`` with ``cu_seqlens`` ``[B+1]``; same math as :func:`attention_pool_ref`."""
    if max_seqlen is None or max_seqlen < 0:
        max_seqlen = max_len(cu_seqlens)
    xp, lengths = pad_packed(x, cu_seqlens, max_seqlen)
    kp = None if key is None else pad_packed(key, cu_seqlens, max_seqlen)[0]
    return attention_pool_ref(xp, query, lengths, kp, scale)


def max_len(cu_seqlens: torch.Tensor) -> int:
    """Longest sample of a ``cu_seqlens`` (a host sync for CUDA tensors)."""
    if cu_seqlens.shape[0] < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, **_) -> Optional[str]:
    return None  # any device, any floating dtype, any number of queries


def forward(x, key, query, lengths, cu_seqlens, max_seqlen: int, scale: float):
    if cu_seqlens is None:
        return attention_pool_ref(x, query, lengths, key, scale)
    return attention_pool_varlen_ref(x, cu_seqlens, query, key, scale, max_seqlen)


def backward(grad_out, x, key, query, lengths, cu_seqlens, out, lse, max_seqlen: int, scale: float):
    """``(dx, dkey or None, dquery)``. Padded layout: the explicit formulas from the saved
    log-sum-exp (scores recomputed once, no softmax pass): ``p = exp(s - lse)``,
    ``dp = dO·v``, ``ds = p (dp - Σ_l p dp)``, ``dv = pᵀ dO``, ``dq = scale · ds k``,
    ``dk = scale · dsᵀ q`` (``dx = dv + dk`` when the keys are x), in fp32 (fp64 for fp64); padded
    positions and empty rows get zeros. Packed layout: the same on the padded copy, its rows'
    gradients written back to the packed rows."""
    if cu_seqlens is None:
        return _padded_backward(grad_out, x, key, query, lengths, lse, scale)
    if max_seqlen is None or max_seqlen < 0:
        max_seqlen = max_len(cu_seqlens)
    xp, lens = pad_packed(x, cu_seqlens, max_seqlen)
    kp = None if key is None else pad_packed(key, cu_seqlens, max_seqlen)[0]
    dxp, dkp, dq = _padded_backward(grad_out, xp, kp, query, lens, lse, scale)
    rows = cu_seqlens[:-1].long()[:, None] + torch.arange(max_seqlen, device=x.device)[None, :]
    valid = torch.arange(max_seqlen, device=x.device)[None, :] < lens[:, None]
    dx = torch.zeros_like(x)
    dx[rows[valid]] = dxp[valid]                       # every packed row is one valid padded row
    dkey = None
    if key is not None:
        dkey = torch.zeros_like(key)
        dkey[rows[valid]] = dkp[valid]
    return dx, dkey, dq


def _padded_backward(grad_out, x, key, query, lengths, lse, scale):
    B, L, D = x.shape
    bq, Q, H, Dh = query.shape
    if scale is None:
        scale = Dh ** -0.5
    acc = torch.promote_types(x.dtype, torch.float32)
    if L == 0 or B == 0:
        return (torch.zeros_like(x), None if key is None else torch.zeros_like(key), torch.zeros_like(query))
    v, k, q, s = _scores(x, query, lengths, key, scale, acc)
    # the saved log-sum-exp is fp32: for fp64 inputs take it again at full precision
    m = torch.logsumexp(s, -1, keepdim=True) if acc == torch.float64 else lse.to(acc).unsqueeze(-1)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))        # empty rows: exp(-inf) = 0
    do = grad_out.reshape(B, Q, H, Dh).to(acc)
    dp = torch.einsum("bqhd,blhd->bqhl", do, v)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dv = torch.einsum("bqhl,bqhd->blhd", p, do)
    dk = torch.einsum("bqhl,bqhd->blhd", ds, q) * scale
    dq = torch.einsum("bqhl,blhd->bqhd", ds, k) * scale
    if bq == 1 and B != 1:
        dq = dq.sum(0, keepdim=True)
    if key is None:
        return (dv + dk).reshape(B, L, D).to(x.dtype), None, dq.to(query.dtype)
    return dv.reshape(B, L, D).to(x.dtype), dk.reshape(B, L, D).to(key.dtype), dq.to(query.dtype)
