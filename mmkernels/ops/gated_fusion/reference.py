"""The gated-fusion layer in plain PyTorch — the specification, and what users write: its GEMMs
(``fusion_projections``: ``torch.stack`` of one ``F.linear`` per modality, ``torch.cat`` +
``F.linear`` for the gate) and the whole layer (:func:`gated_fusion_ref`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...backend import Capabilities
from .._util import rows2d
from ..gated_sum.reference import gated_sum_ref


def fusion_projections_ref(xs, proj_weights, proj_biases, gate_weight, gate_bias):
    """``(h_pre [..., M, H], z [..., G])``."""
    biases = list(proj_biases) if proj_biases else [None] * len(xs)
    h_pre = torch.stack([F.linear(x, w, b) for x, w, b in zip(xs, proj_weights, biases)], dim=-2)
    return h_pre, F.linear(torch.cat(list(xs), dim=-1), gate_weight, gate_bias)


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, **_) -> Optional[str]:
    return None


def forward(xs, proj_weights, proj_biases, gate_weight, gate_bias):
    return fusion_projections_ref(xs, proj_weights, proj_biases, gate_weight, gate_bias)


def backward(dh, dz, xs, proj_weights, proj_biases, gate_weight, gate_bias):
    """``(dxs, dproj_weights, dproj_biases, dgate_weight, dgate_bias)`` by the explicit formulas
    (dproj_biases empty and dgate_bias None without biases), no recomputation: ``dh[:, m]`` and
    column slices of the gate weight are read in place, and each x_m's two gradients are summed by
    the second GEMM's accumulate: ``dx_m = dh_m @ W_m + dz @ W_z[:, seg_m]``;
    ``dW_m = dh_m^T @ x_m``; ``dW_z[:, seg_m] = dz^T @ x_m``; biases by fp32 (fp64) sums. The triton
    backend runs the same function (cuBLAS on GPUs)."""
    m, h = len(xs), proj_weights[0].shape[0]
    g = gate_weight.shape[0]
    dh = dh.reshape(-1, m, h)
    dz = dz.reshape(-1, g)
    dgate_w = torch.empty_like(gate_weight, memory_format=torch.contiguous_format)
    acc = torch.promote_types(dh.dtype, torch.float32)                  # bias sums: fp32, fp64 for fp64
    dxs, dws, dbs = [], [], []
    off = 0
    for i, (x, w) in enumerate(zip(xs, proj_weights)):
        d = x.shape[-1]
        x2 = rows2d(x)
        dh_m = dh[:, i]                                                  # [rows, H], row stride M*H
        dx = torch.mm(dh_m, w)
        dx.addmm_(dz, gate_weight[:, off:off + d])                       # += dz @ W_z[:, seg_m]
        dxs.append(dx.view(x.shape))
        dws.append(torch.mm(dh_m.t(), x2))
        torch.mm(dz.t(), x2, out=dgate_w[:, off:off + d])
        if proj_biases:
            dbs.append(dh_m.sum(0, dtype=acc).to(proj_biases[i].dtype))
        off += d
    dgate_b = None if gate_bias is None else dz.sum(0, dtype=acc).to(gate_bias.dtype)
    return dxs, dws, dbs, dgate_w, dgate_b


def gated_fusion_ref(xs, proj_weights, proj_biases, gate_weight, gate_bias, modality_mask=None,
                     gate: str = "feature"):
    """The whole :class:`mmkernels.nn.GatedFusion` layer as users write it today: zero the absent
    inputs, ``nn.Linear`` per modality + ``torch.stack``, ``torch.cat`` + ``nn.Linear`` for the
    gate logits, then :func:`gated_sum_ref`."""
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
