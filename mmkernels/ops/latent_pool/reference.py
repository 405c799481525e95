"""latent_pool in plain PyTorch: the specification and the reference backend.

``out[b, q] = sum_n softmax_n(scale * <query[(b,) q], x[b, n] + pos[n]> + bias[b, n]) * (x[b, n] + pos[n])``
over the positions ``n < lengths[b]`` (all when None): pooling by full-width queries (one per
latent and head of an absorbed attention-pooling head). A row with no valid position, or whose
bias is -inf everywhere, gives zeros and zero gradients (the softmax is ``e / max(sum e, tiny)``
around a detached finite row maximum); padded positions, even NaN, reach neither the output nor a
gradient (they are zeroed by ``torch.where``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...backend import Capabilities


def _scores(x, query, lengths, bias, pos, scale: float, acc: torch.dtype):
    """``(valid [B, N], x̃, q, s)`` in ``acc``: the tokens that count (within ``lengths``, bias not
    -inf; such a token's score gradient is exactly zero), x̃ = x + pos zeroed elsewhere, the queries
    expanded to ``[B, Q, D]``, the biased scaled scores ``[B, Q, N]`` with -inf where out."""
    B, N, D = x.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
    if lengths is not None:
        valid = torch.arange(N, device=x.device)[None, :] < lengths[:, None].to(torch.long)
    if bias is not None:
        valid = valid & ~torch.isneginf(bias)
    xt = x.to(acc)
    if pos is not None:
        xt = xt + pos.to(acc)[None]
    xt = torch.where(valid[..., None], xt, 0.0)
    q = query.to(acc).expand(B, query.shape[1], D)
    s = torch.einsum("bqd,bnd->bqn", q, xt) * scale
    if bias is not None:
        s = s + bias.to(acc)[:, None, :]
    return valid, xt, q, s.masked_fill(~valid[:, None, :], float("-inf"))


def latent_pool_ref(x: torch.Tensor, query: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
                    scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, N, D]``, ``query`` ``[1 or B, Q, D]``, ``lengths`` ``[B]``, ``bias`` ``[B, N]``
    (additive, on the scaled scores), ``pos`` ``[N, D]``. Returns ``(out [B, Q, D]`` in x's dtype,
    ``stats [B, Q, 2]`` fp32 ``(m, log2 l)``: the row maximum of the biased scaled scores and the
    log of ``l = sum_n exp(s_n - m)``, both in log2 units (so the log-sum-exp is
    ``(m + log2 l) ln 2``), kept apart because ``m + log2 l`` loses ``log2 l`` in fp32 when m is a
    finfo.min mask; (-inf, -inf) for empty rows)."""
    B, N, D = x.shape
    Q = query.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    if N == 0:
        return x.new_zeros((B, Q, D)), torch.full((B, Q, 2), float("-inf"), dtype=torch.float32, device=x.device)
    valid, xt, _, s = _scores(x, query, lengths, bias, pos, scale, acc)
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / den.clamp_min(torch.finfo(acc).tiny)
    out = torch.einsum("bqn,bnd->bqd", p, xt).to(x.dtype)
    with torch.no_grad():
        log2e = 1.4426950408889634
        stats = torch.cat([torch.where(den > 0, m * log2e, float("-inf")), torch.log2(den)], -1).float()
    return out, stats


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, **_) -> Optional[str]:
    return None


def forward(x, query, lengths, bias, pos, scale: float):
    return latent_pool_ref(x, query, lengths, bias, pos, scale)


def backward(grad_out, x, query, lengths, bias, pos, out, stats, scale: float):
    """``(dx, dquery, dpos or None)`` by the explicit formulas, the softmax recomputed once as the
    forward takes it (x read with ``pos`` added, zeroed where out): ``dp = dO·x̃``,
    ``ds = p (dp - Σ_n p dp)``, ``dx̃ = pᵀ dO + scale · dsᵀ q`` (zero at tokens that are out),
    ``dq = scale · ds x̃`` (summed over the batch for a shared query), ``dpos = Σ_b dx̃``; fp32 math
    (fp64 for fp64)."""
    B, N, _ = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    if N == 0 or B == 0:
        return (torch.zeros_like(x), torch.zeros_like(query), None if pos is None else torch.zeros_like(pos))
    valid, xt, q, s = _scores(x, query, lengths, bias, pos, scale, acc)
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)      # empty rows: 0
    do = grad_out.to(acc)
    dp = torch.einsum("bqd,bnd->bqn", do, xt)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dxt = torch.einsum("bqn,bqd->bnd", p, do) + scale * torch.einsum("bqn,bqd->bnd", ds, q)
    dxt = torch.where(valid[..., None], dxt, 0.0)
    dq = scale * torch.einsum("bqn,bnd->bqd", ds, xt)
    if query.shape[0] == 1 and B != 1:
        dq = dq.sum(0, keepdim=True)
    dpos = None if pos is None else dxt.sum(0).to(pos.dtype)
    return dxt.to(x.dtype), dq.to(query.dtype), dpos
