"""low_rank_fusion on CPU tensors: the fastest plain-PyTorch formulation of the same result, under
autograd — what ``auto`` runs on CPU tensors, eagerly and under ``torch.compile``.

Against the eager composition (:func:`reference.low_rank_fusion_ref`: ``[1, x_m]`` built by a
concatenation, a matmul, the product, an einsum over the rank), each modality's projection is one
``baddbmm`` that adds the leading-1 row of its factor as the bias of ``x_m @ F_m[:, 1:]`` (no
``[1, x_m]`` copy), and the rank-weighted sum is one matrix-vector product: faster than the
composition on the small CPU case, forward and backward (``python benchmarks/per_call.py``).
"""
from __future__ import annotations

import torch


def low_rank_fusion_cpu(xs, factors, rank_weights, bias):
    """``Σ_r rank_weights[r] · Π_m ([1, x_m] @ factors[m][r]) + bias`` (checked arguments)."""
    x0 = xs[0]
    r, h = factors[0].shape[0], factors[0].shape[2]
    inplace = not torch.is_grad_enabled()
    prod = None
    for x, f in zip(xs, factors):
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        p = torch.baddbmm(f[:, :1], x2.expand(r, -1, -1), f[:, 1:])    # [R, rows, H]
        prod = p if prod is None else (prod.mul_(p) if inplace else prod * p)
    if rank_weights is None:
        out = prod.sum(0)
    else:
        out = (rank_weights @ prod.view(r, prod.shape[1] * h)).view(-1, h)
    if bias is not None:
        out = out.add_(bias) if inplace else out + bias
    return out if x0.dim() == 2 else out.view(*x0.shape[:-1], h)
