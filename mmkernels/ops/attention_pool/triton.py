"""attention_pool in Triton: flash-decoding-style forward and a recomputing backward.

Work unit: one program per (batch row b, head h, chunk of the sequence). A program holds all Q
queries of its head (Q <= 16, padded to a 16-row ``tl.dot`` tile) and streams its chunk of tokens
once, ``BLOCK_L`` rows at a time:

* forward: online softmax over the chunk; when ``key`` is ``x`` (the common case) one tile load
  serves as both key and value, so x is read exactly once. With one chunk per (b, h) the program
  writes ``out`` and the fp32 log-sum-exp directly; with several (small B*H, long L) every chunk
  writes a normalised fp32 partial and its log-sum-exp, and ``_attn_pool_combine_kernel`` merges
  them (no atomics).
* backward: recomputes the scores from the saved log-sum-exp, writes dx (dv + dk fused when key is
  x) and dkey once per token, and writes a per-chunk fp32 partial of dquery that one ``sum`` over
  the chunk axis (and the batch axis for shared queries) finishes: deterministic.

Padded layout ``[B, L, D]`` and packed layout ``[T, D]`` + ``cu_seqlens`` share the kernels
(``VARLEN``): only the row start and length of sample b differ. Positions at or past a row's
length are never loaded (masked loads), so padding holding NaN cannot leak; a row of length 0 gives
zeros and a log-sum-exp of -inf. Row bases are int64; offsets inside one sample are int32 unless
a sample's span (rows x row stride, e.g. a batch-first view of a sequence-first tensor) can pass
2^31, then int64 (``OFF64``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import candidates
from ...backend import KERNEL_CAPABILITIES, Capabilities, Limit
from .._util import dot_precision
from ...runtime import (HAS_TRITON, launch, launch_tuned, next_pow2, num_sms, shared_memory_limit, triton_why_not,
                        tune_bucket)

LOG2E = 1.4426950408889634
MAX_Q = 16
MAX_DH = 256
# The forward's candidates (GPU check tournament, :mod:`mmkernels.candidates`): ``tiled`` (the
# default: the flash-decoding kernel below, one program per (b, h, chunk)) and ``short`` (one query
# per head, rows of at most SHORT_L tokens: G heads per program, the whole row in one tile; e.g.
# B4096 L64 D768 H12, at 1.8x its floor with ``tiled`` on an H200). Bytes are the same (x once,
# out and lse once); ``short`` trades 16-row tensor-core tiles for fp32 FMAs and G times fewer,
# G times larger programs. Other shapes take ``tiled`` whatever the choice.
FWD_SLOT = candidates.declare("attention_pool.fwd", ("tiled", "short"))
# The backward's candidates: ``tiled`` (the default: the recomputing kernel below, 16-row
# tensor-core tiles) and ``fma`` (:func:`_attn_pool_bwd_fma_kernel`, one query per head at any
# length, e.g. every headline case: G heads of one sample per program, the sequence in chunks as
# ``tiled`` splits it, ``[BLOCK_L, G, BLOCK_DH]`` tiles, fp32 FMAs). Bytes of both: x (and key)
# read once, grad_out, out and lse once, dx (and dkey) written once, dquery's fp32 partial once per
# (b, head, chunk) — the floor's; they differ in the work per byte (a 16-row tile for one query
# row: 1/16 of its products useful) and in the loads per row (``fma``: G * Dh contiguous elements).
BWD_SLOT = candidates.declare("attention_pool.bwd", ("tiled", "fma"))
FMA_GROUP = 512           # the fma backward's heads per program: G * BLOCK_DH up to this
SHORT_L = 128
SHORT_ELEMS = 8192
FMA_TILE = 4096           # the fma backward's tile: it holds ~4 (x, its products, dx), half the forward's

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _program_rows(H, L, LEN, CU, HAS_LEN: tl.constexpr, VARLEN: tl.constexpr):
        """This program's (b, h) from axis 0, and sample b's first row in x, number of valid tokens
        and number of rows of its dx."""
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        if VARLEN:
            start = tl.load(CU + b).to(tl.int64)
            n = (tl.load(CU + b + 1).to(tl.int64) - start).to(tl.int32)
            n = tl.maximum(n, 0)
            n_out = n
        else:
            start = (b * 0).to(tl.int64)
            n = L
            if HAS_LEN:
                n = tl.minimum(tl.maximum(tl.load(LEN + b).to(tl.int64), 0), L).to(tl.int32)  # clamp, then narrow
            n_out = L
        return pid_bh, b.to(tl.int64), h, start, n, n_out

    @triton.jit
    def _query_tile(QRY, b64, h, s_qb, s_qq, s_qh, s_qd, NQ, DH, BLOCK_Q: tl.constexpr, BLOCK_DH: tl.constexpr):
        """The ``[BLOCK_Q, BLOCK_DH]`` queries of head h for sample b (rows past NQ and columns past
        DH are zero) and their row/column masks."""
        offs_q = tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_DH)
        qmask = offs_q < NQ
        dmask = offs_d < DH
        q = tl.load(QRY + b64 * s_qb + h * s_qh + offs_q[:, None] * s_qq + offs_d[None, :] * s_qd,
                    mask=qmask[:, None] & dmask[None, :], other=0.0)
        return q, offs_q, offs_d, qmask, dmask

    @triton.jit
    def _attn_pool_fwd_kernel(
        X, KEY, QRY, LEN, CU, OUT, LSE, PO, PLSE,
        s_xb, s_xl, s_xd, s_kb, s_kl, s_kd,
        s_qb, s_qq, s_qh, s_qd, s_ob, s_oq, s_od,
        L, H, NQ, DH, chunk, n_split, qk_scale, TUNE_L, TUNE_BH,
        HAS_LEN: tl.constexpr, VARLEN: tl.constexpr, SAME_KV: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr, DOT_PREC: tl.constexpr,
        OFF64: tl.constexpr,
    ):
        pid_bh, b64, h, start, n, _ = _program_rows(H, L, LEN, CU, HAS_LEN, VARLEN)
        pid_s = tl.program_id(1)
        q, offs_q, offs_d, qmask, dmask = _query_tile(QRY, b64, h, s_qb, s_qq, s_qh, s_qd, NQ, DH, BLOCK_Q, BLOCK_DH)
        offs_l = tl.arange(0, BLOCK_L)
        col0 = (h * DH).to(tl.int64)
        x_base = X + b64 * s_xb + start * s_xl + col0 * s_xd
        k_base = KEY + b64 * s_kb + start * s_kl + col0 * s_kd
        if OFF64:  # offsets inside one sample can pass 2^31 (huge strides): 64-bit tile offsets
            offs_d = offs_d.to(tl.int64)
        lo = pid_s * chunk
        hi = tl.minimum(lo + chunk, n)
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_DH], tl.float32)
        for l0 in range(lo, hi, BLOCK_L):
            rows = l0 + offs_l
            if OFF64:
                rows = rows.to(tl.int64)
            lmask = rows < hi
            v = tl.load(x_base + rows[:, None] * s_xl + offs_d[None, :] * s_xd,
                        mask=lmask[:, None] & dmask[None, :], other=0.0)
            if SAME_KV:
                k = v
            else:
                k = tl.load(k_base + rows[:, None] * s_kl + offs_d[None, :] * s_kd,
                            mask=lmask[:, None] & dmask[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 units
            s = tl.where(lmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a valid row
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        if SPLIT:
            part = (pid_bh.to(tl.int64) * n_split + pid_s) * BLOCK_Q
            tl.store(PO + (part + offs_q[:, None]) * BLOCK_DH + offs_d[None, :], out)
            tl.store(PLSE + part + offs_q, lse)
        else:
            tl.store(OUT + b64 * s_ob + offs_q[:, None] * s_oq + (h * DH + offs_d)[None, :] * s_od,
                     out.to(OUT.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])
            tl.store(LSE + (b64 * NQ + offs_q) * H + h, lse, mask=qmask)

    @triton.jit
    def _head_group(QRY, b64, grp, s_qb, s_qh, s_qd, DH, OFF64: tl.constexpr, G: tl.constexpr,
                    BLOCK_DH: tl.constexpr):
        """Heads ``grp * G ...`` of sample b: their ``[G, BLOCK_DH]`` queries (fp32), the heads, their
        columns in a row of x (G * Dh contiguous elements) and the column mask."""
        offs_d = tl.arange(0, BLOCK_DH)
        heads = grp * G + tl.arange(0, G)
        dmask = offs_d < DH
        cols = heads[:, None] * DH + offs_d[None, :]                      # [G, BLOCK_DH]
        if OFF64:
            cols = cols.to(tl.int64)
        q = tl.load(QRY + b64 * s_qb + heads[:, None] * s_qh + offs_d[None, :] * s_qd,
                    mask=dmask[None, :], other=0.0).to(tl.float32)
        return q, heads, cols, dmask

    @triton.jit
    def _row_tiles(X, KEY, b64, start, l0, n, cols, dmask, s_xb, s_xl, s_xd, s_kb, s_kl, s_kd,
                   SAME_KV: tl.constexpr, OFF64: tl.constexpr, BLOCK_L: tl.constexpr):
        """Rows ``l0 ... l0 + BLOCK_L`` of sample b at ``cols``: the ``[BLOCK_L, G, BLOCK_DH]`` value
        and key tiles in fp32 (zero at and past the n valid tokens), the rows and their mask."""
        offs_l = l0 + tl.arange(0, BLOCK_L)
        rows = offs_l
        if OFF64:
            rows = rows.to(tl.int64)
        vrow = offs_l < n
        m3 = vrow[:, None, None] & dmask[None, None, :]
        v = tl.load(X + b64 * s_xb + start * s_xl + rows[:, None, None] * s_xl + cols[None, :, :] * s_xd,
                    mask=m3, other=0.0).to(tl.float32)
        if SAME_KV:
            k = v
        else:
            k = tl.load(KEY + b64 * s_kb + start * s_kl + rows[:, None, None] * s_kl + cols[None, :, :] * s_kd,
                        mask=m3, other=0.0).to(tl.float32)
        return v, k, offs_l, rows, vrow

    @triton.jit
    def _attn_pool_fwd_short_kernel(
        X, KEY, QRY, LEN, CU, OUT, LSE,
        s_xb, s_xl, s_xd, s_kb, s_kl, s_kd, s_qb, s_qh, s_qd, s_ob, s_od,
        L, H, HG, DH, qk_scale,
        HAS_LEN: tl.constexpr, VARLEN: tl.constexpr, SAME_KV: tl.constexpr, OFF64: tl.constexpr,
        G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr,
    ):
        """The ``short`` candidate: one query per head and a whole row in one tile (L <= 128). A
        program owns G heads of one sample: it loads their ``[BLOCK_L, G, BLOCK_DH]`` tile at once
        and computes scores, softmax and the weighted sum in fp32 registers (no ``tl.dot``: one
        query row would fill 1/16 of a tensor-core tile)."""
        _, b64, grp, start, n, _ = _program_rows(HG, L, LEN, CU, HAS_LEN, VARLEN)
        q, heads, cols, dmask = _head_group(QRY, b64, grp, s_qb, s_qh, s_qd, DH, OFF64, G, BLOCK_DH)
        v, k, _, _, lmask = _row_tiles(X, KEY, b64, start, 0, n, cols, dmask, s_xb, s_xl, s_xd, s_kb, s_kl, s_kd,
                                       SAME_KV, OFF64, BLOCK_L)
        sc = tl.sum(k * q[None, :, :], axis=2) * qk_scale                 # [BLOCK_L, G], log2 units
        sc = tl.where(lmask[:, None], sc, float("-inf"))
        m = tl.max(sc, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)                          # an empty row: every weight 0
        p = tl.exp2(sc - m[None, :])
        den = tl.sum(p, axis=0)
        has = den > 0.0
        out = tl.sum(p[:, :, None] * v, axis=0) * (1.0 / tl.where(has, den, 1.0))[:, None]
        lse = tl.where(has, (m + tl.log2(tl.where(has, den, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(OUT + b64 * s_ob + cols * s_od, out.to(OUT.dtype.element_ty), mask=dmask[None, :])
        tl.store(LSE + b64 * H + heads, lse)

    @triton.jit
    def _attn_pool_bwd_fma_kernel(
        X, KEY, QRY, LEN, CU, OUT, DOUT, LSE, DX, DKEY, DQP,
        s_xb, s_xl, s_xd, s_kb, s_kl, s_kd, s_qb, s_qh, s_qd, s_ob, s_od, s_gb, s_gd,
        s_dxb, s_dxl, s_dkb, s_dkl,
        L, H, HG, DH, chunk, n_chunk, qk_scale, scale,
        HAS_LEN: tl.constexpr, VARLEN: tl.constexpr, SAME_KV: tl.constexpr, OFF64: tl.constexpr,
        G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr,
    ):
        """The ``fma`` backward candidate (one query per head, any length): program (b, group of G
        heads, chunk of the sequence) walks its chunk ``[BLOCK_L, G, BLOCK_DH]`` at a time (rows of
        G * Dh contiguous elements) and, in fp32 registers, recomputes ``p = exp(s - lse)`` from the
        saved log-sum-exp (no running softmax: each tile stands alone) and forms
        ``ds = p (dp - delta)``, ``dv = p dout``, ``dk = ds q scale`` (one dx when key is x; zeros on
        rows past the length) and ``dq = scale sum_l ds k``, its chunk's slot of the dquery partial."""
        _, b64, grp, start, n, n_out = _program_rows(HG, L, LEN, CU, HAS_LEN, VARLEN)
        pid_c = tl.program_id(1)
        q, heads, cols, dmask = _head_group(QRY, b64, grp, s_qb, s_qh, s_qd, DH, OFF64, G, BLOCK_DH)
        gmask = dmask[None, :]
        do = tl.load(DOUT + b64 * s_gb + cols * s_gd, mask=gmask, other=0.0).to(tl.float32)
        o = tl.load(OUT + b64 * s_ob + cols * s_od, mask=gmask, other=0.0).to(tl.float32)
        delta = tl.sum(do * o, axis=1)                                    # [G]: sum_l p dp
        lse2 = tl.load(LSE + b64 * H + heads) * 1.4426950408889634
        qs = q * scale
        lo = pid_c * chunk
        hi = tl.minimum(lo + chunk, n_out)                                # dx rows this program writes
        dq = tl.zeros([G, BLOCK_DH], tl.float32)
        for l0 in range(lo, hi, BLOCK_L):
            v, k, offs_l, rows, vrow = _row_tiles(X, KEY, b64, start, l0, n, cols, dmask, s_xb, s_xl, s_xd,
                                                  s_kb, s_kl, s_kd, SAME_KV, OFF64, BLOCK_L)
            sc = tl.sum(k * q[None, :, :], axis=2) * qk_scale             # [BLOCK_L, G], log2 units
            p = tl.where(vrow[:, None], tl.exp2(sc - lse2[None, :]), 0.0)
            dp = tl.sum(v * do[None, :, :], axis=2)
            ds = p * (dp - delta[None, :])
            dk = ds[:, :, None] * qs[None, :, :]
            wmask = (offs_l < hi)[:, None, None] & dmask[None, None, :]
            dx_ptr = DX + b64 * s_dxb + start * s_dxl + rows[:, None, None] * s_dxl + cols[None, :, :]
            if SAME_KV:
                tl.store(dx_ptr, (p[:, :, None] * do[None, :, :] + dk).to(DX.dtype.element_ty), mask=wmask)
            else:
                tl.store(dx_ptr, (p[:, :, None] * do[None, :, :]).to(DX.dtype.element_ty), mask=wmask)
                tl.store(DKEY + b64 * s_dkb + start * s_dkl + rows[:, None, None] * s_dkl + cols[None, :, :],
                         dk.to(DKEY.dtype.element_ty), mask=wmask)
            dq += tl.sum(ds[:, :, None] * k, axis=0)
        tl.store(DQP + (b64 * n_chunk + pid_c) * (H * DH) + cols, dq * scale, mask=gmask)

    @triton.jit
    def _attn_pool_combine_kernel(
        PO, PLSE, OUT, LSE, s_ob, s_oq, s_od, H, NQ, DH, n_split,
        BLOCK_Q: tl.constexpr, BLOCK_DH: tl.constexpr,
    ):
        """Merge the per-chunk partials of one (b, h): a log-sum-exp weighted mean."""
        pid_bh = tl.program_id(0)
        b64 = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_q = tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_DH)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_DH], tl.float32)
        for s in range(0, n_split):
            part = (pid_bh.to(tl.int64) * n_split + s) * BLOCK_Q
            lse_s = tl.load(PLSE + part + offs_q)
            o_s = tl.load(PO + (part + offs_q[:, None]) * BLOCK_DH + offs_d[None, :])
            m_new = tl.maximum(m, lse_s)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: weights exp(-inf) = 0
            alpha = tl.exp(m - m_ref)
            beta = tl.exp(lse_s - m_ref)
            den = den * alpha + beta
            acc = acc * alpha[:, None] + o_s * beta[:, None]
            m = m_new
        has = den > 0.0
        out = acc / tl.where(has, den, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), float("-inf"))
        qmask = offs_q < NQ
        tl.store(OUT + b64 * s_ob + offs_q[:, None] * s_oq + (h * DH + offs_d)[None, :] * s_od,
                 out.to(OUT.dtype.element_ty), mask=qmask[:, None] & (offs_d < DH)[None, :])
        tl.store(LSE + (b64 * NQ + offs_q) * H + h, lse, mask=qmask)

    @triton.jit
    def _attn_pool_bwd_kernel(
        X, KEY, QRY, LEN, CU, OUT, DOUT, LSE, DX, DKEY, DQP,
        s_xb, s_xl, s_xd, s_kb, s_kl, s_kd,
        s_qb, s_qq, s_qh, s_qd, s_ob, s_oq, s_od, s_gb, s_gq, s_gd,
        s_dxb, s_dxl, s_dkb, s_dkl,
        L, H, NQ, DH, chunk, n_chunk, qk_scale, scale, TUNE_L, TUNE_BH,
        HAS_LEN: tl.constexpr, VARLEN: tl.constexpr, SAME_KV: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr, DOT_PREC: tl.constexpr,
        OFF64: tl.constexpr,
    ):
        pid_bh, b64, h, start, n, n_out = _program_rows(H, L, LEN, CU, HAS_LEN, VARLEN)
        pid_c = tl.program_id(1)
        q, offs_q, offs_d, qmask, dmask = _query_tile(QRY, b64, h, s_qb, s_qq, s_qh, s_qd, NQ, DH, BLOCK_Q, BLOCK_DH)
        offs_l = tl.arange(0, BLOCK_L)
        qd_mask = qmask[:, None] & dmask[None, :]
        col = (h * DH + offs_d)[None, :]
        do = tl.load(DOUT + b64 * s_gb + offs_q[:, None] * s_gq + col * s_gd, mask=qd_mask, other=0.0)
        o = tl.load(OUT + b64 * s_ob + offs_q[:, None] * s_oq + col * s_od, mask=qd_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # rowsum(dout * out) = sum_l p dp
        lse2 = tl.load(LSE + (b64 * NQ + offs_q) * H + h, mask=qmask, other=0.0) * 1.4426950408889634
        do = do.to(q.dtype)
        col0 = (h * DH).to(tl.int64)
        x_base = X + b64 * s_xb + start * s_xl + col0 * s_xd
        k_base = KEY + b64 * s_kb + start * s_kl + col0 * s_kd
        dx_base = DX + b64 * s_dxb + start * s_dxl + col0
        dk_base = DKEY + b64 * s_dkb + start * s_dkl + col0
        if OFF64:  # offsets inside one sample can pass 2^31 (huge strides): 64-bit tile offsets
            offs_d = offs_d.to(tl.int64)
        lo = pid_c * chunk
        hi = tl.minimum(lo + chunk, n_out)  # dx rows this program writes (zeros past n)
        dq = tl.zeros([BLOCK_Q, BLOCK_DH], tl.float32)
        for l0 in range(lo, hi, BLOCK_L):
            rows = l0 + offs_l
            if OFF64:
                rows = rows.to(tl.int64)
            wmask = (rows < hi)[:, None] & dmask[None, :]
            vrow = rows < n
            vmask = vrow[:, None] & dmask[None, :]
            v = tl.load(x_base + rows[:, None] * s_xl + offs_d[None, :] * s_xd, mask=vmask, other=0.0)
            if SAME_KV:
                k = v
            else:
                k = tl.load(k_base + rows[:, None] * s_kl + offs_d[None, :] * s_kd, mask=vmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            p = tl.where(qmask[:, None] & vrow[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dv = tl.dot(tl.trans(p.to(q.dtype)), do, input_precision=DOT_PREC)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC) * scale
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
            if SAME_KV:
                tl.store(dx_base + rows[:, None] * s_dxl + offs_d[None, :], (dv + dk).to(DX.dtype.element_ty),
                         mask=wmask)
            else:
                tl.store(dx_base + rows[:, None] * s_dxl + offs_d[None, :], dv.to(DX.dtype.element_ty), mask=wmask)
                tl.store(dk_base + rows[:, None] * s_dkl + offs_d[None, :], dk.to(DKEY.dtype.element_ty),
                         mask=wmask)
        part = (b64 * n_chunk + pid_c) * NQ
        tl.store(DQP + (part + offs_q[:, None]) * (H * DH) + col, dq * scale, mask=qd_mask)


# --- launch configuration ------------------------------------------------------------------------

def _blocks(nq: int, dh: int):
    return max(16, next_pow2(nq)), max(16, next_pow2(dh))


# Sequence chunks are multiples of this, so every BLOCK_L a configuration may pick divides them
# (the grid and the split buffers do not depend on the configuration).
CHUNK_GRAIN = 128


def _chunks(n_rows: int, bh: int, grain: int, device: torch.device):
    """Sequence chunks per (b, h): enough programs for ~4 waves when B*H alone is too few
    (flash-decoding), each chunk a multiple of ``grain`` rows. Returns (n_chunks, chunk)."""
    tiles = max(1, math.ceil(n_rows / grain))
    want = max(1, math.ceil(4 * num_sms(device) / max(bh, 1)))
    n = min(tiles, want)
    chunk = math.ceil(tiles / n) * grain
    return max(1, math.ceil(n_rows / chunk)), chunk


def _fwd_config(bdh: int):
    """Heuristic (BLOCK_L, warps, stages) of the forward: the interpreter's and MMKERNELS_AUTOTUNE=0's."""
    block_l = 128 if bdh <= 32 else (64 if bdh <= 128 else 32)
    return block_l, (4 if bdh <= 128 else 8), 3


def _bwd_config(bdh: int, dtype: torch.dtype):
    # five [BLOCK_L, BLOCK_DH]-sized live tiles (k/v, dv, dk and their products); fp32 products
    # run on the FMA path with larger register layouts: half the rows
    block_l = 64 if bdh <= 64 else 32
    if dtype == torch.float32:
        block_l //= 2
    return block_l, (4 if bdh <= 64 else 8), 2


# Autotuning search spaces (GPU): (BLOCK_L, warps, stages), pruned per problem by the tile size a
# program holds — larger tiles spill registers — and by the chip's shared memory (checked by the
# ahead-of-time compile of every config for every GPU target).
FWD_SPACE = [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 2), (128, 8, 3)]
BWD_SPACE = [(32, 2, 2), (64, 2, 2), (16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 4, 2), (64, 8, 2), (32, 8, 3)]


def _space_configs(space):
    if not HAS_TRITON:
        return []
    from triton import Config
    return [Config({"BLOCK_L": bl}, num_warps=w, num_stages=st) for bl, w, st in space]


def _as_configs(space_config):
    from triton import Config
    block_l, warps, stages = space_config
    return [Config({"BLOCK_L": block_l}, num_warps=warps, num_stages=stages)]


def _fwd_smem(block_l: int, stages: int, bdh: int, elem_bytes: int, same_kv: bool) -> int:
    """Shared memory of a forward configuration, an upper estimate (the AOT test checks it against
    the compiled kernels): ``stages - 1`` buffered ``[BLOCK_L, BLOCK_DH]`` tiles of x, and of the
    key when it is a tensor of its own, plus one tile of scratch."""
    return ((stages - 1) * (1 if same_kv else 2) + 1) * block_l * bdh * elem_bytes


def _fwd_fit(config, bdh: int, elem_bytes: int, same_kv: bool, limit: Optional[int]):
    """``config`` (BLOCK_L, warps, stages) with fewer stages, then fewer rows, until its shared
    memory fits ``limit`` (the chip's, :func:`mmkernels.runtime.shared_memory_limit`; None: as is)."""
    block_l, warps, stages = config
    while limit is not None and _fwd_smem(block_l, stages, bdh, elem_bytes, same_kv) > limit:
        if stages > 1:
            stages -= 1
        elif block_l > 16:
            block_l //= 2
        else:
            break
    return block_l, warps, stages


def _fwd_heuristic(nargs, meta):
    """The forward's untuned configuration for this launch: :func:`_fwd_config` fitted to the
    chip's shared memory."""
    x = nargs["X"]
    return _fwd_fit(_fwd_config(meta["BLOCK_DH"]), meta["BLOCK_DH"], x.element_size(), meta["SAME_KV"],
                    shared_memory_limit(x.device))


def _fwd_prune(configs, nargs, **meta):
    """16-bit: tiles of at most 16K elements, 8 warps only for tiles of 8K+ elements, within the
    chip's shared memory (:func:`_fwd_smem`; sm_86/89/120 have 99 KB a block). fp32 (exact
    products on the FMA units, not the fast path): the heuristic configuration."""
    bdh = meta["BLOCK_DH"]
    if meta["DOT_PREC"] == "ieee":
        return _as_configs(_fwd_heuristic(nargs, meta))
    es, limit = nargs["X"].element_size(), shared_memory_limit(nargs["X"].device)
    keep = [c for c in configs if c.kwargs["BLOCK_L"] * bdh <= 16384
            and (c.num_warps == 4 or c.kwargs["BLOCK_L"] * bdh >= 8192)
            and (limit is None or _fwd_smem(c.kwargs["BLOCK_L"], c.num_stages, bdh, es, meta["SAME_KV"]) <= limit)]
    return keep or _as_configs(_fwd_heuristic(nargs, meta))


def _bwd_warps_fit(warps: int, tile: int) -> bool:
    """Warps for a backward tile of ``tile`` elements: 2 for tiles of at most 1K (each thread then
    holds a 16-byte vector of a 16-bit type), 4 for tiles of more than 512 (a [32, 16] tile over
    4 warps, 8 bytes a thread, spills under Triton 3.9's ptxas), 8 for tiles of 4K+."""
    return {2: tile <= 1024, 4: tile > 512, 8: tile >= 4096}.get(warps, False)


def _bwd_prune(configs, nargs, **meta):
    """The backward holds about five tiles. 16-bit: at most 8K elements per tile, warps by tile
    size (:func:`_bwd_warps_fit`). fp32: the heuristic configuration."""
    bdh = meta["BLOCK_DH"]
    if meta["DOT_PREC"] == "ieee":
        return _as_configs(_bwd_config(bdh, torch.float32))
    keep = [c for c in configs if c.kwargs["BLOCK_L"] * bdh <= 8192
            and _bwd_warps_fit(c.num_warps, c.kwargs["BLOCK_L"] * bdh)]
    return keep or _as_configs(_bwd_config(bdh, torch.bfloat16))


if HAS_TRITON:  # the kernels behind Triton's autotuner (key: bucketed L and B*H, head geometry, dtype, constexprs)
    _TUNE_KEY = ["TUNE_L", "TUNE_BH", "NQ", "DH", "HAS_LEN", "VARLEN", "SAME_KV", "BLOCK_Q", "BLOCK_DH", "DOT_PREC"]
    _attn_pool_fwd_tuned = triton.autotune(configs=_space_configs(FWD_SPACE), key=_TUNE_KEY + ["SPLIT"],
                                           prune_configs_by={"early_config_prune": _fwd_prune})(_attn_pool_fwd_kernel)
    _attn_pool_bwd_tuned = triton.autotune(configs=_space_configs(BWD_SPACE), key=_TUNE_KEY,
                                           prune_configs_by={"early_config_prune": _bwd_prune})(_attn_pool_bwd_kernel)


# --- backend interface ---------------------------------------------------------------------------

CAPABILITIES = Capabilities(dtypes=KERNEL_CAPABILITIES.dtypes, limits=(
    Limit("queries per head", lambda query, **_: query.shape[-3], MAX_Q,
          "one program holds them all; a regular attention kernel fits better"),
    Limit("head dim", lambda query, **_: query.shape[-1], MAX_DH, "one program's registers"),
))


def why_not(explicit: bool, x, **_) -> Optional[str]:
    return triton_why_not([x], explicit)


def _geometry(x, query, cu_seqlens, max_seqlen):
    bq, nq, h, dh = query.shape
    if cu_seqlens is None:
        b, L, _ = x.shape
        return b, L, nq, h, dh, (x.stride(0), x.stride(1), x.stride(2))
    return cu_seqlens.shape[0] - 1, max_seqlen, nq, h, dh, (0, x.stride(0), x.stride(1))


def _tune_buckets(L: int, bh: int):
    """(TUNE_L, TUNE_BH): sequence length and B*H in powers of 4 (L 256..16384, B*H 64..4096), so
    a ragged training run meets a handful of autotune keys, not one per power of two."""
    return tune_bucket(L, 256, 16384), tune_bucket(bh, 64, 4096)


def _off64(L: int, D: int, *row_col_strides) -> bool:
    """Whether an offset inside one sample (row < L, column < D) can pass 2^31 for any of these
    (row stride, column stride) pairs: then the kernels use 64-bit tile offsets."""
    return any(L * abs(sr) + D * abs(sc) >= 2 ** 31 for sr, sc in row_col_strides)


def _index_tensors(lengths, cu_seqlens):
    """The kernels read lengths / offsets as contiguous int arrays."""
    return (None if lengths is None else lengths.contiguous(),
            None if cu_seqlens is None else cu_seqlens.contiguous())


def _short_heads(L: int, NQ: int, H: int, DH: int) -> int:
    """Heads per program of the ``short`` forward candidate, or 0 where it does not apply (more
    than one query per head, rows longer than one tile, wide heads): the largest power of two
    dividing H whose ``[BLOCK_L, G, BLOCK_DH]`` tile holds at most 8K elements."""
    if NQ != 1 or L > SHORT_L or DH > 128:
        return 0
    per_head = next_pow2(max(L, 1)) * max(16, next_pow2(DH))
    g = 1
    while H % (2 * g) == 0 and 2 * g * per_head <= SHORT_ELEMS:
        g *= 2
    return g


def _fma_tile(L: int, NQ: int, H: int, DH: int, own_key: bool):
    """``(G, BLOCK_L)`` of the ``fma`` backward candidate, or ``(0, 0)`` where it does not apply
    (more than one query per head, heads wider than 128): the largest power of two G dividing H
    with ``G * BLOCK_DH <= FMA_GROUP``, and rows filling a ``FMA_TILE`` tile, half of it with a key
    of its own (two input tiles; the full one spilled on sm_80), at most a chunk's grain."""
    if NQ != 1 or DH > 128:
        return 0, 0
    bdh = max(16, next_pow2(DH))
    g = 1
    while H % (2 * g) == 0 and 2 * g * bdh <= FMA_GROUP:
        g *= 2
    tile = FMA_TILE // 2 if own_key else FMA_TILE
    return g, max(1, min(next_pow2(max(L, 1)), CHUNK_GRAIN, tile // (g * bdh)))


def forward(x, key, query, lengths, cu_seqlens, max_seqlen: int, scale: float):
    lengths, cu_seqlens = _index_tensors(lengths, cu_seqlens)
    B, L, NQ, H, DH, sx = _geometry(x, query, cu_seqlens, max_seqlen)
    kt = x if key is None else key
    sk = sx if key is None else _geometry(kt, query, cu_seqlens, max_seqlen)[5]
    out = torch.empty((B, NQ, H * DH), dtype=x.dtype, device=x.device)
    lse = torch.empty((B, NQ, H), dtype=torch.float32, device=x.device)
    if B * H == 0 or x.numel() == 0:  # no rows, or no tokens at all: zeros (never NaN)
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    g = _short_heads(L, NQ, H, DH) if candidates.choice(FWD_SLOT, x.device) == "short" else 0
    if g:
        dummy = lse
        bl, bdh = next_pow2(max(L, 1)), max(16, next_pow2(DH))
        launch(_attn_pool_fwd_short_kernel, (B * (H // g),),
               x, kt, query, dummy if lengths is None else lengths, dummy if cu_seqlens is None else cu_seqlens,
               out, lse, *sx, *sk, 0 if query.shape[0] == 1 else query.stride(0), query.stride(2), query.stride(3),
               out.stride(0), out.stride(2), L, H, H // g, DH, scale * LOG2E,
               HAS_LEN=lengths is not None, VARLEN=cu_seqlens is not None, SAME_KV=key is None,
               OFF64=_off64(L, H * DH, sx[1:], sk[1:]), G=g, BLOCK_L=bl, BLOCK_DH=bdh,
               num_warps=8 if bl * g * bdh > 4096 else 4)
        return out, lse
    bq, bdh = _blocks(NQ, DH)
    n_split, chunk = _chunks(L, B * H, CHUNK_GRAIN, x.device)
    split = n_split > 1
    if split:
        po = torch.empty((B * H * n_split * bq, bdh), dtype=torch.float32, device=x.device)
        plse = torch.empty((B * H * n_split * bq,), dtype=torch.float32, device=x.device)
    else:
        po, plse = lse, lse  # unused
    dummy = lse
    args = (x, kt, query, dummy if lengths is None else lengths, dummy if cu_seqlens is None else cu_seqlens,
            out, lse, po, plse, *sx, *sk,
            0 if query.shape[0] == 1 else query.stride(0), query.stride(1), query.stride(2), query.stride(3),
            out.stride(0), out.stride(1), out.stride(2),
            L, H, NQ, DH, chunk, n_split, scale * LOG2E, *_tune_buckets(L, B * H))
    consts = dict(HAS_LEN=lengths is not None, VARLEN=cu_seqlens is not None, SAME_KV=key is None, SPLIT=split,
                  BLOCK_Q=bq, BLOCK_DH=bdh, DOT_PREC=dot_precision(x.dtype), OFF64=_off64(L, H * DH, sx[1:], sk[1:]))
    launch_tuned(_attn_pool_fwd_tuned, (B * H, n_split), args, consts,
                 fallback=_as_configs(_fwd_heuristic({"X": x}, consts))[0])
    if split:
        launch(_attn_pool_combine_kernel, (B * H,), po, plse, out, lse, out.stride(0), out.stride(1), out.stride(2),
               H, NQ, DH, n_split, BLOCK_Q=bq, BLOCK_DH=bdh, num_warps=4)
    return out, lse


def backward(grad_out, x, key, query, lengths, cu_seqlens, out, lse, max_seqlen: int, scale: float):
    lengths, cu_seqlens = _index_tensors(lengths, cu_seqlens)
    B, L, NQ, H, DH, sx = _geometry(x, query, cu_seqlens, max_seqlen)
    kt = x if key is None else key
    sk = sx if key is None else _geometry(kt, query, cu_seqlens, max_seqlen)[5]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dkey = None if key is None else torch.empty(key.shape, dtype=key.dtype, device=key.device)
    shared = query.shape[0] == 1 and B != 1
    g, bl = (_fma_tile(L, NQ, H, DH, key is not None)
             if B * H > 0 and x.numel() > 0 and candidates.choice(BWD_SLOT, x.device) == "fma" else (0, 0))
    if g:
        bdh = max(16, next_pow2(DH))
        n_chunk, chunk = _chunks(L, B * (H // g), CHUNK_GRAIN, x.device)
        dqp = torch.empty((B, n_chunk, 1, H * DH), dtype=torch.float32, device=x.device)
        dummy = lse
        sdx = (0, dx.stride(0)) if cu_seqlens is not None else (dx.stride(0), dx.stride(1))
        sdk = sdx if dkey is None else ((0, dkey.stride(0)) if cu_seqlens is not None else (dkey.stride(0), dkey.stride(1)))
        launch(_attn_pool_bwd_fma_kernel, (B * (H // g), n_chunk),
               x, kt, query, dummy if lengths is None else lengths, dummy if cu_seqlens is None else cu_seqlens,
               out, grad_out, lse, dx, dx if dkey is None else dkey, dqp, *sx, *sk,
               0 if query.shape[0] == 1 else query.stride(0), query.stride(2), query.stride(3),
               out.stride(0), out.stride(2), grad_out.stride(0), grad_out.stride(2), *sdx, *sdk,
               L, H, H // g, DH, chunk, n_chunk, scale * LOG2E, scale,
               HAS_LEN=lengths is not None, VARLEN=cu_seqlens is not None, SAME_KV=key is None,
               OFF64=_off64(L, H * DH, sx[1:], sk[1:], (sdx[1], 1), (sdk[1], 1)), G=g, BLOCK_L=bl, BLOCK_DH=bdh,
               num_warps=4 if bl * g * bdh <= 2048 else 8)
        dq = dqp.sum(dim=(0, 1) if shared else 1).view(query.shape).to(query.dtype)
        return dx, dkey, dq
    bq, bdh = _blocks(NQ, DH)
    n_chunk, chunk = _chunks(L, B * H, CHUNK_GRAIN, x.device)
    dqp = torch.empty((B, n_chunk, NQ, H * DH), dtype=torch.float32, device=x.device)
    if B * H > 0 and x.numel() > 0:
        dummy = lse
        sdx = (0, dx.stride(0)) if cu_seqlens is not None else (dx.stride(0), dx.stride(1))
        sdk = sdx if dkey is None else ((0, dkey.stride(0)) if cu_seqlens is not None else (dkey.stride(0), dkey.stride(1)))
        args = (x, kt, query, dummy if lengths is None else lengths, dummy if cu_seqlens is None else cu_seqlens,
                out, grad_out, lse, dx, dx if dkey is None else dkey, dqp, *sx, *sk,
                0 if query.shape[0] == 1 else query.stride(0), query.stride(1), query.stride(2), query.stride(3),
                out.stride(0), out.stride(1), out.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                *sdx, *sdk, L, H, NQ, DH, chunk, n_chunk, scale * LOG2E, scale, *_tune_buckets(L, B * H))
        consts = dict(HAS_LEN=lengths is not None, VARLEN=cu_seqlens is not None, SAME_KV=key is None,
                      BLOCK_Q=bq, BLOCK_DH=bdh, DOT_PREC=dot_precision(x.dtype),
                      OFF64=_off64(L, H * DH, sx[1:], sk[1:], (sdx[1], 1), (sdk[1], 1)))
        launch_tuned(_attn_pool_bwd_tuned, (B * H, n_chunk), args, consts,
                     fallback=_as_configs(_bwd_config(bdh, x.dtype))[0])
    else:  # no rows or no tokens: dx/dkey are empty, dquery is zero
        dqp.zero_()
    dq = dqp.sum(dim=(0, 1) if shared else 1).view(query.shape).to(query.dtype)
    return dx, dkey, dq
