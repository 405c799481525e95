"""latent_pool on CPU tensors: two batched matrix products around a softmax, differentiated by
autograd — what ``auto`` runs on CPU tensors, eagerly and under ``torch.compile``. The positional embedding
is never added to x: its share of the scores (``query @ pos^T``) and of the output
(``p @ pos``) are products of their own. Same contract as the reference (empty rows give zeros,
padding never reaches the output); 16-bit inputs are pooled in fp32.
"""
from __future__ import annotations

import torch


def takes(x, query, **_) -> bool:
    """Empty inputs go to the registered op, whose gradients are zeros of the right shapes."""
    return x.numel() > 0 and query.numel() > 0


def forward(x, query, lengths, bias, pos, scale: float):
    """``(out [B, Q, D], empty)``: the softmax statistics the registered op saves are not needed here."""
    B, N, D = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    up = (lambda t: t) if x.dtype == acc else (lambda t: t.to(acc))     # (a no-op .to costs microseconds)
    xv, q = up(x), up(query)
    valid = None
    if lengths is not None:
        valid = torch.arange(N, device=x.device)[None, :] < lengths[:, None].to(torch.long)   # [B, N]
        xv = torch.where(valid[..., None], xv, 0)
    s = torch.matmul(q * scale, xv.transpose(1, 2))                     # [B, Q, N]
    if pos is not None:
        s = s + torch.matmul(q * scale, up(pos).t())
    if bias is not None:
        s = s + bias.to(acc)[:, None, :]
    drop = None if valid is None else ~valid
    if bias is not None:  # -inf bias: the token is out (its score's gradient is exactly zero)
        drop = torch.isneginf(bias) if drop is None else drop | torch.isneginf(bias)
    if drop is not None:
        s = s.masked_fill(drop[:, None, :], float("-inf"))
    if valid is not None or bias is not None:   # rows with nothing valid: zeros, never NaN
        m = s.detach().amax(-1, keepdim=True)
        e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
        p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    else:
        p = torch.softmax(s, -1)
    out = torch.matmul(p, xv)
    if pos is not None:
        out = out + torch.matmul(p, up(pos))
    return (out if x.dtype == acc else out.to(x.dtype)), x.new_empty(0)
