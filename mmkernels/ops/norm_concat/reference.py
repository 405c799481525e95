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
    """``(dxs, dweights, dbiases)`` of :func:`norm_concat_ref` (None where a parameter is absent) by
    the explicit formulas, per modality on its column slice of ``grad_out``: LayerNorm through ATen's
    own ``native_layer_norm_backward`` (the statistics recomputed in one pass: only the inputs are
    saved), RMSNorm by ``dx = r (g w - y mean(g w y))``, ``dw = Σ_rows g y`` with
    ``r = rsqrt(mean(x²) + eps)``, ``y = x r``; fp32 math for 16-bit inputs, as the forward."""
    dxs, dws, dbs, off = [], [], [], 0
    for x, w, b in zip(xs, weights, biases):
        d = x.shape[-1]
        dx, dw, db = _one_backward(grad_out[..., off:off + d], x, w, b, rms, eps)
        dxs.append(dx)
        dws.append(dw)
        dbs.append(db)
        off += d
    return dxs, dws, dbs


def _one_backward(g, x, w, b, rms: bool, eps: float):
    d = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    if rms:
        xf, gf = x.to(acc), g.to(acc)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = xf * r
        gw = gf if w is None else gf * w.to(acc)
        dx = r * (gw - y * (gw * y).mean(-1, keepdim=True))
        dw = None if w is None else (gf * y).reshape(-1, d).sum(0).to(w.dtype)
        return dx.to(x.dtype), dw, None
    if (w is None or w.dtype == x.dtype) and (b is None or b.dtype == x.dtype):   # as the forward
        xx, ww, bb, gg = x, w, b, g
    else:
        xx, gg = x.to(acc), g.to(acc)
        ww, bb = (None if w is None else w.to(acc)), (None if b is None else b.to(acc))
    _, mean, rstd = torch.ops.aten.native_layer_norm(xx, (d,), ww, bb, eps)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(gg, xx, (d,), mean, rstd, ww, bb,
                                                           [True, w is not None, b is not None])
    return (dx.to(x.dtype), None if w is None else dw.to(w.dtype), None if b is None else db.to(b.dtype))
