"""The gated-fusion layer in plain PyTorch — the specification, and what users write: its GEMMs
(``fusion_projections``: ``torch.stack`` of one ``F.linear`` per modality, ``torch.cat`` +
``F.linear`` for the gate) and the whole layer (:func:`gated_fusion_ref`)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...backend import Capabilities
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
    """``(dxs, dproj_weights, dproj_biases, dgate_weight, dgate_bias)`` by ``torch.func.vjp``
    (dproj_biases empty and dgate_bias None without biases)."""
    m, nb = len(xs), len(proj_biases)

    def f(*ts):
        return fusion_projections_ref(ts[:m], ts[m:2 * m], ts[2 * m:2 * m + nb], ts[2 * m + nb],
                                      ts[2 * m + nb + 1] if gate_bias is not None else None)

    primals = (*xs, *proj_weights, *proj_biases, gate_weight) + (() if gate_bias is None else (gate_bias,))
    _, vjp = torch.func.vjp(f, *primals)
    g = vjp((dh, dz))
    return (list(g[:m]), list(g[m:2 * m]), list(g[2 * m:2 * m + nb]), g[2 * m + nb],
            g[2 * m + nb + 1] if gate_bias is not None else None)


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
