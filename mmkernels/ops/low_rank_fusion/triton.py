"""low_rank_fusion in Triton.

``_lmf_fwd_kernel``: per output tile ``[BM, BN]``, for each rank r and modality m the small GEMM
``[1, x_m] @ F_m[r]`` (K = D_m + 1; row 0 of the factor is the bias of the leading 1) runs into
registers, the product over m and the weighted sum over r stay there: the ``[M, R, rows, H]``
intermediates of eager code never reach memory. Factor tiles ``[BK, BN]`` are read along H
(contiguous, coalesced).

``_lmf_bwd_kernel`` recomputes the per-rank projections per tile and writes the leave-one-out
gradients ``G_m[r] = dout · w_r · Π_{m'≠m} P_{m'}[r]`` (computed in fp32, stored in the input
dtype, as flash attention stores its dP) and per-tile partial sums for ``drank_weights``; ``dx_m``
and ``dF_m`` are then two GEMMs over G_m in the input dtype with fp32 accumulation: tensor-core
GEMMs for 16-bit inputs. (With G stored and multiplied in fp32, as at first, the backward took
about 18.5 ms of lmf_b16384's 20.4 ms fwd+bwd on the H200 run of 2026-12-04, against eager's
11.7 ms in all: 0.8 GB of fp32 G written and read, and 0.3 TFLOP each for dx and dF in fp32
GEMMs.)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...backend import KERNEL_CAPABILITIES, Limit
from .._util import dot_precision, rows2d
from ...runtime import HAS_TRITON, TRITON_INTERPRET, cdiv, launch, next_pow2, triton_why_not, unbuilt_on
from ..tensor_fusion.reference import augment

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _proj(X, SX, D, F, r, rows, rmask, cols, cmask, H, DOT_PREC: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """P[rows, cols] = [1, x] @ F[r] in fp32 (F contiguous [R, D + 1, H])."""
        base = F + r * (D + 1) * H
        p = tl.zeros([BM, BN], dtype=tl.float32) + tl.load(base + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < D
            x = tl.load(X + rows[:, None] * SX + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            f = tl.load(base + (1 + ks)[:, None] * H + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            p = tl.dot(x, f, p, input_precision=DOT_PREC)
        return p

    @triton.jit
    def _projs(X0, S0, D0, F0, X1, S1, D1, F1, X2, S2, D2, F2, X3, S3, D3, F3, r, rows, rmask, cols, cmask, H,
               M: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        p0 = _proj(X0, S0, D0, F0, r, rows, rmask, cols, cmask, H, DOT_PREC, BM, BN, BK)
        p1 = _proj(X1, S1, D1, F1, r, rows, rmask, cols, cmask, H, DOT_PREC, BM, BN, BK)
        p2 = tl.full([BM, BN], 1.0, tl.float32)
        p3 = tl.full([BM, BN], 1.0, tl.float32)
        if M > 2:
            p2 = _proj(X2, S2, D2, F2, r, rows, rmask, cols, cmask, H, DOT_PREC, BM, BN, BK)
        if M > 3:
            p3 = _proj(X3, S3, D3, F3, r, rows, rmask, cols, cmask, H, DOT_PREC, BM, BN, BK)
        return p0, p1, p2, p3

    @triton.jit
    def _lmf_fwd_kernel(X0, S0, D0, F0, X1, S1, D1, F1, X2, S2, D2, F2, X3, S3, D3, F3, RW, BIAS, OUT, SO, B, H, R,
                        M: tl.constexpr, HAS_RW: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < B
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < H
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for r in range(0, R):
            p0, p1, p2, p3 = _projs(X0, S0, D0, F0, X1, S1, D1, F1, X2, S2, D2, F2, X3, S3, D3, F3, r, rows, rmask,
                                    cols, cmask, H, M, DOT_PREC, BM, BN, BK)
            w = 1.0
            if HAS_RW:
                w = tl.load(RW + r).to(tl.float32)
            acc += w * (p0 * p1 * p2 * p3)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rows[:, None] * SO + cols[None, :], acc.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _lmf_bwd_kernel(X0, S0, D0, F0, X1, S1, D1, F1, X2, S2, D2, F2, X3, S3, D3, F3, RW, DY, SDY, G, DWP,
                        B, H, R, M: tl.constexpr, HAS_RW: tl.constexpr, DOT_PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """G: [M, R, B, H] (the input dtype, or fp32); DWP: fp32 [programs, R] partial sums of
        dout · Π_m P_m[r]."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rmask = rows < B
        cols = pid_n * BN + tl.arange(0, BN)
        cmask = cols < H
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(DY + rows[:, None] * SDY + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        pid = pid_m * tl.num_programs(1) + pid_n
        plane = B.to(tl.int64) * H
        for r in range(0, R):
            p0, p1, p2, p3 = _projs(X0, S0, D0, F0, X1, S1, D1, F1, X2, S2, D2, F2, X3, S3, D3, F3, r, rows, rmask,
                                    cols, cmask, H, M, DOT_PREC, BM, BN, BK)
            tl.store(DWP + pid * R + r, tl.sum(tl.sum(dy * (p0 * p1 * p2 * p3), axis=1), axis=0))
            w = 1.0
            if HAS_RW:
                w = tl.load(RW + r).to(tl.float32)
            dyw = dy * w
            off = rows[:, None] * H + cols[None, :]
            tl.store(G + (0 * R + r) * plane + off, (dyw * p1 * p2 * p3).to(G.dtype.element_ty), mask=mask)
            tl.store(G + (1 * R + r) * plane + off, (dyw * p0 * p2 * p3).to(G.dtype.element_ty), mask=mask)
            if M > 2:
                tl.store(G + (2 * R + r) * plane + off, (dyw * p0 * p1 * p3).to(G.dtype.element_ty), mask=mask)
            if M > 3:
                tl.store(G + (3 * R + r) * plane + off, (dyw * p0 * p1 * p2).to(G.dtype.element_ty), mask=mask)


# 8 warps: the fp32 accumulators and the generated operand tiles fit without spilling on sm_90
_WARPS = 4 if TRITON_INTERPRET else 8


def _tiles(dtype, h, dmax):
    if TRITON_INTERPRET:
        bm, bn, bk = 16, 16, 16
    elif dtype == torch.float32 and dot_precision(dtype) == "ieee":
        bm, bn, bk = 32, 64, 32
    else:
        bm, bn, bk = 64, 64, 64
    return bm, min(bn, max(16, next_pow2(h))), min(bk, max(16, next_pow2(dmax)))


def _operands(xs, factors):
    x2 = [rows2d(x) for x in xs]
    x2 = [x if x.stride(-1) == 1 else x.contiguous() for x in x2]
    fs = [f.contiguous() for f in factors]
    args = []
    for i in range(4):
        j = min(i, len(xs) - 1)
        args += [x2[j], x2[j].stride(0), x2[j].shape[1], fs[j]]
    return x2, fs, args


MAX_M = 4   # the kernels' modality slots (X0..X3); at least two projections are multiplied
CAPABILITIES = dataclasses.replace(KERNEL_CAPABILITIES, limits=(
    Limit("modalities", lambda xs, **_: len(xs), MAX_M, "the kernels have four modality slots"),))


# Triton 3.6 cannot compile the backward for Blackwell datacenter GPUs (sm_100) in some
# configurations (its TritonNvidiaGPUOptimizeTMemLayoutsPass fails: "parent layout must have at
# least rank >= 2"; the ahead-of-time compile shows it): the backend declares it instead of
# failing at the first backward launch, and auto takes another backend there.
UNBUILT = {10: "the backward kernel fails to compile in some configurations (Triton 3.6's TMem layout pass)"}


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    if len(xs) < 2:
        return f"{len(xs)} modality < 2 (the kernels multiply at least two projections)"
    return triton_why_not(xs, explicit) or unbuilt_on(xs[0].device, UNBUILT)


def forward(xs, factors, rank_weights, bias):
    lead = xs[0].shape[:-1]
    x2, fs, args = _operands(xs, factors)
    rows, (r, _, h) = x2[0].shape[0], fs[0].shape
    out = torch.empty((rows, h), dtype=xs[0].dtype, device=xs[0].device)
    if rows:
        bm, bn, bk = _tiles(out.dtype, h, max(x.shape[1] for x in x2))
        launch(_lmf_fwd_kernel, (cdiv(rows, bm), cdiv(h, bn)), *args,
               out if rank_weights is None else rank_weights.contiguous(), out if bias is None else bias.contiguous(),
               out, out.stride(0), rows, h, r, M=len(xs), HAS_RW=rank_weights is not None, HAS_BIAS=bias is not None,
               DOT_PREC=dot_precision(out.dtype), BM=bm, BN=bn, BK=bk, num_warps=_WARPS)
    return out.view(*lead, h)


def backward(grad_out, xs, factors, rank_weights, bias):
    """``(dxs, dfactors, drank_weights or None, dbias or None)``."""
    x2, fs, args = _operands(xs, factors)
    rows, (r, _, h) = x2[0].shape[0], fs[0].shape
    m = len(xs)
    dy = grad_out.reshape(-1, h)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dev = dy.device
    bm, bn, bk = _tiles(dy.dtype, h, max(x.shape[1] for x in x2))
    grid = (cdiv(rows, bm), cdiv(h, bn))
    g = torch.empty((m, r, rows, h), dtype=dy.dtype, device=dev)      # every element is written
    dwp = torch.zeros((max(1, grid[0] * grid[1]), r), dtype=torch.float32, device=dev)
    if rows:
        launch(_lmf_bwd_kernel, grid, *args, dy if rank_weights is None else rank_weights.contiguous(), dy,
               dy.stride(0), g, dwp, rows, h, r, M=m, HAS_RW=rank_weights is not None,
               DOT_PREC=dot_precision(dy.dtype), BM=bm, BN=bn, BK=bk, num_warps=_WARPS)
    dxs, dfs = [], []
    for i, (x, xr, f) in enumerate(zip(xs, x2, fs)):
        gm = g[i]                                                            # [R, rows, H]
        dx = torch.einsum("rbh,rkh->bk", gm, f[:, 1:].to(gm.dtype))
        dxs.append(dx.to(x.dtype).reshape(x.shape))
        dfs.append(torch.matmul(augment(xr).to(gm.dtype).t().unsqueeze(0), gm).to(f.dtype))  # [R, D+1, H]
    dw = None if rank_weights is None else dwp.sum(0).to(rank_weights.dtype)
    db = None if bias is None else dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return dxs, dfs, dw, db
