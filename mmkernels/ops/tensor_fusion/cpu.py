"""tensor_fusion's plain formulation: what ``auto`` runs on CPU tensors, eagerly and under
``torch.compile``, and on a GPU whose dispatch table names the ``torch`` backend.

Where the outer product fits in the device's budget (:func:`reference.budget_for`: 2M elements on
a CPU; on a GPU 1/32 of the product, 64K to 64M elements) it is built whole, as the eager
composition does, but each ``[1, x_m]`` is one ``F.pad`` (the eager code's ones-and-cat is two ops
and a copy); larger problems go to the blocked path (:func:`reference.tensor_fusion_chunked`),
which never holds more than the budget. On a GPU that is every problem above 64K elements: the
blocked cuBLAS formulation is TFN's one GPU implementation.
"""
from __future__ import annotations

import torch.nn.functional as F

from .reference import budget_for, tensor_fusion_chunked


def tensor_fusion_cpu(xs, weight, bias):
    """``F.linear(flatten([1, x_1] ⊗ … ⊗ [1, x_M]), weight, bias)`` (checked arguments)."""
    x0 = xs[0]
    rows = x0.numel() // x0.shape[-1]
    budget = budget_for(x0, rows, weight.shape[1])
    if rows * weight.shape[1] > budget:
        return tensor_fusion_chunked(xs, weight, bias, budget)
    t = F.pad(x0, (1, 0), value=1.0)
    for x in xs[1:]:
        t = (t.unsqueeze(-1) * F.pad(x, (1, 0), value=1.0).unsqueeze(-2)).flatten(-2)
    return F.linear(t, weight, bias)
