"""norm_concat on CPU tensors: what ``auto`` runs on CPU tensors, eagerly and under ``torch.compile``.

The eager composition (:func:`reference.norm_concat_ref`) with one native call per modality —
``torch.layer_norm`` / ``torch.rms_norm`` (fp32 statistics for 16-bit inputs, as the reference),
not the ``torch.nn.functional`` wrappers nor RMSNorm spelt out in five operations — and the
widths the argument checks already read. Norm parameters in fp32 next to 16-bit inputs take the
reference's upcast formulation.
"""
from __future__ import annotations

import torch

from .reference import _one


def norm_concat_cpu(xs, dims, weights, biases, rms: bool, eps: float) -> torch.Tensor:
    """``cat([norm(x_m) * w_m + b_m for m], -1)`` (checked arguments; ``dims``: the xs' widths)."""
    dtype = xs[0].dtype
    ys = []
    for x, d, w, b in zip(xs, dims, weights, biases):
        if (w is None or w.dtype is dtype) and (b is None or b.dtype is dtype):
            ys.append(torch.rms_norm(x, (d,), w, eps) if rms else torch.layer_norm(x, (d,), w, b, eps))
        else:
            ys.append(_one(x, w, b, rms, eps))
    return torch.cat(ys, -1)
