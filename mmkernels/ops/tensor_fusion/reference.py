"""tensor_fusion in plain PyTorch: the specification (Linear over the flattened outer product of
``[1, z_m]``, ``z_M`` innermost), the CPU backend, and the eager baseline of the benchmark."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...backend import Capabilities


def augment(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D + 1]`` with the leading 1."""
    return torch.cat([x.new_ones((*x.shape[:-1], 1)), x], dim=-1)


def outer(xs) -> torch.Tensor:
    """The flattened outer product ``[..., Π(D_m + 1)]`` (``ẑ_M`` innermost, as torch.einsum orders it)."""
    z = augment(xs[0])
    for x in xs[1:]:
        a = augment(x)
        z = (z.unsqueeze(-1) * a.unsqueeze(-2)).flatten(-2)
    return z


def tensor_fusion_ref(xs, weight, bias):
    """The composition eager code writes: materialise the outer product, then ``F.linear``."""
    return F.linear(outer(list(xs)), weight, bias)


def _chunk_rows(k: int) -> int:
    """Rows per chunk of the CPU path: ~12 MB of fp32 outer product (and as much of its gradient)."""
    return max(1, (3 << 20) // max(k, 1))


class _ChunkedTFN(torch.autograd.Function):
    """Forward and backward chunk by chunk of rows: each chunk's outer product is built, used and
    dropped (the backward rebuilds it); ``dweight`` accumulates in one buffer (``addmm_``)."""

    @staticmethod
    def forward(ctx, rows_per_chunk, weight, bias, *x2):
        rows = x2[0].shape[0]
        out = weight.new_empty((rows, weight.shape[0]))
        for r0 in range(0, rows, rows_per_chunk):
            a = outer([x[r0:r0 + rows_per_chunk] for x in x2])
            if bias is None:
                torch.mm(a, weight.t(), out=out[r0:r0 + rows_per_chunk])
            else:
                torch.addmm(bias, a, weight.t(), out=out[r0:r0 + rows_per_chunk])
        ctx.rows_per_chunk, ctx.has_bias = rows_per_chunk, bias is not None
        ctx.save_for_backward(weight, *x2)
        return out

    @staticmethod
    def backward(ctx, dy):
        weight, *x2 = ctx.saved_tensors
        rows, c = x2[0].shape[0], ctx.rows_per_chunk
        need = ctx.needs_input_grad
        dw = torch.zeros_like(weight) if need[1] else None
        dxs = [torch.empty_like(x) for x in x2]
        for r0 in range(0, rows, c):
            with torch.enable_grad():
                xc = [x[r0:r0 + c].detach().requires_grad_() for x in x2]
                a = outer(xc)
            g = dy[r0:r0 + c]
            if dw is not None:
                dw.addmm_(g.t(), a.detach())
            for d, gx in zip(dxs, torch.autograd.grad(a, xc, g @ weight)):
                d[r0:r0 + c] = gx
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        return (None, dw, db, *dxs)


def tensor_fusion_chunked(xs, weight, bias, rows_per_chunk: Optional[int] = None):
    """The CPU path: the same result with at most ``rows_per_chunk`` rows of the outer product
    (and of its gradient) alive at once, forward and backward."""
    xs = list(xs)
    lead, h = xs[0].shape[:-1], weight.shape[0]
    x2 = [x.reshape(-1, x.shape[-1]) for x in xs]
    rows = x2[0].shape[0]
    c = _chunk_rows(weight.shape[1]) if rows_per_chunk is None else rows_per_chunk
    if rows <= c:
        return tensor_fusion_ref(xs, weight, bias)
    return _ChunkedTFN.apply(c, weight, bias, *x2).view(*lead, h)


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, **_) -> Optional[str]:
    return None


def forward(xs, weight, bias):
    return tensor_fusion_chunked(xs, weight, bias)


def backward(grad_out, xs, weight, bias):
    """Gradients by ``torch.func.vjp`` of the composition: ``(dxs, dweight, dbias or None)``."""
    def f(xs_, w_, *b_):
        return tensor_fusion_ref(xs_, w_, b_[0] if b_ else None)

    primals = (list(xs), weight) + (() if bias is None else (bias,))
    _, vjp = torch.func.vjp(f, *primals)
    grads = vjp(grad_out)
    return list(grads[0]), grads[1], (grads[2] if bias is not None else None)
