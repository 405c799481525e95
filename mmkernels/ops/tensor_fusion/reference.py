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
    return _outer_z([augment(x) for x in xs])


def tensor_fusion_ref(xs, weight, bias):
    """The composition eager code writes: materialise the outer product, then ``F.linear``."""
    return F.linear(outer(list(xs)), weight, bias)


BUDGET = 1 << 21   # elements of the outer product (and as many of its gradient) alive at once: 8 MB in fp32
GPU_BUDGET = 1 << 26   # on a GPU at most 128 MB in bf16, few enough blocks that each GEMM fills the chip
GPU_SHARE = 32         # ... and at most 1/32 of the whole outer product: the peak stays under 1/10 of eager's
GPU_FLOOR = 1 << 16    # ... but blocks of 64K elements at least (small problems: few GEMMs)


def gpu_budget(rows: int, k: int) -> int:
    """The GPU implementation's blocks: elements of the ``[rows, k]`` outer product alive at once.
    Eager code holds the whole product, its gradient and the partial products (about
    ``3·rows·k``, and dweight ``H·k``); the blocked path one block and its gradient
    (``2·budget``), the other modalities' outer product and its gradient (``2·rows·K'``,
    ``K' = k / (D_0 + 1)``) and dweight: at ``budget = rows·k / 32`` under 1/10 of eager's peak
    where the batch is several times H (tfn_mosi_b1024: 8x, tfn_b4096: 16x; measured on CPU by
    tests/test_tensor_fusion.py at those proportions)."""
    return min(GPU_BUDGET, max(rows * k // GPU_SHARE, GPU_FLOOR))


def budget_for(t: torch.Tensor, rows: int, k: int) -> int:
    """How much of the ``[rows, k]`` outer product the plain and reference backends keep alive on
    ``t``'s device: :data:`BUDGET` on a CPU, :func:`gpu_budget` elsewhere."""
    return BUDGET if t.device.type == "cpu" else gpu_budget(rows, k)


def _plan(rows: int, e0: int, k_rest: int, budget: int):
    """(rows per chunk, leading-index values per block): a block is ``[rows, i0 block, K']``, the
    K columns ``i0 * K' ...`` of the outer product, with ``K' = Π_{m>0}(D_m + 1)``."""
    rc = max(1, min(rows, budget // k_rest))
    return rc, max(1, min(e0, budget // (rc * k_rest)))


_HALF = (torch.float16, torch.bfloat16)


def _mm(a, b, dtype):
    """``a @ b`` with its result in ``dtype``: the inputs' dtype, or fp32 for 16-bit ``a`` and ``b``
    (cuBLAS's fp32 output, ``out_dtype``, off the CPU; on a CPU, where torch has no ``out_dtype``
    GEMMs, an fp32 GEMM of the upcast blocks). The callers add it to an fp32 running sum
    themselves: ``addmm`` and ``baddbmm`` with ``out_dtype`` fail under fake tensors (torch.compile)
    in torch 2.11."""
    if dtype is a.dtype:
        return a @ b
    if a.device.type == "cpu":
        return a.to(dtype) @ b.to(dtype)
    return torch.mm(a, b, out_dtype=dtype)


def sum_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the blocked path sums its column blocks in: fp32 for 16-bit inputs."""
    return torch.float32 if t.dtype in _HALF else t.dtype


def blocked_forward(x2, weight, bias, budget: int = BUDGET):
    """``tensor_fusion`` of 2-D ``x2`` with at most ``budget`` elements of the outer product alive:
    blocks of K columns (a slice of ``[1, x_0]`` times the outer product of the others), so each
    row chunk reads ``weight`` once. The blocks' products are summed in fp32 for 16-bit inputs
    (one extra pass over the ``[rows, H]`` sum per block)."""
    rows, h = x2[0].shape[0], weight.shape[0]
    e0 = x2[0].shape[1] + 1
    k_rest = weight.shape[1] // e0
    rc, nb = _plan(rows, e0, k_rest, budget)
    out = weight.new_empty((rows, h))
    acc_dtype = sum_dtype(weight) if nb < e0 else weight.dtype    # one block: nothing to sum
    for r0 in range(0, rows, rc):
        z = augment(x2[0][r0:r0 + rc])
        t = outer([x[r0:r0 + rc] for x in x2[1:]])
        acc = out[r0:r0 + rc]
        for i0 in range(0, e0, nb):
            i1 = min(e0, i0 + nb)
            a = (z[:, i0:i1, None] * t[:, None, :]).flatten(1)
            wb = weight[:, i0 * k_rest:i1 * k_rest].t()
            if acc_dtype is not out.dtype:                            # an fp32 sum of 16-bit blocks
                if i0 == 0:
                    acc = _mm(a, wb, acc_dtype)
                    if bias is not None:
                        acc.add_(bias)
                else:
                    acc.add_(_mm(a, wb, acc_dtype))
            elif i0 == 0:
                if bias is None:
                    torch.mm(a, wb, out=acc)
                else:
                    torch.addmm(bias, a, wb, out=acc)
            else:
                acc.addmm_(a, wb)
        if acc_dtype is not out.dtype:
            out[r0:r0 + rc] = acc
    return out


def _outer_grads(zs, dt):
    """The gradients of the augmented ``zs`` (2-D, ``[n, E_m]``) from ``dt``, the gradient of their
    flattened outer product ``[n, Π E_m]``: peel off the leading factor, ``t = z_0 ⊗ u``."""
    n = dt.shape[0]
    if len(zs) == 1:
        return [dt]
    u = _outer_z(zs[1:])
    g = dt.view(n, zs[0].shape[1], u.shape[1])
    dz0 = torch.bmm(g, u.unsqueeze(-1)).squeeze(-1)
    du = torch.bmm(zs[0].unsqueeze(1), g).squeeze(1)
    return [dz0] + _outer_grads(zs[1:], du)


def _outer_z(zs):
    t = zs[0]
    for z in zs[1:]:
        t = (t.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
    return t


def blocked_backward(dy, x2, weight, need_x=True, need_w=True, budget: int = BUDGET):
    """``(dxs, dweight)`` of :func:`blocked_forward` (None where not needed), block by block as the
    forward: ``dweight[:, block] = dyᵀ A_block``; ``dA_block = dy W_block`` contracts at once with
    the other modalities' outer product (``d[1, x_0]``) and with ``[1, x_0]`` (the gradient of the
    others' outer product, ``K'`` wide, taken apart by :func:`_outer_grads`). dweight's sum over
    row chunks is kept in fp32 for 16-bit inputs; the others' gradient is summed over column blocks
    in the inputs' dtype (one in-GEMM accumulation per block: an fp32 sum would add a pass over
    ``[rows, K']`` per block). No autograd inside: this also runs as the registered backward op
    (under torch.compile)."""
    rows = x2[0].shape[0]
    e0 = x2[0].shape[1] + 1
    k_rest = weight.shape[1] // e0
    rc, nb = _plan(rows, e0, k_rest, budget)
    dw_dtype = sum_dtype(weight) if rc < rows else weight.dtype   # summed over row chunks
    dw = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device) if need_w else None
    dxs = [torch.empty_like(x) for x in x2] if need_x else None
    for r0 in range(0, rows, rc):
        g = dy[r0:r0 + rc]
        n = g.shape[0]
        z = augment(x2[0][r0:r0 + rc])
        rest = [augment(x[r0:r0 + rc]) for x in x2[1:]]
        t = _outer_z(rest)
        if need_x:
            dz = z.new_empty((n, e0))
            dt = torch.zeros_like(t)
        for i0 in range(0, e0, nb):
            i1 = min(e0, i0 + nb)
            cols = slice(i0 * k_rest, i1 * k_rest)
            if need_w:
                a = (z[:, i0:i1, None] * t[:, None, :]).flatten(1)
                if dw_dtype is weight.dtype:
                    dw[:, cols].addmm_(g.t(), a)
                else:
                    dw[:, cols].add_(_mm(g.t(), a, dw_dtype))
            if need_x:
                ga = (g @ weight[:, cols]).view(n, i1 - i0, k_rest)
                dz[:, i0:i1] = torch.bmm(ga, t.unsqueeze(-1)).squeeze(-1)
                dt.unsqueeze(1).baddbmm_(z[:, None, i0:i1], ga)
        if need_x:
            for d, gz in zip(dxs, [dz] + _outer_grads(rest, dt)):
                d[r0:r0 + rc] = gz[:, 1:]
    return dxs, (None if dw is None else dw.to(weight.dtype))


class _BlockedTFN(torch.autograd.Function):
    """The CPU path under autograd: :func:`blocked_forward`, :func:`blocked_backward`."""

    @staticmethod
    def forward(ctx, budget, weight, bias, *x2):
        ctx.budget, ctx.has_bias = budget, bias is not None
        ctx.save_for_backward(weight, *x2)
        return blocked_forward(x2, weight, bias, budget)

    @staticmethod
    def backward(ctx, dy):
        weight, *x2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dxs, dw = blocked_backward(dy, x2, weight, any(need[3:]), need[1], ctx.budget)
        db = dy.sum(0) if ctx.has_bias and need[2] else None
        return (None, dw, db, *(dxs if dxs is not None else [None] * len(x2)))


def tensor_fusion_chunked(xs, weight, bias, budget: Optional[int] = None):
    """The CPU path: the same result with at most ``budget`` elements of the outer product (and of
    its gradient) alive at once, forward and backward, each ``weight`` column block read once per
    chunk of rows."""
    xs = list(xs)
    x0 = xs[0]
    b = BUDGET if budget is None else budget
    if x0.numel() // x0.shape[-1] * weight.shape[1] <= b:   # the outer product fits: the composition
        return tensor_fusion_ref(xs, weight, bias)
    x2 = [x.reshape(-1, x.shape[-1]) for x in xs]
    return _BlockedTFN.apply(b, weight, bias, *x2).view(*x0.shape[:-1], weight.shape[0])


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, **_) -> Optional[str]:
    return None


def rows_of(xs) -> int:
    """The rows of the flattened leading dims."""
    return xs[0].numel() // xs[0].shape[-1]


def forward(xs, weight, bias):
    return tensor_fusion_chunked(xs, weight, bias, budget_for(weight, rows_of(xs), weight.shape[1]))


def backward(grad_out, xs, weight, bias):
    """``(dxs, dweight, dbias or None)`` by :func:`blocked_backward` (the outer product is not
    materialised here either)."""
    return backward_in_blocks(grad_out, xs, weight, bias, budget_for(weight, rows_of(xs), weight.shape[1]))


def backward_in_blocks(grad_out, xs, weight, bias, budget: int):
    """:func:`backward` with at most ``budget`` elements of the outer product alive."""
    xs = list(xs)
    x2 = [x.reshape(-1, x.shape[-1]) for x in xs]
    g2 = grad_out.reshape(-1, weight.shape[0])
    dxs, dw = blocked_backward(g2, x2, weight, budget=budget)
    return [d.view(x.shape) for d, x in zip(dxs, xs)], dw, (g2.sum(0) if bias is not None else None)
