"""attention_pool on CPU tensors: ``F.scaled_dot_product_attention`` (PyTorch's fused CPU kernel),
the fastest plain-PyTorch formulation of the same pooling, differentiated by autograd — what
``auto`` runs on CPU tensors outside ``torch.compile`` (see :mod:`mmkernels.ops._register`).

Same contract as the reference: padded positions never reach the output or a gradient. When the
inputs are finite (one fp32 sum tells) the mask alone does it: masked weights are exactly 0, and a
row of length 0 (which attends to every position, so that its softmax stays finite) is multiplied
by 0 afterwards. Padding holding NaN or inf is zeroed first (``torch.where``), and a row of length
0 then attends to zeros. Either way such a row gives zeros and zero gradients.
16-bit inputs are pooled in fp32. Packed rows are padded first (:func:`reference.pad_packed`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import pad_packed


def _finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf: one fp32 sum (NaN and inf survive it; a sum that
    overflows reads as not finite, which only takes the slower, equally correct path)."""
    return bool(t.sum(dtype=torch.float32).isfinite())


def takes(x, query, cu_seqlens, **_) -> bool:
    """Empty inputs go to the registered op, whose gradients are zeros of the right shapes."""
    return x.numel() > 0 and query.numel() > 0 and (cu_seqlens is None or cu_seqlens.shape[0] > 1)


def forward(x, key, query, lengths, cu_seqlens, max_seqlen: int, scale: float):
    """``(out [B, Q, H*Dh], empty)``: the log-sum-exp the registered op saves is not needed here."""
    if cu_seqlens is not None:
        x, lengths = pad_packed(x, cu_seqlens, max_seqlen)
        key = None if key is None else pad_packed(key, cu_seqlens, max_seqlen)[0]
    B, L, D = x.shape
    _, Q, H, Dh = query.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    mask = None
    if L == 0:
        return x.new_zeros((B, Q, D)) + 0 * query.sum(), x.new_empty(0)
    keep = None
    if lengths is not None:
        n = lengths.clamp(0, L)
        valid = torch.arange(L, device=x.device)[None, :] < n[:, None]
        if _finite(x) and (key is None or _finite(key)):
            # finite padding: its softmax weight is exactly 0, so it reaches neither the output
            # nor a gradient; rows of length 0 attend to everything and are zeroed afterwards
            keep = (n > 0).to(acc)[:, None, None]
        else:   # NaN or inf in the padding (0 * NaN is NaN): zero it first (a slower pass)
            x = torch.where(valid[..., None], x, 0)
            key = None if key is None else torch.where(valid[..., None], key, 0)
        mask = (valid | (n == 0)[:, None])[:, None, None, :]           # [B, 1, 1, L]
    up = (lambda t: t) if x.dtype == acc else (lambda t: t.to(acc))     # (a no-op .to costs microseconds)
    v = up(x.view(B, L, H, Dh).transpose(1, 2))                         # [B, H, L, Dh]
    k = v if key is None else up(key.view(B, L, H, Dh).transpose(1, 2))
    q = up(query.expand(B, Q, H, Dh).transpose(1, 2))                   # [B, H, Q, Dh]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2).reshape(B, Q, D)
    if keep is not None:
        out = out * keep
    return (out if x.dtype == acc else out.to(x.dtype)), x.new_empty(0)
