"""gated_sum on the CUDA C++ backend: ``torch.ops.mmkernels.cuda_gated_sum_{fwd,bwd}``
(csrc/gated_sum.cu; registered by csrc/gated_sum_ops.cpp), built or loaded by :mod:`mmkernels.cuda`."""
from __future__ import annotations

from typing import Optional

from ... import cuda as _ext
from ...backend import KERNEL_CAPABILITIES, Capabilities, Limit

MAX_M = 32  # the modality-gate backward keeps modality m's dz sum in lane m of a warp


CAPABILITIES = Capabilities(dtypes=KERNEL_CAPABILITIES.dtypes, limits=(
    Limit("modalities", lambda h_pre, **_: h_pre.shape[-2], MAX_M, "one warp lane per modality"),))


def why_not(explicit: bool, h_pre, **_) -> Optional[str]:
    return _ext.why_not(h_pre, explicit)


def forward(h_pre, z, modality_mask):
    return _ext.ops().cuda_gated_sum_fwd(h_pre, z, modality_mask)


def backward(grad_out, h_pre, z, modality_mask):
    dh, dz = _ext.ops().cuda_gated_sum_bwd(grad_out, h_pre, z, modality_mask)
    return dh, dz
