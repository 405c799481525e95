"""tensor_fusion in Triton: implicit GEMMs whose K loop builds the outer-product tile in registers.

K = Π(D_m + 1) is walked as an outer index ``o`` over the first modalities (Π_{m<M}(D_m + 1),
padded to three with size-1 modalities whose only entry is the leading 1) and an inner index over
``ẑ_M``: the A tile of K columns ``[o·E_M + l0, o·E_M + l0 + BK)`` is ``ẑ_M[:, l0:l0+BK]`` scaled
by the product of the other modalities' scalars at ``o`` (masked where ``l`` passes ``E_M``).

* ``_tfn_fwd_kernel``: ``out = A @ weight.T + bias``; weight tiles ``[BN, BK]`` are read along K,
  contiguous in memory (coalesced).
* ``_tfn_dw_kernel``: ``dweight[:, K tile] = dout.T @ A[:, K tile]``, A rebuilt per row tile.
* ``_tfn_dx_kernel``: per row tile, ``g = dout @ weight[:, K tile]`` (the gradient of A's tile,
  never stored) is contracted with the other modalities: into ``dẑ_M`` (times the outer scalars)
  and into each outer modality's entry at ``o`` (times ``ẑ_M`` and the remaining scalars). Each
  program owns its rows, so the fp32 accumulators ``dẑ_m`` are updated in place without atomics.

Offsets into the weight are int64 (K·H can pass 2^31).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backend import KERNEL_CAPABILITIES
from .._util import dot_precision, rows2d
from ...runtime import HAS_TRITON, TRITON_INTERPRET, cdiv, launch, next_pow2, triton_why_not

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scalar(X, SX, rows, rmask, idx, E):
        """ẑ[rows, idx] for a modality of width E = D + 1 (idx 0: the leading 1)."""
        v = tl.load(X + rows * SX + (idx - 1), mask=rmask & (idx > 0) & (E > 1), other=1.0)
        return v.to(tl.float32)

    @triton.jit
    def _outer_scalars(X0, S0, X1, S1, X2, S2, E0, E1, E2, rows, rmask, o):
        """Outer index o -> (i0, i1, i2) and the scalars ẑ_0[i0], ẑ_1[i1], ẑ_2[i2] of these rows."""
        i2 = o % E2
        i1 = (o // E2) % E1
        i0 = o // (E2 * E1)
        s0 = _scalar(X0, S0, rows, rmask, i0, E0)
        s1 = _scalar(X1, S1, rows, rmask, i1, E1)
        s2 = _scalar(X2, S2, rows, rmask, i2, E2)
        return i0, i1, i2, s0, s1, s2

    @triton.jit
    def _a_tile(X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL, rows, rmask, o, l0,
                BK: tl.constexpr):
        """(A tile [BM, BK] in fp32, outer scalar product s [BM], ẑ_M tile [BM, BK])."""
        i0, i1, i2, s0, s1, s2 = _outer_scalars(X0, S0, X1, S1, X2, S2, E0, E1, E2, rows, rmask, o)
        s = s0 * s1 * s2
        ls = l0 + tl.arange(0, BK)
        zl = tl.load(XL + rows[:, None] * SL + (ls - 1)[None, :],
                     mask=rmask[:, None] & ((ls > 0) & (ls < EL))[None, :], other=0.0).to(tl.float32)
        zl = tl.where((ls == 0)[None, :], 1.0, zl)
        return zl * s[:, None], s0, s1, s2, zl

    @triton.jit
    def _tfn_fwd_kernel(X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL, W, SW, BIAS, OUT, SO, B, H,
                        HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < B
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < H
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        n_outer = E0 * E1 * E2
        for o in range(0, n_outer):
            for l0 in range(0, EL, BK):
                a, s0, s1, s2, zl = _a_tile(X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL, rows, rmask, o, l0, BK)
                ks = l0 + tl.arange(0, BK)
                kk = o * EL.to(tl.int64) + ks
                w = tl.load(W + cols.to(tl.int64)[:, None] * SW + kk[None, :],
                            mask=cmask[:, None] & (ks < EL)[None, :], other=0.0)
                acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rows[:, None] * SO + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _tfn_dw_kernel(X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL, DY, SDY, DW, SDW, B, H,
                       DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """dweight[n tile, K tile (o, l0)] = dout[:, n tile].T @ A[:, K tile]."""
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        n_l = tl.cdiv(EL, BK)
        o = pid_k // n_l
        l0 = (pid_k % n_l) * BK
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < H
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        for r0 in range(0, B, BM):
            rows = (r0 + tl.arange(0, BM)).to(tl.int64)
            rmask = rows < B
            a, s0, s1, s2, zl = _a_tile(X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL, rows, rmask, o, l0, BK)
            dy = tl.load(DY + rows[:, None] * SDY + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(tl.trans(dy), a.to(dy.dtype), acc, input_precision=DOT_PREC)
        ks = l0 + tl.arange(0, BK)
        kk = o * EL.to(tl.int64) + ks
        tl.store(DW + cols.to(tl.int64)[:, None] * SDW + kk[None, :], acc.to(DW.dtype.element_ty),
                 mask=cmask[:, None] & (ks < EL)[None, :])

    @triton.jit
    def _tfn_dx_kernel(X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL, W, SW, DY, SDY,
                       G0, G1, G2, GL, B, H,
                       DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """The gradients of ẑ_m (fp32 [B, E_m] each, zero-initialised) for one row tile."""
        pid_m = tl.program_id(0)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < B
        n_outer = E0 * E1 * E2
        for o in range(0, n_outer):
            i0, i1, i2, s0, s1, s2 = _outer_scalars(X0, S0, X1, S1, X2, S2, E0, E1, E2, rows, rmask, o)
            t = tl.zeros([BM], dtype=tl.float32)   # Σ_l g[:, (o, l)] ẑ_M[:, l]
            for l0 in range(0, EL, BK):
                a, u0, u1, u2, zl = _a_tile(X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL, rows, rmask, o, l0, BK)
                ks = l0 + tl.arange(0, BK)
                kmask = ks < EL
                kk = o * EL.to(tl.int64) + ks
                g = tl.zeros([BM, BK], dtype=tl.float32)
                for n0 in range(0, H, BN):
                    cols = n0 + tl.arange(0, BN)
                    cmask = cols < H
                    dy = tl.load(DY + rows[:, None] * SDY + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                                 other=0.0)
                    w = tl.load(W + cols.to(tl.int64)[:, None] * SW + kk[None, :],
                                mask=cmask[:, None] & kmask[None, :], other=0.0)
                    g = tl.dot(dy, w, g, input_precision=DOT_PREC)
                t += tl.sum(g * zl, axis=1)
                gl_ptr = GL + rows[:, None] * EL + ks[None, :]
                gmask = rmask[:, None] & kmask[None, :]
                tl.store(gl_ptr, tl.load(gl_ptr, mask=gmask, other=0.0) + g * (s0 * s1 * s2)[:, None], mask=gmask)
            p0 = G0 + rows * E0 + i0
            tl.store(p0, tl.load(p0, mask=rmask, other=0.0) + t * s1 * s2, mask=rmask)
            p1 = G1 + rows * E1 + i1
            tl.store(p1, tl.load(p1, mask=rmask, other=0.0) + t * s0 * s2, mask=rmask)
            p2 = G2 + rows * E2 + i2
            tl.store(p2, tl.load(p2, mask=rmask, other=0.0) + t * s0 * s1, mask=rmask)


# --- launchers -----------------------------------------------------------------------------------

# 8 warps: the fp32 accumulators and the generated operand tiles fit without spilling on sm_90
_WARPS = 4 if TRITON_INTERPRET else 8


def _tiles(dtype):
    """(BM, BN, BK): one small tile under the interpreter; Hopper-sized otherwise."""
    if TRITON_INTERPRET:
        return 16, 16, 16
    if dtype == torch.float32 and dot_precision(dtype) == "ieee":   # FMA dots; BM 32 spills 8 bytes on sm_90
        return 16, 32, 32
    return 64, 128, 32


def _operands(xs):
    """Rows-major 2-D modalities padded in front to four (size-1 modalities: pointer to the last
    one, never read), as kernel arguments ``X0, S0, X1, S1, X2, S2, XL, SL, E0, E1, E2, EL``."""
    x2 = [rows2d(x) for x in xs]
    x2 = [x if x.stride(-1) == 1 else x.contiguous() for x in x2]
    outer = [None] * (4 - len(x2)) + x2[:-1]
    last = x2[-1]
    ptrs, widths = [], []
    for x in outer:
        ptrs += [last, 0] if x is None else [x, x.stride(0)]
        widths.append(1 if x is None else x.shape[1] + 1)
    return x2, [*ptrs, last, last.stride(0), *widths, last.shape[1] + 1]


CAPABILITIES = KERNEL_CAPABILITIES


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    return triton_why_not(xs, explicit)


def forward(xs, weight, bias):
    lead = xs[0].shape[:-1]
    x2, ops = _operands(xs)
    rows, h = x2[0].shape[0], weight.shape[0]
    out = torch.empty((rows, h), dtype=xs[0].dtype, device=xs[0].device)
    if rows and h:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        bm, bn, bk = _tiles(w.dtype)
        bn = min(bn, max(16, next_pow2(h)))
        bk = min(bk, max(16, next_pow2(ops[-1])))
        grid = (cdiv(rows, bm), cdiv(h, bn))
        launch(_tfn_fwd_kernel, grid, *ops, w, w.stride(0), out if bias is None else bias.contiguous(),
               out, out.stride(0), rows, h, HAS_BIAS=bias is not None, DOT_PREC=dot_precision(w.dtype),
               BM=bm, BN=bn, BK=bk, num_warps=_WARPS)
    return out.view(*lead, h)


def backward(grad_out, xs, weight, bias):
    """``(dxs, dweight, dbias or None)``."""
    h = weight.shape[0]
    x2, ops = _operands(xs)
    rows = x2[0].shape[0]
    dy = grad_out.reshape(-1, h)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    dev = w.device
    widths = ops[8:12]
    bm, bn, bk = _tiles(w.dtype)
    bn = min(bn, max(16, next_pow2(h)))
    bk = min(bk, max(16, next_pow2(widths[-1])))
    prec = dot_precision(w.dtype)
    dweight = torch.empty((h, weight.shape[1]), dtype=weight.dtype, device=dev)
    grads = [torch.zeros((rows, e), dtype=torch.float32, device=dev) for e in widths]
    if rows == 0 or h == 0:
        dweight.zero_()
    else:
        n_outer = widths[0] * widths[1] * widths[2]
        launch(_tfn_dw_kernel, (n_outer * cdiv(widths[-1], bk), cdiv(h, bn)), *ops,
               dy, dy.stride(0), dweight, dweight.stride(0), rows, h, DOT_PREC=prec, BM=bm, BN=bn, BK=bk,
               num_warps=_WARPS)
        launch(_tfn_dx_kernel, (cdiv(rows, bm),), *ops, w, w.stride(0), dy, dy.stride(0), *grads,
               rows, h, DOT_PREC=prec, BM=bm, BN=bn, BK=bk, num_warps=_WARPS)
    m = len(xs)
    dxs = [g[:, 1:].to(x.dtype).reshape(x.shape) for g, x in zip(grads[4 - m:], xs)]
    dbias = None if bias is None else dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return dxs, dweight, dbias
