"""attention_pool on CPU tensors: ``F.scaled_dot_product_attention`` (PyTorch's fused CPU kernel),
the fastest plain-PyTorch formulation of the same pooling, differentiated by autograd — what
``auto`` runs on CPU tensors, eagerly (and, in :func:`forward_traced`'s form, under ``torch.compile``;
see :mod:`mmkernels.ops._register`).

Same contract as the reference: padded positions never reach the output or a gradient. The
boolean mask keeps finite padding out exactly (its softmax weight is 0, so its products with
the output's gradient are 0 too); a row of length 0 attends to every position, so that its softmax
stays finite, and is multiplied by 0 afterwards. Padding holding NaN or inf would still turn those
zero weights into NaN (0 * NaN), which then shows in that row's output: the output is summed
(one small reduction, not a pass over x) and, if anything in it is not finite, the pooling is
done again with the padding zeroed first (``torch.where``; a row of length 0 then attends to
zeros). Valid positions holding NaN give NaN either way, as in the reference.
16-bit inputs are pooled in fp32. Packed rows are padded first (:func:`reference.pad_packed`).

Every tensor operation costs microseconds on the host, so the path counts them: the mask is
built in three (a cached position range), a single query per head is read back without a
transpose, and the minimum length comes from the argument checks.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .._util import extrema
from .reference import pad_packed

_POSITIONS: Dict[tuple, torch.Tensor] = {}   # (L, device) -> arange(L) there, made once per length


def _positions(L: int, device: torch.device) -> torch.Tensor:
    pos = _POSITIONS.get((L, device))
    if pos is None:
        with torch.inference_mode(False), torch.no_grad():
            pos = torch.arange(L, device=device)
        if len(_POSITIONS) < 64:
            _POSITIONS[(L, device)] = pos
    return pos


def takes(x, query, cu_seqlens, **_) -> bool:
    """Empty inputs go to the registered op, whose gradients are zeros of the right shapes."""
    return x.numel() > 0 and query.numel() > 0 and (cu_seqlens is None or cu_seqlens.shape[0] > 1)


def forward(x, key, query, lengths, cu_seqlens, max_seqlen: int, scale: float, traced: bool = False):
    """``(out [B, Q, H*Dh], empty)`` (the registered op's contract): the log-sum-exp the registered
    op saves is not needed here. ``traced``: see :func:`pool`."""
    if cu_seqlens is not None:
        x, lengths = pad_packed(x, cu_seqlens, max_seqlen)
        key = None if key is None else pad_packed(key, cu_seqlens, max_seqlen)[0]
    return pool(x, key, query, lengths, scale, traced=traced), x.new_empty(0)


def traced_takes(cu_seqlens, max_seqlen: int, **_) -> bool:
    """Under ``torch.compile`` packed rows need ``max_seqlen`` given: reading it from ``cu_seqlens``
    would make the padded shape depend on values (the registered op reads it instead)."""
    return cu_seqlens is None or max_seqlen >= 0


def forward_traced(x, key, query, lengths, cu_seqlens, max_seqlen: int, scale: float):
    """:func:`forward` for ``torch.compile`` (no value read on the host)."""
    return forward(x, key, query, lengths, cu_seqlens, max_seqlen, scale, traced=True)


def pool(x, key, query, lengths, scale: float, shortest: Optional[int] = None, traced: bool = False):
    """The pooling of padded ``x [B, L, D]`` (``key`` likewise or None) over ``l < lengths[b]`` by
    ``query`` ``[H, Dh]`` (-> ``[B, D]``), ``[Q, H, Dh]`` or ``[1 or B, Q, H, Dh]`` (-> ``[B, Q, D]``).
    ``shortest``: the least length when the caller knows it (else read from ``lengths``).
    ``traced``: for ``torch.compile``, which must not read values on the host: rows of length 0 are
    always provided for, and the padding is always zeroed first (a pass inductor fuses), instead of
    reading the least length and whether the output is finite."""
    B, L, D = x.shape
    if not query.is_contiguous():    # SDPA on CPU misreads a query whose elements overlap in memory
        query = query.contiguous()   # (torch 2.11); the queries are small
    nd = query.dim()
    Q, H, Dh = (1, *query.shape) if nd == 2 else query.shape[-3:]
    if L == 0:
        out = x.new_zeros((B, Q, D)) + 0 * query.sum()
        return out[:, 0] if nd == 2 else out
    mask = keep = None
    if lengths is not None:
        pos = torch.arange(L, device=x.device) if traced else _positions(L, x.device)
        if traced:
            shortest = 0
            valid = (lengths.view(B, 1, 1) > pos).view(B, L, 1)
            x = torch.where(valid, x, 0)
            key = None if key is None else torch.where(valid, key, 0)
        elif shortest is None:
            shortest = extrema(lengths)[0] if lengths.numel() else 0
        n = lengths.view(B, 1, 1, 1)
        mask = n > pos                                                  # [B, 1, 1, L]
        if shortest <= 0:                                               # rows of length 0 attend to all
            empty = n <= 0
            mask = mask | empty
            keep = ~empty
    # the queries as [B, H, Q, Dh]
    if nd == 2:
        q = query.view(H, 1, Dh).expand(B, H, 1, Dh)
    elif nd == 3:
        q = query.transpose(0, 1).expand(B, H, Q, Dh)
    else:
        q = query.transpose(1, 2).expand(B, H, Q, Dh)
    out = _sdpa(x, key, q, mask, scale)
    if mask is not None and not traced and not math.isfinite((out.detach() if out.requires_grad else out).sum().item()):
        # NaN or inf somewhere: in the padding (0 * NaN) it must not count, so zero it and pool again
        valid = (lengths.view(B, 1, 1) > _positions(L, x.device)).view(B, L, 1)
        x = torch.where(valid, x, 0)
        key = None if key is None else torch.where(valid, key, 0)
        out = _sdpa(x, key, q, mask, scale)
        keep = None                                                     # empty rows attended to zeros
    if keep is not None:
        out = out * keep
    # out: [B, H, Q, Dh]
    if nd == 2:
        return out.reshape(B, D)
    return out.reshape(B, 1, D) if Q == 1 else out.transpose(1, 2).reshape(B, Q, D)


def _sdpa(x, key, q, mask, scale):
    """``[B, H, Q, Dh]``: SDPA of the queries ``q [B, H, Q, Dh]`` over the heads of x (and key),
    in fp32 for 16-bit inputs."""
    B, L, D = x.shape
    H, Dh = q.shape[1], q.shape[3]
    v = x.view(B, L, H, Dh).transpose(1, 2)                             # [B, H, L, Dh]
    k = v if key is None else key.view(B, L, H, Dh).transpose(1, 2)
    if x.dtype is torch.float16 or x.dtype is torch.bfloat16:           # (a no-op .float() costs microseconds)
        v32 = v.float()
        out = F.scaled_dot_product_attention(q.float(), v32 if key is None else k.float(), v32, attn_mask=mask,
                                             scale=scale)
        return out.to(x.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
