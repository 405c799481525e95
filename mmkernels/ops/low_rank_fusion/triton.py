"""low_rank_fusion in Triton: two designs of each pass, candidates of the slots
``low_rank_fusion.fwd`` and ``low_rank_fusion.bwd`` (:mod:`mmkernels.candidates`; the GPU check's
tournament picks per GPU).

``gemm`` (the default): the per-rank projections as one cuBLAS GEMM per modality, the rank folded
into the GEMM's columns, ``P_m = x_m @ W_m + c_m`` with ``W_m = F_m[:, 1:]`` laid out ``[D_m, R·H]``
and ``c_m = F_m[:, 0]`` (the leading 1's row) in the GEMM's bias epilogue; then ONE Triton kernel
over ``[rows, H]`` tiles: ``_lmf_prod_kernel`` multiplies the M projections and sums over the ranks,
weighted, in fp32. The backward recomputes the projections (only the inputs are saved),
``_lmf_grad_kernel`` writes the leave-one-out gradients ``G_m = dy · w_r · Π_{k≠m} P_k`` (the
input dtype, as flash attention stores its dP) and per-tile partial sums of ``drank_weights``;
then per modality two cuBLAS GEMMs: ``dx_m = G_m @ W_mᵀ`` and ``[1, x_m]ᵀ @ G_m`` (dF_m, the
leading-1 row included). Any number of modalities.

Counts (bf16, e = 2 bytes; lmf_b16384: rows 16384, D 768+1024+512, R 8, H 512, M 3):

* forward GEMMs ``2·rows·R·H·ΣD`` = 309 GFLOP; bytes: x and W read, P written
  ``M·rows·R·H·e`` = 403 MB; ``_lmf_prod_kernel`` reads P (403 MB) and writes ``rows·H·e``
  (17 MB): about 0.82 GB in all, 0.17 ms at 4.8 TB/s, beside the GEMMs' 0.31 ms at 989 TFLOP/s.
* backward: the projections again (309 GFLOP, P written 403 MB), ``_lmf_grad_kernel`` reads P and
  dy (420 MB), writes G (403 MB); dx and dF: 2 x 309 GFLOP reading G twice (806 MB): 927 GFLOP
  and about 2.1 GB, 0.94 ms + 0.44 ms at the H200's peaks.
* fwd+bwd floor of the design: 1.24 TFLOP (1.25 ms) and 2.9 GB (0.61 ms) at the peaks, a sum of
  1.9 ms if nothing overlaps; the projections' recompute is a quarter of the FLOPs.

``fused``: per output tile ``[BM, BN]``, for each rank r and modality m the small GEMM
``[1, x_m] @ F_m[r]`` (K = D_m + 1) runs into registers (``tl.dot``), the product over m and the
weighted sum over r stay there: no ``[M, rows, R·H]`` intermediate, at the price of GEMMs of one
rank's ``[BK, BN]`` factor tiles per program (R times more programs' worth of small dots than one
large GEMM; the H200 run of 2026-12-04 timed lmf_b16384 at 20.4 ms fwd+bwd with it, eager 11.7 ms).
``_lmf_bwd_kernel`` recomputes the per-rank projections per tile and writes the same G (input
dtype) and per-row partial sums for ``drank_weights``; ``dx_m`` and ``dF_m`` are two GEMMs over G.
Two to four modalities (four kernel slots).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import candidates
from ...backend import KERNEL_CAPABILITIES
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
    def _out_tile(B, H, BM: tl.constexpr, BN: tl.constexpr):
        """This program's ``[BM, BN]`` tile of ``[B, H]``: (column tile index, rows as int64, row
        mask, columns, column mask)."""
        pid_n = tl.program_id(1)
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        return pid_n, rows, rows < B, cols, cols < H

    @triton.jit
    def _lmf_fwd_kernel(X0, S0, D0, F0, X1, S1, D1, F1, X2, S2, D2, F2, X3, S3, D3, F3, RW, BIAS, OUT, SO, B, H, R,
                        M: tl.constexpr, HAS_RW: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n, rows, rmask, cols, cmask = _out_tile(B, H, BM, BN)
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
        """G: [M, R, B, H] (the input dtype); DWP: fp32 [column tiles, R, B] partial sums of
        dout · Π_m P_m[r] over each row's columns of the tile (a row sum, not a scalar: Triton 3.6
        cannot compile the scalar sum of a ``tl.dot`` result for sm_100)."""
        pid_n, rows, rmask, cols, cmask = _out_tile(B, H, BM, BN)
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(DY + rows[:, None] * SDY + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        plane = B.to(tl.int64) * H
        dwp = DWP + (pid_n * R).to(tl.int64) * B + rows
        for r in range(0, R):
            p0, p1, p2, p3 = _projs(X0, S0, D0, F0, X1, S1, D1, F1, X2, S2, D2, F2, X3, S3, D3, F3, r, rows, rmask,
                                    cols, cmask, H, M, DOT_PREC, BM, BN, BK)
            tl.store(dwp + r * B, tl.sum(dy * (p0 * p1 * p2 * p3), axis=1), mask=rmask)
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

    @triton.jit
    def _flat_tile(B, H, SPB, BM: tl.constexpr, BN: tl.constexpr):
        """The memory-bound kernels' tile of ``[B, H]`` over rows of stride SPB: (column tile index,
        rows as int64, row mask, tile mask, the tile's first element as an int64 offset, its
        elements' int32 offsets from there; int32 keeps the per-element registers down)."""
        pid_n, rows, rmask, cols, cmask = _out_tile(B, H, BM, BN)
        row0 = (tl.program_id(0) * BM).to(tl.int64)
        off = tl.arange(0, BM)[:, None] * SPB + cols[None, :]
        return pid_n, rows, rmask, rmask[:, None] & cmask[None, :], row0 * SPB, off

    @triton.jit
    def _lmf_prod_kernel(P, SPM, SPB, RW, BIAS, OUT, SO, B, H, R, M,
                         HAS_RW: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """out[rows, cols] = Σ_r w_r Π_m P[m, rows, r·H + cols] + bias, in fp32 (P: [M, B, R·H],
        modality stride SPM, row stride SPB). Reads M·B·R·H elements, writes B·H: memory-bound."""
        pid_n, rows, rmask, mask, base, off = _flat_tile(B, H, SPB, BM, BN)
        spm = SPM.to(tl.int64)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for r in range(0, R):
            tile = P + base + r * H
            prod = tl.load(tile + off, mask=mask, other=0.0).to(tl.float32)
            for m in range(1, M):
                prod *= tl.load(tile + m * spm + off, mask=mask, other=0.0).to(tl.float32)
            if HAS_RW:
                prod *= tl.load(RW + r).to(tl.float32)
            acc += prod
        cols = pid_n * BN + tl.arange(0, BN)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rows[:, None] * SO + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _lmf_grad_kernel(P, G, SPM, SPB, RW, DY, SDY, DWP, B, H, R, M,
                         HAS_RW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """G[m, rows, r·H + cols] = dy · w_r · Π_{k≠m} P[k, ...] (G laid out as P, its dtype) and
        DWP[column tile, r, rows] = Σ_cols dy · Π_m P[m, ...] (fp32 partial sums). Per rank: M tile
        loads from memory, M·(M - 1) more of the same tiles (cache hits), M stores."""
        pid_n, rows, rmask, mask, base, off = _flat_tile(B, H, SPB, BM, BN)
        cols = pid_n * BN + tl.arange(0, BN)
        dy = tl.load(DY + rows[:, None] * SDY + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        spm = SPM.to(tl.int64)
        dwp = DWP + (pid_n * R).to(tl.int64) * B + rows
        for r in range(0, R):
            tile = P + base + r * H
            prod = dy
            for k in range(0, M):
                prod *= tl.load(tile + k * spm + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dwp + r * B, tl.sum(prod, axis=1), mask=rmask)
            dyw = dy
            if HAS_RW:
                dyw = dy * tl.load(RW + r).to(tl.float32)
            for m in range(0, M):
                g = dyw
                for k in range(0, M):
                    g *= tl.load(tile + k * spm + off, mask=mask & (k != m), other=1.0).to(tl.float32)
                tl.store(G + base + r * H + m * spm + off, g.to(G.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------------

FWD_SLOT = candidates.declare("low_rank_fusion.fwd", ("gemm", "fused"))
BWD_SLOT = candidates.declare("low_rank_fusion.bwd", ("gemm", "fused"))

# fused: 8 warps, the fp32 accumulators and the generated operand tiles fit without spilling on
# sm_90; FMA dots (fp32, ieee) in 4 warps: 8 spill under Triton 3.9 (and sm_80 under 3.6)
_WARPS = 4 if TRITON_INTERPRET else 8


def _tiles(dtype, h, dmax):
    if TRITON_INTERPRET:
        bm, bn, bk = 16, 16, 16
    elif dtype == torch.float32 and dot_precision(dtype) == "ieee":
        bm, bn, bk = 32, 64, 32
    else:
        bm, bn, bk = 64, 64, 64
    return bm, min(bn, max(16, next_pow2(h))), min(bk, max(16, next_pow2(dmax)))


def _warps(dtype):
    return 4 if TRITON_INTERPRET or (dtype == torch.float32 and dot_precision(dtype) == "ieee") else _WARPS


def _operands(xs, factors):
    x2 = [rows2d(x) for x in xs]
    x2 = [x if x.stride(-1) == 1 else x.contiguous() for x in x2]
    fs = [f.contiguous() for f in factors]
    args = []
    for i in range(4):
        j = min(i, len(xs) - 1)
        args += [x2[j], x2[j].stride(0), x2[j].shape[1], fs[j]]
    return x2, fs, args


MAX_M = 4   # the fused kernels' modality slots (X0..X3); they multiply at least two projections
CAPABILITIES = KERNEL_CAPABILITIES


# Triton 3.6 could not compile the fused backward for Blackwell datacenter GPUs (sm_100): its
# TritonNvidiaGPUOptimizeTMemLayoutsPass failed ("parent layout must have at least rank >= 2") on
# the scalar sum of a tl.dot result; the kernel now stores row sums, and the ahead-of-time compile
# test covers sm_80/86/89/90/100/120. Compute capabilities the kernels cannot be built for would
# be listed here (major -> what fails) and refused by why_not.
UNBUILT: dict = {}


def _chosen(device):
    return candidates.choice(FWD_SLOT, device), candidates.choice(BWD_SLOT, device)


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    why = triton_why_not(xs, explicit) or unbuilt_on(xs[0].device, UNBUILT)
    if why or not 2 <= len(xs) <= MAX_M:
        fused = [slot for slot, name in zip((FWD_SLOT, BWD_SLOT), _chosen(xs[0].device)) if name == "fused"]
        if not why and fused:
            n = len(xs)
            why = (f"{n} modalit{'y' if n == 1 else 'ies'} {'< 2' if n < 2 else f'> {MAX_M}'} (the 'fused' "
                   f"candidate of {' and '.join(fused)} has {MAX_M} modality slots and multiplies at least two)")
    return why


# --- gemm: one cuBLAS GEMM per modality, one fused kernel --------------------------------------------

def _gemm_weights(factors):
    """Per modality ``(W_m, c_m)``: ``F_m[:, 1:]`` as ``[D_m, R·H]`` (rank-major columns) and the
    leading-1 row ``F_m[:, 0]`` as ``[R·H]``, two views of one copy of the factor."""
    out = []
    for f in factors:
        r, d1, h = f.shape
        wc = f.permute(1, 0, 2).reshape(d1, r * h)
        out.append((wc[1:], wc[0]))
    return out


def _projections(x2, ws):
    """``P[m] = x_m @ W_m + c_m``: ``[M, rows, R·H]`` in the inputs' dtype (cuBLAS, fp32 accumulation)."""
    rows, rh = x2[0].shape[0], ws[0][0].shape[1]
    p = torch.empty((len(x2), rows, rh), dtype=x2[0].dtype, device=x2[0].device)
    for m, (x, (w, c)) in enumerate(zip(x2, ws)):
        torch.addmm(c, x, w, out=p[m])
    return p


_FLAT_WARPS = 4


def _flat_tiles(h, dtype):
    """(BM, BN) of the memory-bound kernels in ``_FLAT_WARPS``: 16 elements per thread in 16-bit,
    8 in fp32 (4K-element tiles took up to 234 registers; 8 per thread in 8 warps spilled under
    Triton 3.9 for sm_80, 16 fp32 per thread for sm_120)."""
    if TRITON_INTERPRET:
        return 16, 16
    bn = min(128, max(16, next_pow2(h)))
    return (1024 if dtype == torch.float32 else 2048) // bn, bn


def _forward_gemm(x2, factors, rank_weights, bias):
    r, _, h = factors[0].shape
    rows = x2[0].shape[0]
    out = torch.empty((rows, h), dtype=x2[0].dtype, device=x2[0].device)
    if rows:
        p = _projections(x2, _gemm_weights(factors))
        bm, bn = _flat_tiles(h, out.dtype)
        launch(_lmf_prod_kernel, (cdiv(rows, bm), cdiv(h, bn)), p, p.stride(0), p.stride(1),
               out if rank_weights is None else rank_weights.contiguous(), out if bias is None else bias.contiguous(),
               out, out.stride(0), rows, h, r, len(x2), HAS_RW=rank_weights is not None,
               HAS_BIAS=bias is not None, BM=bm, BN=bn, num_warps=_FLAT_WARPS)
    return out


def _backward_gemm(dy, x2, factors, rank_weights):
    """``(dxs as [rows, D_m], dfactors, the fp32 partial sums of drank_weights [column tiles, R, rows])``."""
    r, _, h = factors[0].shape
    rows = x2[0].shape[0]
    ws = _gemm_weights(factors)
    bm, bn = _flat_tiles(h, dy.dtype)
    grid = (cdiv(rows, bm), cdiv(h, bn))
    dwp = torch.empty((grid[1], r, rows), dtype=torch.float32, device=dy.device)
    p = _projections(x2, ws)
    g = torch.empty_like(p)                                                  # every element is written
    if rows:
        launch(_lmf_grad_kernel, grid, p, g, p.stride(0), p.stride(1),
               dy if rank_weights is None else rank_weights.contiguous(), dy, dy.stride(0), dwp, rows, h, r,
               len(x2), HAS_RW=rank_weights is not None, BM=bm, BN=bn, num_warps=_FLAT_WARPS)
    dxs, dfs = [], []
    for m, (x, (w, _)) in enumerate(zip(x2, ws)):
        dxs.append(torch.mm(g[m], w.t()))                                    # [rows, D]
        dfa = torch.mm(augment(x).t(), g[m])                                 # [D + 1, R·H]
        dfs.append(dfa.view(-1, r, h).transpose(0, 1).contiguous())          # [R, D + 1, H]
    return dxs, dfs, dwp


# --- entry points ------------------------------------------------------------------------------------

def forward(xs, factors, rank_weights, bias):
    lead = xs[0].shape[:-1]
    if candidates.choice(FWD_SLOT, xs[0].device) == "gemm":
        return _forward_gemm([rows2d(x) for x in xs], factors, rank_weights, bias).view(*lead, factors[0].shape[2])
    x2, fs, args = _operands(xs, factors)
    rows, (r, _, h) = x2[0].shape[0], fs[0].shape
    out = torch.empty((rows, h), dtype=xs[0].dtype, device=xs[0].device)
    if rows:
        bm, bn, bk = _tiles(out.dtype, h, max(x.shape[1] for x in x2))
        launch(_lmf_fwd_kernel, (cdiv(rows, bm), cdiv(h, bn)), *args,
               out if rank_weights is None else rank_weights.contiguous(), out if bias is None else bias.contiguous(),
               out, out.stride(0), rows, h, r, M=len(xs), HAS_RW=rank_weights is not None, HAS_BIAS=bias is not None,
               DOT_PREC=dot_precision(out.dtype), BM=bm, BN=bn, BK=bk, num_warps=_warps(out.dtype))
    return out.view(*lead, h)


def backward(grad_out, xs, factors, rank_weights, bias):
    """``(dxs, dfactors, drank_weights or None, dbias or None)``."""
    h = factors[0].shape[2]
    dy = grad_out.reshape(-1, h)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if candidates.choice(BWD_SLOT, dy.device) == "gemm":
        dx2, dfs, dwp = _backward_gemm(dy, [rows2d(x) for x in xs], factors, rank_weights)
    else:
        dx2, dfs, dwp = _backward_fused(dy, xs, factors, rank_weights)
    dxs = [dx.to(x.dtype).reshape(x.shape) for dx, x in zip(dx2, xs)]
    dfs = [df.to(f.dtype) for df, f in zip(dfs, factors)]
    dw = None if rank_weights is None else dwp.sum((0, 2)).to(rank_weights.dtype)
    db = None if bias is None else dy.sum(0, dtype=torch.float32).to(bias.dtype)
    return dxs, dfs, dw, db


def _backward_fused(dy, xs, factors, rank_weights):
    """As :func:`_backward_gemm`, by ``_lmf_bwd_kernel`` (G laid out ``[M, R, rows, H]``)."""
    x2, fs, args = _operands(xs, factors)
    rows, (r, _, h) = x2[0].shape[0], fs[0].shape
    m = len(xs)
    bm, bn, bk = _tiles(dy.dtype, h, max(x.shape[1] for x in x2))
    grid = (cdiv(rows, bm), cdiv(h, bn))
    g = torch.empty((m, r, rows, h), dtype=dy.dtype, device=dy.device)     # every element is written
    dwp = torch.empty((grid[1], r, rows), dtype=torch.float32, device=dy.device)
    if rows:
        launch(_lmf_bwd_kernel, grid, *args, dy if rank_weights is None else rank_weights.contiguous(), dy,
               dy.stride(0), g, dwp, rows, h, r, M=m, HAS_RW=rank_weights is not None,
               DOT_PREC=dot_precision(dy.dtype), BM=bm, BN=bn, BK=bk, num_warps=_warps(dy.dtype))
    dxs, dfs = [], []
    for gm, xr, f in zip(g, x2, fs):                                         # gm: [R, rows, H]
        dxs.append(torch.einsum("rbh,rkh->bk", gm, f[:, 1:].to(gm.dtype)))
        dfs.append(torch.matmul(augment(xr).to(gm.dtype).t().unsqueeze(0), gm))   # [R, D+1, H]
    return dxs, dfs, dwp
