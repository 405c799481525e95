"""fusion_projections on the ``triton`` backend, named for what it runs: vendor GEMMs (cuBLAS on
GPUs) for the projections and concat_linear's Triton GEMM for the gate logits — every GEMM of a
gated-fusion layer, with no stack, no concatenation and no gradient-accumulation pass.

Forward:
* ``h_pre``: the vendor GEMM (cuBLAS on GPUs) writes each modality's projection straight into its
  slice of one ``[rows, M, H]`` buffer (``addmm(out=h_pre[:, m])``). When every x_m has the same
  width and the xs are equally spaced slices of one tensor (e.g. ``features.unbind(1)``), that is
  one batched GEMM (``baddbmm``) over a strided view instead.
* ``z``: :func:`mmkernels.concat_linear`'s Triton GEMM, which reads the xs in place.

Backward (cuBLAS): ``dh[:, m]`` and column slices of the gate weight are read in place, and each
x_m's two gradients are summed by the second GEMM's accumulate (``beta = 1``), not by autograd's
separate add: ``dx_m = dh_m @ W_m``, then ``dx_m += dz @ W_z[:, seg_m]``;
``dW_m = dh_m^T @ x_m``; ``dW_z[:, seg_m] = dz^T @ x_m`` written into its columns; biases by
fp32 sums.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ...backend import KERNEL_CAPABILITIES
from .._util import rows2d
from ..concat_linear import triton as concat_linear_triton
from . import reference as _reference


CAPABILITIES = KERNEL_CAPABILITIES


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    reason = concat_linear_triton.why_not(explicit, xs=xs, weight=None)
    return None if reason is None else f"the gate GEMM (concat_linear's Triton kernel): {reason}"



def as_batched(x2: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[M, rows, D]`` view of the 2-D inputs when they are equally spaced slices of one storage
    with identical shapes and strides (no copy), else None."""
    x0 = x2[0]
    if len(x2) < 2 or any(x.shape != x0.shape or x.stride() != x0.stride() for x in x2):
        return None
    if any(x.untyped_storage().data_ptr() != x0.untyped_storage().data_ptr() for x in x2):
        return None
    step = x2[1].storage_offset() - x0.storage_offset()
    if step <= 0 or any(x.storage_offset() - x0.storage_offset() != i * step for i, x in enumerate(x2)):
        return None
    return x0.as_strided((len(x2), *x0.shape), (step, *x0.stride()), x0.storage_offset())


def _projections(x2, weights, biases, out):
    batched = as_batched(x2)
    if batched is not None:
        w = torch.stack(list(weights)).transpose(1, 2)                 # [M, D, H]: small
        if biases:
            torch.baddbmm(torch.stack(list(biases)).unsqueeze(1), batched, w, out=out.transpose(0, 1))
        else:
            torch.bmm(batched, w, out=out.transpose(0, 1))
        return
    for i, (x, w) in enumerate(zip(x2, weights)):
        if biases:
            torch.addmm(biases[i], x, w.t(), out=out[:, i])
        else:
            torch.mm(x, w.t(), out=out[:, i])


def forward(xs, proj_weights, proj_biases, gate_weight, gate_bias):
    lead = xs[0].shape[:-1]
    m, h = len(xs), proj_weights[0].shape[0]
    x2 = [rows2d(x) for x in xs]
    h_pre = torch.empty((x2[0].shape[0], m, h), dtype=xs[0].dtype, device=xs[0].device)
    if h_pre.numel() > 0:
        _projections(x2, proj_weights, proj_biases, h_pre)
    z, _ = concat_linear_triton.forward(xs, gate_weight, gate_bias, None)
    return h_pre.view(*lead, m, h), z


# the backward's GEMMs are the vendor library's on every backend: the reference backend's explicit
# formulas (cuBLAS on GPUs), documented above
backward = _reference.backward
