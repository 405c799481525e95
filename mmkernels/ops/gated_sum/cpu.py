"""gated_sum on CPU tensors: what ``auto`` runs on CPU tensors, eagerly and under ``torch.compile``.

The eager composition (:func:`reference.gated_sum_ref`) with the mask inverted once instead of
three times, and, inside a gated-fusion layer (``h_pre`` projected from inputs that were zeroed
where absent, so finite there as long as the parameters are), without the pass that zeroes
``h_pre`` at absent modalities: their gate is exactly 0 either way. 16-bit inputs are computed
in fp32, as the kernels do.
"""
from __future__ import annotations

import torch


def gated_sum_cpu(h_pre, z, modality_mask, finite_where_absent: bool = False):
    """``sum_m softmax_m(z)_m * tanh(h_pre_m)`` over the present modalities (checked arguments).
    ``finite_where_absent``: the caller knows ``h_pre`` holds no NaN or inf at absent modalities."""
    dtype = h_pre.dtype
    if dtype is torch.float16 or dtype is torch.bfloat16:   # (a no-op .float() costs microseconds)
        return gated_sum_cpu(h_pre.float(), z.float(), modality_mask, finite_where_absent).to(dtype)
    logits = z if z.dim() == h_pre.dim() else z.unsqueeze(-1)        # [..., M, H] or [..., M, 1]
    if modality_mask is None:
        return (torch.softmax(logits, -2) * torch.tanh(h_pre)).sum(-2)
    absent = ~modality_mask.unsqueeze(-1)                             # [..., M, 1]
    g = torch.softmax(logits.masked_fill(absent, float("-inf")), -2).masked_fill(absent, 0.0)  # all absent: 0
    return (g * torch.tanh(h_pre if finite_where_absent else h_pre.masked_fill(absent, 0.0))).sum(-2)
