"""norm_concat on the CUDA C++ backend: ``torch.ops.mmkernels.cuda_norm_concat_{fwd,bwd}``
(csrc/norm_concat.cu; registered by csrc/norm_concat_ops.cpp), built or loaded by :mod:`mmkernels.cuda`."""
from __future__ import annotations

from typing import Optional

import torch

from ... import cuda as _ext
from ...backend import KERNEL_CAPABILITIES
from .._util import dense

CAPABILITIES = KERNEL_CAPABILITIES


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    return _ext.why_not(xs[0], explicit)


def forward(xs, weights, biases, rms: bool, eps: float) -> torch.Tensor:
    return _ext.ops().cuda_norm_concat_fwd(list(xs), dense(weights), dense(biases), rms, eps)


def backward(grad_out, xs, weights, biases, rms: bool, eps: float):
    flat = _ext.ops().cuda_norm_concat_bwd(grad_out, list(xs), dense(weights), dense(biases), rms, eps)
    m = len(xs)
    it = iter(flat[m:])
    dws = [None if w is None else next(it) for w in weights]
    dbs = [None if b is None else next(it) for b in biases]
    return list(flat[:m]), dws, dbs
