"""gated_sum in plain PyTorch: the specification, the CPU backend, and the eager baseline.

``g = softmax over m of z`` (present modalities only; absent ones weigh exactly 0),
``out = sum_m g_m * tanh(h_pre_m)``. Absent entries are replaced before they are used
(``masked_fill``), so NaN stored there reaches neither the result nor a gradient; a row with
nothing present gives zeros.
"""
from __future__ import annotations

from typing import Optional

import torch


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

def why_not(explicit: bool, **_) -> Optional[str]:
    return None  # any device, any floating dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32   # fp32 math, as the kernels


def forward(h_pre, z, modality_mask):
    ct = _compute_dtype(h_pre.dtype)
    return gated_sum_ref(h_pre.to(ct), z.to(ct), modality_mask).to(h_pre.dtype)


def backward(grad_out, h_pre, z, modality_mask):
    """``(dh_pre, dz)`` by ``torch.func.vjp`` of the fp32 composition."""
    ct = _compute_dtype(h_pre.dtype)
    _, vjp = torch.func.vjp(lambda h, g: gated_sum_ref(h, g, modality_mask), h_pre.to(ct), z.to(ct))
    dh, dz = vjp(grad_out.to(ct))
    return dh.to(h_pre.dtype), dz.to(z.dtype)


def gated_fusion_ref(xs, proj_weights, proj_biases, gate_weight, gate_bias, modality_mask=None,
                     gate: str = "feature"):
    """The whole :class:`mmkernels.nn.GatedFusion` layer as users write it today: zero the absent
    inputs, ``nn.Linear`` per modality + ``torch.stack``, ``torch.cat`` + ``nn.Linear`` for the
    gate logits, then :func:`gated_sum_ref`."""
    import torch.nn.functional as F
    xs = list(xs)
    m, hidden = len(xs), proj_weights[0].shape[0]
    if modality_mask is not None:
        xs = [x.masked_fill(~modality_mask[..., i, None], 0) for i, x in enumerate(xs)]
    biases = proj_biases if proj_biases is not None else [None] * m
    h_pre = torch.stack([F.linear(x, w, b) for x, w, b in zip(xs, proj_weights, biases)], dim=-2)
    z = F.linear(torch.cat(xs, dim=-1), gate_weight, gate_bias)
    if gate == "feature":
        z = z.unflatten(-1, (m, hidden))
    return gated_sum_ref(h_pre, z, modality_mask)
