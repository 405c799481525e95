"""norm_concat in Triton: one launch forward, two backward (dx and partial sums, then the parameter gradients), over all M modalities.

The M inputs travel as Triton tuples (one pointer, strides and size per modality), so each
input is read in place — no stacking, no concat buffer — and every pointer keeps its own
16-byte-alignment specialisation (vector loads). The forward writes each normalised segment
straight into its column range of the output. The backward recomputes the row statistics from x
(x is read anyway, so it costs no bytes) and writes dx per modality plus per-program fp32 partial
sums of dweight/dbias, which a second small kernel sums over the programs in a fixed order
(deterministic, unlike atomics) and writes, cast, into each parameter's gradient: two launches
backward, no memset, no cast or copy around them. Its loop prefetches the next row tile and keeps cross-warp reductions to three
per tile (see the kernel).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from ... import candidates
from ...backend import KERNEL_CAPABILITIES, Capabilities, Limit
from .._util import dense, rows2d
from ...runtime import HAS_TRITON, cdiv, launch, next_pow2, num_sms, triton_why_not

# The backward's tile, settled per GPU by the GPU check's tournament (both are the same kernel):
# ``four_per_sm`` — a [ROWS, BLOCK_D] tile of ~2048 elements, 8 per thread (16 bytes of bf16 per
# load), as many programs as fill half of an SM's 64 warps; ``deep_rows`` — twice the rows per
# tile, 16 elements per thread (two 16-byte loads of x and of dy in flight per thread and tile, half
# the row-tile iterations and loop overhead), the same warps and programs. Bytes per pass are the
# same for both (below); they differ in loads in flight and registers.
BWD_SLOT = candidates.declare("norm_concat.bwd", ("four_per_sm", "deep_rows"))

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_concat_fwd_kernel(
        X, SXR, SXC, W, B, D, OFF,      # tuples, one entry per modality
        Y, SYR, n_rows, eps,
        IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        rows64 = rows.to(tl.int64)
        for i in tl.static_range(len(X)):
            cols = tl.arange(0, BLOCK_D[i])
            cmask = cols < D[i]
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(X[i] + rows64[:, None] * SXR[i] + cols[None, :] * SXC[i], mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                xc = x
            else:
                mean = tl.sum(x, axis=1) / D[i]
                xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D[i] + eps)
            y = xc * rstd[:, None]
            if HAS_W[i]:
                y = y * tl.load(W[i] + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B[i]:
                y = y + tl.load(B[i] + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + rows64[:, None] * SYR + (OFF[i] + cols)[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum2(a0, a1, b0, b1):
        return a0 + b0, a1 + b1

    @triton.jit
    def _norm_concat_bwd_kernel(
        X, SXR, SXC, W, DX, D, OFF,     # tuples, one entry per modality (DX contiguous [rows, D])
        DY, SDYR, SDYC, DWP, DBP, TOTAL_D, n_rows, n_prog, tiles_per_prog, eps,
        IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        BLOCK_D: tl.constexpr, ROWS: tl.constexpr, ACC_IN_MEM: tl.constexpr,
    ):
        # A persistent program walks row tiles pid, pid + n_prog, ... of each modality in turn. Each
        # iteration issues the next tile's loads before it computes its own (the HBM latency of one
        # overlaps the arithmetic and the row reductions of the other), and the per-row reductions
        # that cross warps are the fewest the math allows: mean and variance (two-pass, as the
        # forward), then c1 and c2 in one two-operand reduction. The dweight/dbias sums accumulate
        # element-wise in [ROWS, BLOCK_D] registers and are reduced over rows once, after the loop.
        # ACC_IN_MEM (very wide rows): those sums live in this program's own row of the partial
        # buffer instead (read-modify-write per tile, L2-resident), since registers would spill.
        pid = tl.program_id(0)
        r = tl.arange(0, ROWS)
        for i in tl.static_range(len(X)):
            cols = tl.arange(0, BLOCK_D[i])
            cmask = cols < D[i]
            pw = DWP + pid.to(tl.int64) * TOTAL_D + OFF[i] + cols
            pb = DBP + pid.to(tl.int64) * TOTAL_D + OFF[i] + cols
            dw_acc = tl.zeros_like((r[:, None] + cols[None, :]).to(tl.float32))    # [ROWS, BLOCK_D]
            db_acc = tl.zeros_like(dw_acc)
            if ACC_IN_MEM:
                if HAS_W[i]:
                    tl.store(pw, tl.zeros_like(cols.to(tl.float32)), mask=cmask)
                if HAS_B[i]:
                    tl.store(pb, tl.zeros_like(cols.to(tl.float32)), mask=cmask)
            elif HAS_W[i]:
                w_held = tl.load(W[i] + cols, mask=cmask, other=0.0).to(tl.float32)
            # the first tile's inputs (raw dtype; rows past the end load nothing)
            rows = pid * ROWS + r
            rows64 = rows.to(tl.int64)
            mask = (rows < n_rows)[:, None] & cmask[None, :]
            x_next = tl.load(X[i] + rows64[:, None] * SXR[i] + cols[None, :] * SXC[i], mask=mask, other=0.0)
            dy_next = tl.load(DY + rows64[:, None] * SDYR + (OFF[i] + cols)[None, :] * SDYC, mask=mask, other=0.0)
            for j in range(0, tiles_per_prog):
                rows = (pid + j * n_prog) * ROWS + r
                rows64 = rows.to(tl.int64)
                mask = (rows < n_rows)[:, None] & cmask[None, :]
                x = x_next.to(tl.float32)
                dy = dy_next.to(tl.float32)
                # prefetch the next tile
                nrows = rows + n_prog * ROWS
                nrows64 = nrows.to(tl.int64)
                nmask = (nrows < n_rows)[:, None] & cmask[None, :]
                x_next = tl.load(X[i] + nrows64[:, None] * SXR[i] + cols[None, :] * SXC[i], mask=nmask, other=0.0)
                dy_next = tl.load(DY + nrows64[:, None] * SDYR + (OFF[i] + cols)[None, :] * SDYC, mask=nmask,
                                  other=0.0)
                if IS_RMS:
                    xc = x
                else:
                    mean = tl.sum(x, axis=1) / D[i]
                    xc = tl.where(mask, x - mean[:, None], 0.0)
                rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / D[i] + eps)
                xhat = xc * rstd[:, None]
                if HAS_W[i]:
                    if ACC_IN_MEM:  # re-read per tile (L1/L2 hits) rather than held: fewer live registers
                        w = tl.load(W[i] + cols, mask=cmask, other=0.0).to(tl.float32)
                        tl.store(pw, tl.load(pw, mask=cmask) + tl.sum(dy * xhat, axis=0), mask=cmask)
                    else:
                        w = w_held
                        dw_acc += dy * xhat
                    wdy = dy * w[None, :]
                else:
                    wdy = dy
                if HAS_B[i]:
                    if ACC_IN_MEM:
                        tl.store(pb, tl.load(pb, mask=cmask) + tl.sum(dy, axis=0), mask=cmask)
                    else:
                        db_acc += dy
                if IS_RMS:
                    c1 = tl.sum(xhat * wdy, axis=1) / D[i]
                    dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
                else:
                    s1, s2 = tl.reduce((xhat * wdy, wdy), 1, _sum2)
                    dx = (wdy - xhat * (s1 / D[i])[:, None] - (s2 / D[i])[:, None]) * rstd[:, None]
                tl.store(DX[i] + rows64[:, None] * D[i] + cols[None, :], dx.to(DX[i].dtype.element_ty), mask=mask)
            if not ACC_IN_MEM:
                if HAS_W[i]:
                    tl.store(pw, tl.sum(dw_acc, axis=0), mask=cmask)
                if HAS_B[i]:
                    tl.store(pb, tl.sum(db_acc, axis=0), mask=cmask)


    @triton.jit
    def _norm_concat_dparams_kernel(
        PW, PB, n_prog, total,          # the backward's partials of dweight, dbias: [n_prog, total] fp32
        DW, DB, D, OFF,                 # tuples, one entry per modality (each in its parameter's dtype)
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ANY_W: tl.constexpr, ANY_B: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # dweight / dbias of every modality in one launch: the programs' partial rows summed in a
        # fixed order (deterministic), cast to each parameter's dtype and written to its own tensor.
        # Bytes: the partials once (2 x n_prog x total x 4), the gradients once.
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < total
        acc_w = tl.zeros([BLOCK], tl.float32)
        acc_b = tl.zeros([BLOCK], tl.float32)
        pw = PW + cols
        pb = PB + cols
        for _ in range(0, n_prog):      # pointers step one row at a time: 64-bit, no offset overflow
            if ANY_W:
                acc_w += tl.load(pw, mask=cmask, other=0.0)
            if ANY_B:
                acc_b += tl.load(pb, mask=cmask, other=0.0)
            pw += total
            pb += total
        for i in tl.static_range(len(D)):
            inside = cmask & (cols >= OFF[i]) & (cols < OFF[i] + D[i])
            if HAS_W[i]:
                tl.store(DW[i] + (cols - OFF[i]), acc_w.to(DW[i].dtype.element_ty), mask=inside)
            if HAS_B[i]:
                tl.store(DB[i] + (cols - OFF[i]), acc_b.to(DB[i].dtype.element_ty), mask=inside)


# --- launch configuration ------------------------------------------------------------------------

# From this block width on, the backward keeps its dweight/dbias sums in memory (see ACC_IN_MEM).
WIDE_ROW = 8192
DPARAMS_BLOCK = 512   # columns per program of the parameter-gradient sum (4 warps: 16-byte loads)


@functools.lru_cache(maxsize=1024)
def _config(dims: Tuple[int, ...], elems_per_thread: int, max_warps: int = 16, tile: int = 2048):
    """Block per modality, rows per program and warps: ~``elems_per_thread`` elements (16 bytes of
    bf16 at 8) per thread in the widest segment; rows of ~``tile`` elements per program when rows
    are short (at most 64 rows)."""
    blocks = tuple(max(16, next_pow2(d)) for d in dims)
    widest = max(blocks)
    rows = max(1, min(64, tile // widest))
    warps = max(1, min(max_warps, rows * widest // (32 * elems_per_thread)))
    return blocks, rows, warps



# --- backend interface ---------------------------------------------------------------------------

CAPABILITIES = Capabilities(dtypes=KERNEL_CAPABILITIES.dtypes, limits=(
    Limit("features in the widest input", lambda xs, **_: max(x.shape[-1] for x in xs), 65536,
          "one program holds a whole row in registers"),))


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    return triton_why_not(xs, explicit)


def forward(xs, weights, biases, rms: bool, eps: float) -> torch.Tensor:
    weights, biases = dense(weights), dense(biases)      # the kernels read [D_m] vectors
    lead = xs[0].shape[:-1]
    dims = tuple(x.shape[-1] for x in xs)
    x2 = [rows2d(x) for x in xs]
    n_rows = x2[0].shape[0]
    y = torch.empty((n_rows, sum(dims)), dtype=xs[0].dtype, device=xs[0].device)
    if n_rows > 0:
        offs = [sum(dims[:i]) for i in range(len(dims))]
        blocks, rows, warps = _config(dims, elems_per_thread=16)
        launch(_norm_concat_fwd_kernel, (cdiv(n_rows, rows),),
               tuple(x2), tuple(x.stride(0) for x in x2), tuple(x.stride(1) for x in x2),
               tuple(y if w is None else w for w in weights), tuple(y if b is None else b for b in biases),
               tuple(dims), tuple(offs), y, y.stride(0), n_rows, eps,
               IS_RMS=rms, HAS_W=tuple(w is not None for w in weights), HAS_B=tuple(b is not None for b in biases),
               BLOCK_D=blocks, ROWS=rows, num_warps=warps)
    return y if len(lead) == 1 else y.view(*lead, sum(dims))


def backward(grad_out, xs, weights, biases, rms: bool, eps: float):
    weights = dense(weights)
    dims = tuple(x.shape[-1] for x in xs)
    total = sum(dims)
    x2 = [rows2d(x) for x in xs]
    dy = grad_out.reshape(-1, total)
    n_rows = dy.shape[0]
    dxs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs]
    has_w = tuple(w is not None for w in weights)
    has_b = tuple(b is not None for b in biases)
    # bytes: x and dy read once, dx written once ([rows, total] each), the weights once, and
    # 2 x n_prog x total fp32 partials written and read back (~2% at the headline shapes)
    deep = candidates.choice(BWD_SLOT, dy.device) == "deep_rows"
    blocks, rows, warps = _config(dims, elems_per_thread=16 if deep else 8, max_warps=32,
                                  tile=4096 if deep else 2048)
    n_prog = max(1, min(cdiv(n_rows, rows), num_sms(dy.device) * max(1, 32 // warps)))
    # every program writes its row of partials for each modality with a weight/bias: no memset
    # (no rows: no launch, and the parameter gradients are zeros)
    partial = (torch.empty if n_rows > 0 else torch.zeros)((2, n_prog, total), dtype=torch.float32, device=dy.device)
    offs = [sum(dims[:i]) for i in range(len(dims))]
    if n_rows > 0:
        launch(_norm_concat_bwd_kernel, (n_prog,),
               tuple(x2), tuple(x.stride(0) for x in x2), tuple(x.stride(1) for x in x2),
               tuple(dy if w is None else w for w in weights), tuple(dxs), tuple(dims), tuple(offs),
               dy, dy.stride(0), dy.stride(1), partial[0], partial[1], total, n_rows, n_prog,
               cdiv(cdiv(n_rows, rows), n_prog), eps,
               IS_RMS=rms, HAS_W=has_w, HAS_B=has_b, BLOCK_D=blocks, ROWS=rows,
               ACC_IN_MEM=max(blocks) >= WIDE_ROW, num_warps=warps)
    dws = [None if w is None else torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in weights]
    dbs = [None if b is None else torch.empty(b.shape, dtype=b.dtype, device=b.device) for b in biases]
    if any(has_w) or any(has_b):
        launch(_norm_concat_dparams_kernel, (cdiv(total, DPARAMS_BLOCK),), partial[0], partial[1], n_prog, total,
               tuple(partial if g is None else g for g in dws), tuple(partial if g is None else g for g in dbs),
               tuple(dims), tuple(offs), HAS_W=has_w, HAS_B=has_b, ANY_W=any(has_w), ANY_B=any(has_b),
               BLOCK=DPARAMS_BLOCK, num_warps=4)
    return dxs, dws, dbs
