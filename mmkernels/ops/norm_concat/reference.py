"""norm_concat in plain PyTorch: the specification, the CPU backend, and the eager/compile
baselines of the benchmark (``torch.compile`` of :func:`norm_concat_ref`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...backend import Capabilities


def _one(x: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor], rms: bool, eps: float):
    d = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 statistics (fp64 stays fp64)
    if rms:
        xf = x.to(acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None:
            y = y * w.to(acc)
        return y.to(x.dtype)
    if (w is None or w.dtype == x.dtype) and (b is None or b.dtype == x.dtype):
        # F.layer_norm keeps fp32 statistics for fp16/bf16 inputs on CPU and CUDA.
        return F.layer_norm(x, (d,), w, b, eps)
    y = F.layer_norm(x.to(acc), (d,), None if w is None else w.to(acc), None if b is None else b.to(acc), eps)
    return y.to(x.dtype)


def norm_concat_ref(xs: Sequence[torch.Tensor], weights: Sequence[Optional[torch.Tensor]],
                    biases: Sequence[Optional[torch.Tensor]], rms: bool, eps: float) -> torch.Tensor:
    """``cat([norm(x_m) * w_m + b_m for m], -1)``; ``weights``/``biases`` hold one entry (or None) per x."""
    return torch.cat([_one(x, w, b, rms, eps) for x, w, b in zip(xs, weights, biases)], dim=-1)


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    return None  # any device, any floating dtype


def forward(xs, weights, biases, rms: bool, eps: float) -> torch.Tensor:
    return norm_concat_ref(xs, weights, biases, rms, eps)


def backward(grad_out, xs, weights, biases, rms: bool, eps: float):
    """Gradients of :func:`norm_concat_ref` by ``torch.func.vjp`` (works inside the custom op, below
    the autograd dispatch key): ``(dxs, dweights, dbiases)`` with None where a parameter is absent."""
    ws = [w for w in weights if w is not None]
    bs = [b for b in biases if b is not None]

    def f(xs_, ws_, bs_):
        wi, bi = iter(ws_), iter(bs_)
        return norm_concat_ref(xs_, [None if w is None else next(wi) for w in weights],
                               [None if b is None else next(bi) for b in biases], rms, eps)

    _, vjp = torch.func.vjp(f, list(xs), ws, bs)
    dxs, dws, dbs = vjp(grad_out)
    dwi, dbi = iter(dws), iter(dbs)
    return (list(dxs), [None if w is None else next(dwi) for w in weights],
            [None if b is None else next(dbi) for b in biases])
