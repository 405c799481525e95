"""The absorbed form of a multi-head attention-pooling head, shared by every family.

For head h with query ``q_h`` (``[hd]``), keys ``W_k,h x + b_k,h`` and values ``W_v,h x + b_v,h``:
the scores ``q_h . (W_k,h x_n + b_k,h)`` equal ``(W_k,h^T q_h) . x_n`` plus a constant that cancels
in the softmax, and since the weights sum to one, ``sum_n p_n (W_v,h x_n + b_v,h) = W_v,h (sum_n p_n
x_n) + b_v,h``. So the head is :func:`mmkernels.latent_pool` with ``latents x heads`` full-width
queries ``W_k,h^T q_h``, then one small batched product with ``W_v,h``. ``b_k`` enters with weight
zero, so its gradient is zeros (as the original's is, up to rounding) rather than None: optimizers
and DDP treat it as they did.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.latent_pool import latent_pool


def absorbed_heads(x: torch.Tensor, q: torch.Tensor, wk: torch.Tensor, bk: Optional[torch.Tensor],
                   wv: torch.Tensor, bv: Optional[torch.Tensor], *, scale: float,
                   bias: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``x`` ``[B, N, C]`` tokens, ``q`` ``[1 or B, L, H, hd]`` projected queries, ``wk``/``wv``
    ``[H * hd, C]``. Returns the heads' outputs ``[B, L, H * hd]`` (before the output projection)."""
    B, N, C = x.shape
    b, L, H, hd = q.shape
    qa = torch.einsum("blhe,hec->blhc", q, wk.view(H, hd, C))
    if bk is not None and torch.is_grad_enabled() and bk.requires_grad:
        if _plain_eager():                     # no kernel forward, one zero fill backward
            qa = _ZeroGradFor.apply(qa, bk)
        else:                                  # traced or transformed: inductor folds the zero term away
            qa = qa + (bk.sum() * 0).to(qa.dtype)
    pooled = latent_pool(x, qa.reshape(b, L * H, C), bias=bias, pos=pos, scale=scale, backend=backend)
    heads = pooled.view(B * L, H, C).transpose(0, 1)                   # [H, B*L, C]
    wv_t = wv.view(H, hd, C).transpose(1, 2)                           # [H, C, hd]
    o = torch.bmm(heads, wv_t) if bv is None else torch.baddbmm(bv.view(H, 1, hd), heads, wv_t)
    return o.transpose(0, 1).reshape(B, L, H * hd)


def _plain_eager() -> bool:
    """Eager autograd alone: no ``torch.compile`` trace, no ``torch.func`` transform, no forward-mode
    AD level (which :class:`_ZeroGradFor` does not implement)."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0)


class _ZeroGradFor(torch.autograd.Function):
    """``x`` unchanged, and ``b`` given a zero gradient: ``b`` enters the head with weight zero (the
    key bias cancels in the softmax), with no forward kernel for that."""

    @staticmethod
    def forward(ctx, x, b):
        ctx.b_like = (b.shape, b.dtype, b.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.b_like
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def dead_rows(o: torch.Tensor, bias: Optional[torch.Tensor], value: float) -> torch.Tensor:
    """Rows whose bias is -inf at every token attend to nothing. latent_pool pools them to zeros,
    so the absorbed head would give ``b_v`` there; the original gives what its softmax gives:
    zeros from PyTorch's SDPA, NaN from an explicit softmax (0 / 0). ``value`` is that."""
    if bias is None:
        return o
    dead = torch.isneginf(bias).all(-1)
    return torch.where(dead[:, None, None], torch.full((), value, dtype=o.dtype, device=o.device), o)


def key_padding_bias(attn_mask: torch.Tensor, B: int, N: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """An SDPA-style mask broadcastable to ``[B, heads, queries, N]`` that is the same for every
    head and query (size 1 or stride 0 there) as an additive ``[B, N]`` score bias; None when it
    is not of that form (the caller then runs the original forward). Boolean masks: True attends."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() != 4 or m.shape[-1] != N or m.shape[0] not in (1, B):
        return None
    if any(m.shape[i] != 1 and m.stride(i) != 0 for i in (1, 2)):
        return None
    m = m[:, 0, 0, :].expand(B, N)
    if m.dtype == torch.bool:
        return torch.where(m, torch.zeros((), dtype=dtype, device=m.device),
                           torch.full((), float("-inf"), dtype=dtype, device=m.device))
    if not m.is_floating_point():
        return None
    return m
