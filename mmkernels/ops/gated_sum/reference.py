"""gated_sum in plain PyTorch: the specification, the CPU backend, and the eager baseline.

``g = softmax over m of z`` (present modalities only; absent ones weigh exactly 0),
``out = sum_m g_m * tanh(h_pre_m)``. Absent entries are replaced before they are used
(``masked_fill``), so NaN stored there reaches neither the result nor a gradient; a row with
nothing present gives zeros.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backend import Capabilities


def gated_sum_ref(h_pre: torch.Tensor, z: torch.Tensor, modality_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The composition users write: tanh, (masked) softmax over the modality axis, weighted sum,
    in the inputs' dtype. ``h_pre [..., M, H]``; ``z [..., M, H]`` or ``[..., M]``."""
    feature = z.dim() == h_pre.dim()
    logits = z if feature else z.unsqueeze(-1)                     # [..., M, H] or [..., M, 1]
    if modality_mask is None:
        return (torch.softmax(logits, dim=-2) * torch.tanh(h_pre)).sum(-2)
    present = modality_mask.unsqueeze(-1)                          # [..., M, 1]
    g = torch.softmax(logits.masked_fill(~present, float("-inf")), dim=-2)
    g = g.masked_fill(~present, 0.0)                               # all-absent rows: 0, not NaN
    return (g * torch.tanh(h_pre.masked_fill(~present, 0.0))).sum(-2)


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, **_) -> Optional[str]:
    return None  # any device, any floating dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32   # fp32 math, as the kernels


def forward(h_pre, z, modality_mask):
    dtype = h_pre.dtype
    if dtype is torch.float32 or dtype is torch.float64:  # (a no-op .to still costs microseconds per call)
        return gated_sum_ref(h_pre, z, modality_mask)
    return gated_sum_ref(h_pre.float(), z.float(), modality_mask).to(dtype)


def backward(grad_out, h_pre, z, modality_mask):
    """``(dh_pre, dz)`` by the explicit formulas, in fp32 (fp64 for fp64), recomputing only the
    gates and ``tanh``: ``dh_m = dy * g_m * (1 - t_m^2)``; ``dz_m = g_m * dy * (t_m - out)``
    (summed over H for modality gates). Absent modalities get exactly 0 (their g is 0 and their
    h_pre is never read); so does every entry of a row with nothing present."""
    ct = _compute_dtype(h_pre.dtype)
    h, zz, dy = h_pre.to(ct), z.to(ct), grad_out.to(ct).unsqueeze(-2)     # dy: [..., 1, H]
    feature = zz.dim() == h.dim()
    logits = zz if feature else zz.unsqueeze(-1)
    if modality_mask is None:
        g = torch.softmax(logits, dim=-2)
        t = torch.tanh(h)
    else:
        absent = ~modality_mask.unsqueeze(-1)
        g = torch.softmax(logits.masked_fill(absent, float("-inf")), dim=-2).masked_fill(absent, 0.0)
        t = torch.tanh(h.masked_fill(absent, 0.0))
    out = (g * t).sum(-2, keepdim=True)
    dh = dy * g * (1.0 - t * t)
    dz = g * (dy * (t - out))
    if not feature:
        dz = dz.sum(-1)
    if modality_mask is not None:   # exactly 0 where absent, also when dy is not finite (0 * inf)
        dh = dh.masked_fill(absent, 0.0)
        dz = dz.masked_fill(absent if feature else absent.squeeze(-1), 0.0)
    return dh.to(h_pre.dtype), dz.to(z.dtype)
