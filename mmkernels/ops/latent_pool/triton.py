"""latent_pool in Triton: full-width queries (up to 64) over tokens of any width (D up to 4096).

Forward: x is read from HBM once. The scores of a token need all of D before its softmax weight is
known, and a ``[Q, D]`` fp32 accumulator does not fit in registers for D in the thousands, so:

* ``_lp_fwd_kernel``, one program per (b, split of the tokens), flash-decoding style: it walks its
  split in blocks of BLOCK_N tokens (64; 32 in fp32). Per block, pass A over D (block by block):
  the scores of all Q queries, ``scale * <query, x + pos> + bias`` (log2 units), reading the
  ``[BLOCK_N, D]`` tile from HBM; the online-softmax update of (m, l); pass B over D in reverse
  order (the columns just read first): the same tile again, now an L2 hit (one block per program
  is small enough for every resident program's block to stay cached between its two touches),
  ``acc = alpha * acc + p @ (x + pos)`` per column block. Between blocks the accumulator lives in
  an fp32 slot ``[Q, D]`` per program (read back from L2 by the next block; the fp32 output is
  its own slot); one block (N <= BLOCK_N) needs none. With one split per sample (once B reaches
  the SM count) the last block writes ``out = acc / l`` and the softmax statistics directly;
* otherwise the splits leave unnormalised sums ``[B, S, Q, D]`` and (m, l) ``[B, S, Q]``, and
  ``_lp_combine_kernel``, one program per (b, block of columns), rescales them to the common
  maximum, sums and normalises (splits with l = 0 weigh nothing). Splits are only as many as give
  one program per SM over the batch (small batches), at most one per block.

  The saved statistics are ``STATS [B, Q, 2]`` fp32, ``(m, log2 l)`` in log2 units, kept apart
  rather than summed into a log-sum-exp: in a row whose valid tokens are all finfo.min-masked,
  m is the clamped floor (about -1.44e38, where an fp32 ulp is about 1e31) and ``m + log2 l``
  would lose ``log2 l``; the backward's ``p = exp2((s - m) - log2 l)`` stays exact (``s - m`` is
  0 there) and gives the uniform 1 / n that PyTorch's softmax has.

  HBM bytes, bf16, one split (B >= 132): so400m B256 N729 D1152 Q16: x 430.0 MB + slots written
  back once 18.9 MB + out 9.4 MB = 1.07 x; siglip-base B1024 N196 D768 Q12: x 308.3 MB + slots
  37.7 MB + out 18.9 MB = 1.18 x (assuming the tile's second touch and the slot stay in L2).
* backward, ``_lp_bwd_kernel`` per (b, block of tokens): recomputes the scores and ``dout . x``
  over D, forms ``ds = p * (dp - delta)`` with the forward's (m, log2 l), writes dx for its tokens
  (no second read of x: dx is ``p^T dout + ds^T query``) and ``ds``; ``_lp_weighted_sum_kernel``
  per (b, block of columns) turns ``ds`` into dquery (``ds @ (x + pos)``): x is read twice. The
  ``one_pass`` candidate (``BWD_SLOT``), ``_lp_bwd_one_pass_kernel``, walks the tokens as the
  forward does and reads x once (16-bit types, up to 32 queries). dpos is ``dx`` summed over the
  batch.

Positions at or past a row's length are never loaded (masked loads): padding holding NaN cannot
leak. A row with no valid position, or a bias of -inf everywhere, gives zeros and statistics
(-inf, -inf). Row bases and row offsets are int64. Fixed heuristic tiles (not autotuned); the
forward's token plan has two candidates (``FWD_SLOT``, below); ``FWD_BLOCK_N`` and ``FWD_SPLITS``
override it (tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import candidates
from ...backend import KERNEL_CAPABILITIES, Capabilities, Limit
from .._util import dot_precision
from ...runtime import HAS_TRITON, cdiv, launch, next_pow2, target_arch, triton_why_not, unbuilt_on

LOG2E = 1.4426950408889634
MAX_Q = 64
MAX_D = 4096

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _valid_len(LEN, b64, N, HAS_LEN: tl.constexpr):
        n = N
        if HAS_LEN:
            n = tl.minimum(tl.maximum(tl.load(LEN + b64).to(tl.int64), 0), N).to(tl.int32)
        return n

    @triton.jit
    def _split_of(LEN, SLOTS, N, D, NQ, TOKENS, HAS_LEN: tl.constexpr, BLOCK_Q: tl.constexpr):
        """Program (b, split) of a walk over the tokens: b (int64), the valid length n, the
        split's first token, the query offsets and mask, and this program's fp32 ``[Q, D]`` slot."""
        b64 = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        offs_q = tl.arange(0, BLOCK_Q)
        slot = SLOTS + (b64 * tl.num_programs(1) + split) * NQ * D
        return b64, _valid_len(LEN, b64, N, HAS_LEN), split * TOKENS, offs_q, offs_q < NQ, slot

    @triton.jit
    def _x_tile(X, POS, b64, rows, cols, rmask, cmask, s_xb, s_xn, s_xd, s_pn, s_pd, HAS_POS: tl.constexpr):
        """``[rows, cols]`` of x[b] (+ pos), zero outside the masks, in x's dtype."""
        m = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)
        c64 = cols.to(tl.int64)
        xt = tl.load(X + b64 * s_xb + r64[:, None] * s_xn + c64[None, :] * s_xd, mask=m, other=0.0)
        if HAS_POS:
            pt = tl.load(POS + r64[:, None] * s_pn + c64[None, :] * s_pd, mask=m, other=0.0)
            xt = (xt.to(tl.float32) + pt.to(tl.float32)).to(X.dtype.element_ty)
        return xt

    @triton.jit
    def _q_tile(QRY, b64, offs_q, cols, qmask, cmask, s_qb, s_qq, s_qd):
        return tl.load(QRY + b64 * s_qb + offs_q[:, None] * s_qq + cols.to(tl.int64)[None, :] * s_qd,
                       mask=qmask[:, None] & cmask[None, :], other=0.0)

    @triton.jit
    def _bias_log2(BIAS, b64, rows, vrow, s_bb, s_bn):
        """The bias of these tokens in log2 units. finfo.min-style masks stay finite (clamped to
        -1e38 before the change of units, which would overflow): an all-masked row averages
        uniformly as it does with PyTorch's softmax; -inf stays -inf."""
        bv = tl.load(BIAS + b64 * s_bb + rows.to(tl.int64) * s_bn, mask=vrow, other=0.0).to(tl.float32)
        return tl.where(bv == float("-inf"), bv, tl.maximum(bv, -1e38)) * 1.4426950408889634

    @triton.jit
    def _block_scores(X, QRY, DOUT, BIAS, POS, b64, rows, vrow, offs_q, qmask,
                      s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd, D, qk_scale,
                      HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, WITH_DP: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
        """The biased scores ``[BLOCK_Q, BLOCK_N]`` of every query for the tokens ``rows`` (valid
        where ``vrow``) in log2 units, reduced over D block by block, and (``WITH_DP``)
        ``dout . (x + pos)``: the token tile is read once for both."""
        s = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
        dp = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            xt = _x_tile(X, POS, b64, rows, cols, vrow, cmask, s_xb, s_xn, s_xd, s_pn, s_pd, HAS_POS)
            q = _q_tile(QRY, b64, offs_q, cols, qmask, cmask, s_qb, s_qq, s_qd)
            s += tl.dot(q, tl.trans(xt), input_precision=DOT_PREC)
            if WITH_DP:
                do = _q_tile(DOUT, b64, offs_q, cols, qmask, cmask, s_gb, s_gq, s_gd).to(xt.dtype)
                dp += tl.dot(do, tl.trans(xt), input_precision=DOT_PREC)
        s = s * qk_scale
        if HAS_BIAS:
            s += _bias_log2(BIAS, b64, rows, vrow, s_bb, s_bn)[None, :]
        return s, dp

    @triton.jit
    def _token_scores(X, QRY, DOUT, LEN, BIAS, POS, s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd,
                      s_gb, s_gq, s_gd, N, D, NQ, qk_scale,
                      HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, WITH_DP: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
        """This program's tokens (axis 1) of sample b (axis 0): :func:`_block_scores` of them."""
        b64 = tl.program_id(0).to(tl.int64)
        n = _valid_len(LEN, b64, N, HAS_LEN)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_q = tl.arange(0, BLOCK_Q)
        qmask = offs_q < NQ
        vrow = rows < n
        s, dp = _block_scores(X, QRY, DOUT, BIAS, POS, b64, rows, vrow, offs_q, qmask,
                              s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd, D,
                              qk_scale, HAS_BIAS, HAS_POS, WITH_DP, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_PREC)
        return b64, rows, offs_q, qmask, vrow, s, dp

    @triton.jit
    def _store_stats(STATS, b64, offs_q, qmask, m, l, NQ):
        """``STATS[b, q] = (m, log2 l)`` (log2 units), apart: a log-sum-exp ``m + log2 l`` loses
        ``log2 l`` when m is the clamped finfo.min floor. (-inf, -inf) where l = 0 (nothing valid)."""
        has = l > 0.0
        sptr = STATS + (b64 * NQ + offs_q) * 2
        tl.store(sptr, tl.where(has, m, float("-inf")), mask=qmask)
        tl.store(sptr + 1, tl.where(has, tl.log2(tl.where(has, l, 1.0)), float("-inf")), mask=qmask)

    @triton.jit
    def _lp_fwd_kernel(
        X, QRY, LEN, BIAS, POS, OUT, STATS, ACC, PM, PL,
        s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_ob, s_oq, s_od,
        N, D, NQ, TOKENS, qk_scale,
        HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, DIRECT: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """Program (b, split): the tokens ``[split * TOKENS, (split + 1) * TOKENS)`` of sample b
        (those below its length), BLOCK_N at a time: the block's scores over D (x from HBM), the
        online-softmax update of (m, l), then the same tile again, D block by D block in reverse
        (the blocks just read come first: L2 hits), ``acc = alpha * acc + p @ (x + pos)``.

        ``acc`` ``[Q, D]`` fp32 is too wide for registers: while the split has further blocks it
        lives in this program's slot ``ACC[b, split]`` (read back from L2 by the next block); at the
        split's last block ``DIRECT`` (one split per sample) writes ``acc / l`` to OUT and
        ``(m, log2 l)`` to STATS, else the slot holds the split's unnormalised sum and (m, l) go to
        PM / PL for :func:`_lp_combine_kernel`. A split with no valid token writes zeros and
        (-inf, -inf) (DIRECT) or m = -inf, l = 0 (its slot is never read)."""
        b64, n, start, offs_q, qmask, slot = _split_of(LEN, ACC, N, D, NQ, TOKENS, HAS_LEN, BLOCK_Q)
        end = tl.minimum(start + TOKENS, n)
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            vrow = rows < end
            s, _ = _block_scores(X, QRY, QRY, BIAS, POS, b64, rows, vrow, offs_q, qmask,
                                 s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, 0, 0, 0, D,
                                 qk_scale, HAS_BIAS, HAS_POS, False, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_PREC)
            s = tl.where(vrow[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: weights exp(-inf) = 0
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            pt = p.to(X.dtype.element_ty)
            not_first = n0 > start
            last = n0 + BLOCK_N >= end
            more = n0 + BLOCK_N < end
            l_div = tl.where(l_i > 0.0, l_i, 1.0)
            for i in range(0, tl.cdiv(D, BLOCK_D)):
                cols = (tl.cdiv(D, BLOCK_D) - 1 - i) * BLOCK_D + tl.arange(0, BLOCK_D)
                cmask = cols < D
                xt = _x_tile(X, POS, b64, rows, cols, vrow, cmask, s_xb, s_xn, s_xd, s_pn, s_pd, HAS_POS)
                acc = tl.dot(pt, xt, input_precision=DOT_PREC)
                omask = qmask[:, None] & cmask[None, :]
                sptr = slot + offs_q[:, None] * D + cols.to(tl.int64)[None, :]
                acc += alpha[:, None] * tl.load(sptr, mask=omask & not_first, other=0.0)
                if DIRECT:
                    optr = OUT + b64 * s_ob + offs_q[:, None] * s_oq + cols.to(tl.int64)[None, :] * s_od
                    tl.store(optr, (acc / l_div[:, None]).to(OUT.dtype.element_ty), mask=omask & last)
                    tl.store(sptr, acc, mask=omask & more)
                else:
                    tl.store(sptr, acc, mask=omask)
            # the next block reads the slot back in whatever layout its threads hold: the CTA barrier
            # makes every thread's slot stores visible to all of them first
            tl.debug_barrier()
        if DIRECT:
            if end <= start:  # no valid token: zeros
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    optr = OUT + b64 * s_ob + offs_q[:, None] * s_oq + cols.to(tl.int64)[None, :] * s_od
                    tl.store(optr, tl.zeros([BLOCK_Q, BLOCK_D], tl.float32).to(OUT.dtype.element_ty),
                             mask=qmask[:, None] & (cols < D)[None, :])
            _store_stats(STATS, b64, offs_q, qmask, m_i, l_i, NQ)
        else:
            ml = (b64 * tl.num_programs(1) + tl.program_id(1)) * NQ + offs_q
            tl.store(PM + ml, m_i, mask=qmask)
            tl.store(PL + ml, l_i, mask=qmask)

    @triton.jit
    def _lp_combine_kernel(
        ACC, PM, PL, OUT, STATS, s_ob, s_oq, s_od, S, D, NQ,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (b, block of columns): the S splits' partial sums rescaled to their common
        maximum and summed, divided by the summed l; writes OUT and (first column block)
        ``(m, log2 l)``. Splits with l = 0 (no valid or only -inf-biased tokens) weigh nothing and
        their slots are not read."""
        b64 = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        offs_q = tl.arange(0, BLOCK_Q)
        qmask = offs_q < NQ
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        for sp in range(0, S):
            m = tl.maximum(m, tl.load(PM + (b64 * S + sp) * NQ + offs_q, mask=qmask, other=float("-inf")))
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        l = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for sp in range(0, S):
            ml = (b64 * S + sp) * NQ + offs_q
            ls = tl.load(PL + ml, mask=qmask, other=0.0)
            live = ls > 0.0
            w = tl.where(live, tl.exp2(tl.load(PM + ml, mask=qmask, other=0.0) - m_ref), 0.0)
            part = tl.load(ACC + ((b64 * S + sp) * NQ + offs_q[:, None]) * D + cols.to(tl.int64)[None, :],
                           mask=(qmask & live)[:, None] & cmask[None, :], other=0.0)
            acc += w[:, None] * part
            l += w * ls
        has = l > 0.0
        out = acc / tl.where(has, l, 1.0)[:, None]
        tl.store(OUT + b64 * s_ob + offs_q[:, None] * s_oq + cols.to(tl.int64)[None, :] * s_od,
                 out.to(OUT.dtype.element_ty), mask=qmask[:, None] & cmask[None, :])
        _store_stats(STATS, b64, offs_q, qmask & (tl.program_id(1) == 0), m_ref, l, NQ)

    @triton.jit
    def _lp_weighted_sum_kernel(
        X, POS, W, LEN, OUT,
        s_xb, s_xn, s_xd, s_pn, s_pd, s_ob, s_oq, s_od,
        N, D, NQ,
        HAS_LEN: tl.constexpr, HAS_POS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """Program (b, block of columns): out = W @ (x + pos) in fp32 (W ``[B, Q, N]``, zero where
        invalid): the backward's dquery from ``ds``."""
        b64 = tl.program_id(0).to(tl.int64)
        n = _valid_len(LEN, b64, N, HAS_LEN)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        offs_q = tl.arange(0, BLOCK_Q)
        qmask = offs_q < NQ
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for n0 in range(0, n, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            vrow = rows < n
            wmask = qmask[:, None] & vrow[None, :]
            xt = _x_tile(X, POS, b64, rows, cols, vrow, cmask, s_xb, s_xn, s_xd, s_pn, s_pd, HAS_POS)
            w = tl.load(W + (b64 * NQ + offs_q[:, None]) * N + rows[None, :], mask=wmask, other=0.0)
            acc += tl.dot(w.to(xt.dtype), xt, input_precision=DOT_PREC)
        tl.store(OUT + b64 * s_ob + offs_q[:, None] * s_oq + cols.to(tl.int64)[None, :] * s_od,
                 acc.to(OUT.dtype.element_ty), mask=qmask[:, None] & cmask[None, :])

    @triton.jit
    def _lp_bwd_kernel(
        X, QRY, LEN, BIAS, POS, DOUT, STATS, DELTA, DX, DS,
        s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd, s_dxb, s_dxn,
        N, D, NQ, qk_scale, scale,
        HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        b64, rows, offs_q, qmask, vrow, s, dp = _token_scores(
            X, QRY, DOUT, LEN, BIAS, POS, s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd,
            N, D, NQ, qk_scale, HAS_LEN, HAS_BIAS, HAS_POS, True, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_PREC)
        # p = exp2((s - m) - log2 l): s - m first, exact where both sit at the finfo.min floor
        sptr = STATS + (b64 * NQ + offs_q) * 2
        m2 = tl.load(sptr, mask=qmask, other=float("-inf"))
        l2 = tl.load(sptr + 1, mask=qmask, other=0.0)
        delta = tl.load(DELTA + b64 * NQ + offs_q, mask=qmask, other=0.0)
        keep = qmask[:, None] & vrow[None, :] & (m2 > float("-inf"))[:, None]
        p = tl.where(keep, tl.exp2((s - tl.where(keep, m2[:, None], 0.0)) - tl.where(keep, l2[:, None], 0.0)), 0.0)
        ds = tl.where(keep, p * (dp - delta[:, None]), 0.0) * scale
        tl.store(DS + (b64 * NQ + offs_q[:, None]) * N + rows[None, :], ds, mask=qmask[:, None] & (rows < N)[None, :])
        r64 = rows.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < D
            q = _q_tile(QRY, b64, offs_q, cols, qmask, cmask, s_qb, s_qq, s_qd)
            do = _q_tile(DOUT, b64, offs_q, cols, qmask, cmask, s_gb, s_gq, s_gd).to(q.dtype)
            dx = tl.dot(tl.trans(p.to(q.dtype)), do, input_precision=DOT_PREC)
            dx += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
            tl.store(DX + b64 * s_dxb + r64[:, None] * s_dxn + cols.to(tl.int64)[None, :], dx.to(DX.dtype.element_ty),
                     mask=(rows < N)[:, None] & cmask[None, :])

    @triton.jit
    def _lp_bwd_one_pass_kernel(
        X, QRY, LEN, BIAS, POS, DOUT, STATS, DELTA, DX, DQP,
        s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd, s_dxb, s_dxn,
        N, D, NQ, TOKENS, qk_scale, scale,
        HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """The ``one_pass`` backward, program (b, split of the tokens), the forward's walk: per
        block of BLOCK_N tokens, pass A over D reads the tile from HBM for the scores and
        ``dout . (x + pos)`` (:func:`_block_scores`) and forms ``ds``; pass B over D in reverse
        (the columns just read first: L2 hits) writes dx (``p^T dout + ds^T query``, no x needed)
        and adds ``ds @ (x + pos)`` to this program's fp32 dquery slot ``DQP[b, split]`` ``[Q, D]``
        (an L2-resident read-modify-write; the first block writes it). Tokens past the length
        give dx = 0 and add nothing. HBM bytes: x once, dx once, the slots ``B * S * Q * D * 4``."""
        b64, n, start, offs_q, qmask, slot = _split_of(LEN, DQP, N, D, NQ, TOKENS, HAS_LEN, BLOCK_Q)
        end = tl.minimum(start + TOKENS, N)       # dx is written for every token, zeros past n
        sptr = STATS + (b64 * NQ + offs_q) * 2
        m2 = tl.load(sptr, mask=qmask, other=float("-inf"))
        l2 = tl.load(sptr + 1, mask=qmask, other=0.0)
        delta = tl.load(DELTA + b64 * NQ + offs_q, mask=qmask, other=0.0)
        for n0 in range(start, end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            vrow = rows < tl.minimum(n, end)
            s, dp = _block_scores(X, QRY, DOUT, BIAS, POS, b64, rows, vrow, offs_q, qmask,
                                  s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd, D,
                                  qk_scale, HAS_BIAS, HAS_POS, True, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_PREC)
            # p = exp2((s - m) - log2 l): s - m first, exact where both sit at the finfo.min floor
            keep = qmask[:, None] & vrow[None, :] & (m2 > float("-inf"))[:, None]
            p = tl.where(keep, tl.exp2((s - tl.where(keep, m2[:, None], 0.0)) - tl.where(keep, l2[:, None], 0.0)),
                         0.0)
            ds = tl.where(keep, p * (dp - delta[:, None]), 0.0) * scale
            not_first = n0 > start
            r64 = rows.to(tl.int64)
            for i in range(0, tl.cdiv(D, BLOCK_D)):
                cols = (tl.cdiv(D, BLOCK_D) - 1 - i) * BLOCK_D + tl.arange(0, BLOCK_D)
                cmask = cols < D
                q = _q_tile(QRY, b64, offs_q, cols, qmask, cmask, s_qb, s_qq, s_qd)
                do = _q_tile(DOUT, b64, offs_q, cols, qmask, cmask, s_gb, s_gq, s_gd).to(q.dtype)
                dx = tl.dot(tl.trans(p.to(q.dtype)), do, input_precision=DOT_PREC)
                dx += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
                tl.store(DX + b64 * s_dxb + r64[:, None] * s_dxn + cols.to(tl.int64)[None, :],
                         dx.to(DX.dtype.element_ty), mask=(rows < end)[:, None] & cmask[None, :])
                xt = _x_tile(X, POS, b64, rows, cols, vrow, cmask, s_xb, s_xn, s_xd, s_pn, s_pd, HAS_POS)
                omask = qmask[:, None] & cmask[None, :]
                dptr = slot + offs_q[:, None] * D + cols.to(tl.int64)[None, :]
                acc = tl.dot(ds.to(xt.dtype), xt, input_precision=DOT_PREC)
                acc += tl.load(dptr, mask=omask & not_first, other=0.0)
                tl.store(dptr, acc, mask=omask)
            # the next block reads the slot back in whatever layout its threads hold: the CTA barrier
            # makes every thread's slot stores visible to all of them first
            tl.debug_barrier()


# --- launch configuration ------------------------------------------------------------------------

def _blocks(nq: int, d: int, dtype: torch.dtype):
    """(BLOCK_Q, BLOCK_N, BLOCK_D, warps): 16-row query tiles at least (``tl.dot``); fp32 products
    run on the FMA units with larger register layouts: smaller column blocks."""
    bq = max(16, next_pow2(nq))
    bd = 32 if dtype == torch.float32 else 64
    bd = min(bd, max(16, next_pow2(d)))
    return bq, 64, bd, (4 if bq <= 32 else 8)


def _bwd_stages(bq: int, dtype: torch.dtype, device) -> int:
    """Software-pipelining stages of the backward kernels' D loops: Triton's default (3), except
    for 64-query tiles of 16-bit products on sm_10x (B200), where Triton 3.6's pipeliner fails on
    the tcgen05 products (the ahead-of-time compile shows it): not pipelined there."""
    arch = target_arch(device)
    if bq >= 64 and dtype != torch.float32 and arch is not None and arch // 10 == 10:
        return 1
    return 3


# --- backend interface ---------------------------------------------------------------------------

CAPABILITIES = Capabilities(dtypes=KERNEL_CAPABILITIES.dtypes, limits=(
    Limit("queries", lambda query, **_: query.shape[1], MAX_Q, "one program holds every query's scores"),
    Limit("width D", lambda x, **_: x.shape[-1], MAX_D, "the fp32 score scratch and tiles are sized for it"),
))


# Chips the kernels are not built for (compute capability major -> why; see runtime.unbuilt_on):
# none. The ahead-of-time compile covers every target.
UNBUILT: dict = {}


def why_not(explicit: bool, x, **_) -> Optional[str]:
    return triton_why_not([x], explicit) or unbuilt_on(x.device, UNBUILT)


def _aux(x, query, lengths, bias, pos):
    dummy = x
    return (dummy if lengths is None else lengths.contiguous(), dummy if bias is None else bias,
            dummy if pos is None else pos,
            (0, 0) if bias is None else (bias.stride(0), bias.stride(1)),
            (0, 0) if pos is None else (pos.stride(0), pos.stride(1)),
            (0 if query.shape[0] == 1 else query.stride(0), query.stride(1), query.stride(2)))


def _weighted_sum(x, pos, w, ln, out, has_len, bq, bd, warps):
    B, N, D = x.shape
    NQ = w.shape[1]
    launch(_lp_weighted_sum_kernel, (B, cdiv(D, bd)), x, x if pos is None else pos, w, ln, out,
           *x.stride(), *((0, 0) if pos is None else pos.stride()), *out.stride(), N, D, NQ,
           HAS_LEN=has_len, HAS_POS=pos is not None, BLOCK_Q=bq,
           BLOCK_N=32 if x.dtype == torch.float32 else 64, BLOCK_D=bd,
           DOT_PREC=dot_precision(x.dtype), num_warps=warps)


# Forward token tiling: None picks the heuristic of :func:`_fwd_plan`; tests set them to force
# several blocks per split (FWD_BLOCK_N) or the combine path (FWD_SPLITS).
FWD_BLOCK_N: Optional[int] = None
FWD_SPLITS: Optional[int] = None
_DEFAULT_SMS = 132  # H100 / H200, for plans made without a GPU (interpreter, AOT compile)


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


# The forward's token plan has two candidates (GPU check tournament, :mod:`mmkernels.candidates`):
# ``one_per_sm`` (the default: as few splits as give one program per SM over the batch, so no
# combine once B reaches the SM count) and ``four_per_sm`` (four programs per SM: more loads in
# flight per SM while a program walks its blocks, paid for by the combine's fp32 partials, e.g.
# so400m B256: 2 splits, 38 MB of partials written and read beside x's 430 MB).
FWD_SLOT = candidates.declare("latent_pool.fwd", ("one_per_sm", "four_per_sm"))


def _fwd_plan(B: int, N: int, dtype: torch.dtype, device):
    """(BLOCK_N, tokens per split, splits S). Blocks of 64 tokens (32 in fp32): the tile re-read
    from L2 is one block (64 x D), small enough that every resident program's block stays cached
    between its two touches; a sample shorter than a block is one block of next_pow2(N). Splits:
    as few as give one program (``four_per_sm``: four) per SM over the batch, at most one per
    block."""
    bn = FWD_BLOCK_N or (32 if dtype == torch.float32 else 64)
    if FWD_BLOCK_N is None and N < bn:
        bn = max(16, next_pow2(N))
    blocks = cdiv(N, bn)
    per_sm = 4 if candidates.choice(FWD_SLOT, device) == "four_per_sm" else 1
    splits = FWD_SPLITS or cdiv(per_sm * _sm_count(device), max(B, 1))
    per = cdiv(blocks, max(1, min(splits, blocks)))
    return bn, per * bn, cdiv(blocks, per)


# The backward has two candidates (``BWD_SLOT``): ``two_kernels`` (the default: one program per
# (b, block of tokens) for ds and dx, then ``_lp_weighted_sum_kernel`` for dquery: x read twice
# from HBM, as many programs as token blocks) and ``one_pass`` (one program per (b, split), the
# forward's walk: x read once, dquery from per-split fp32 slots; fewer programs for small batches).
BWD_SLOT = candidates.declare("latent_pool.bwd", ("two_kernels", "one_pass"))


def _bwd_plan(B: int, N: int, NQ: int, D: int, dtype: torch.dtype, device):
    """``one_pass``'s (BLOCK_N, tokens per split, splits, BLOCK_D, warps), the forward's
    one-per-SM split of the tokens, or None where it does not apply: fp32, or more than 32
    queries, where its scores, dp, p and ds, live across both passes (fp32: on the FMA units),
    spill on some of sm_80 to sm_120 in every configuration tried. Column blocks of 32 (64 spill
    for odd widths)."""
    bq, bn, bd, warps = _blocks(NQ, D, dtype)
    if dtype == torch.float32 or bq > 32:
        return None
    bd = min(bd, 32)
    if N < bn:
        bn = max(16, next_pow2(N))
    blocks = cdiv(N, bn)
    per = cdiv(blocks, max(1, min(cdiv(_sm_count(device), max(B, 1)), blocks)))
    return bn, per * bn, cdiv(blocks, per), bd, warps


def forward(x, query, lengths, bias, pos, scale: float):
    B, N, D = x.shape
    NQ = query.shape[1]
    out = torch.empty((B, NQ, D), dtype=x.dtype, device=x.device)
    stats = torch.empty((B, NQ, 2), dtype=torch.float32, device=x.device)   # (m, log2 l)
    if B == 0 or N == 0 or NQ == 0 or D == 0:
        out.zero_()
        stats.fill_(float("-inf"))
        return out, stats
    bq, _, bd, warps = _blocks(NQ, D, x.dtype)
    bn, tokens, splits = _fwd_plan(B, N, x.dtype, x.device)
    ln, bt, pt, sb, sp, sq = _aux(x, query, lengths, bias, pos)
    direct = splits == 1
    if direct and tokens <= bn:            # one block: the sum stays in registers
        acc = pm = pl = stats
    elif direct and x.dtype == torch.float32:
        acc, pm, pl = out, stats, stats    # fp32 out is its own accumulator
    else:
        acc = torch.empty((B, splits, NQ, D), dtype=torch.float32, device=x.device)
        pm = pl = stats
        if not direct:
            pm = torch.empty((B, splits, NQ), dtype=torch.float32, device=x.device)
            pl = torch.empty((B, splits, NQ), dtype=torch.float32, device=x.device)
    launch(_lp_fwd_kernel, (B, splits), x, query, ln, bt, pt, out, stats, acc, pm, pl,
           *x.stride(), *sq, *sb, *sp, *out.stride(), N, D, NQ, tokens, scale * LOG2E,
           HAS_LEN=lengths is not None, HAS_BIAS=bias is not None, HAS_POS=pos is not None, DIRECT=direct,
           BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC=dot_precision(x.dtype), num_warps=warps)
    if not direct:
        bdc = min(128, max(16, next_pow2(D)))
        launch(_lp_combine_kernel, (B, cdiv(D, bdc)), acc, pm, pl, out, stats, *out.stride(),
               splits, D, NQ, BLOCK_Q=bq, BLOCK_D=bdc, num_warps=warps)
    return out, stats


def backward(grad_out, x, query, lengths, bias, pos, out, stats, scale: float):
    B, N, D = x.shape
    NQ = query.shape[1]
    runs = not (B == 0 or N == 0 or NQ == 0 or D == 0)
    plan = _bwd_plan(B, N, NQ, D, x.dtype, x.device) if candidates.choice(BWD_SLOT, x.device) == "one_pass" else None
    # the kernels write every element of dx (zeros at padded tokens) and of dq: no memset (an
    # x-sized write) unless they do not run
    alloc = torch.empty if runs else torch.zeros
    dx = alloc(x.shape, dtype=x.dtype, device=x.device)
    dq = None if runs and plan else alloc((B, NQ, D), dtype=torch.float32, device=x.device)
    if runs:
        bq, bn, bd, warps = _blocks(NQ, D, x.dtype)
        ln, bt, pt, sb, sp, sq = _aux(x, query, lengths, bias, pos)
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()   # rowsum(dout * out) = sum_n p dp
        flags = dict(HAS_LEN=lengths is not None, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
                     BLOCK_Q=bq, DOT_PREC=dot_precision(x.dtype), num_stages=_bwd_stages(bq, x.dtype, x.device))
        if plan:
            bn, tokens, splits, bd, warps = plan
            dqp = torch.empty((B, splits, NQ, D), dtype=torch.float32, device=x.device)
            launch(_lp_bwd_one_pass_kernel, (B, splits), x, query, ln, bt, pt, grad_out, stats, delta, dx, dqp,
                   *x.stride(), *sq, *sb, *sp, *grad_out.stride(), dx.stride(0), dx.stride(1),
                   N, D, NQ, tokens, scale * LOG2E, scale, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, **flags)
            dq = dqp[:, 0] if splits == 1 else dqp.sum(1)
        else:
            ds = torch.empty((B, NQ, N), dtype=torch.float32, device=x.device)
            launch(_lp_bwd_kernel, (B, cdiv(N, bn)), x, query, ln, bt, pt, grad_out, stats, delta, dx, ds,
                   *x.stride(), *sq, *sb, *sp, *grad_out.stride(), dx.stride(0), dx.stride(1),
                   N, D, NQ, scale * LOG2E, scale, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, **flags)
            _weighted_sum(x, pos, ds, ln, dq, lengths is not None, bq, bd, warps)
    dquery = (dq.sum(0, keepdim=True) if query.shape[0] == 1 else dq).to(query.dtype)
    dpos = None if pos is None else dx.sum(0, dtype=torch.float32).to(pos.dtype)
    return dx, dquery, dpos
