"""latent_pool in Triton: full-width queries (up to 64) over tokens of any width (D up to 4096).

A program cannot hold a ``[Q, D]`` accumulator for D in the thousands, so the work is split in two
passes, each streaming x once:

* ``_lp_scores_kernel``, one program per (b, block of tokens): the scores of all Q queries for its
  tokens, ``scale * <query, x + pos> + bias`` (log2 units), reduced over D block by block; written
  as fp32 ``[B, Q, N]`` (Q x N x 4 bytes per sample: a few percent of x for D in the hundreds).
* ``_lp_weighted_sum_kernel``, one program per (b, block of columns): an online softmax over the
  scores of sample b and the weighted sum of its tokens for those columns; writes ``out`` and the
  fp32 log-sum-exp. With ``SOFTMAX=False`` it is the plain weighted sum ``w @ (x + pos)`` the
  backward uses for dquery.
* backward, ``_lp_bwd_kernel`` per (b, block of tokens): recomputes the scores and ``dout . x``
  over D, forms ``ds = p * (dp - delta)``, writes dx for its tokens (no second read of x: dx is
  ``p^T dout + ds^T query``) and ``ds`` for the dquery pass. dpos is ``dx`` summed over the batch.

Positions at or past a row's length are never loaded (masked loads): padding holding NaN cannot
leak. A row with no valid position, or a bias of -inf everywhere, gives zeros and a log-sum-exp of
-inf. Row bases and row offsets are int64. Fixed heuristic tiles (not autotuned).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backend import KERNEL_CAPABILITIES, Capabilities, Limit
from .._util import dot_precision
from ...runtime import HAS_TRITON, launch, next_pow2, triton_why_not

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
    def _token_scores(X, QRY, DOUT, LEN, BIAS, POS, s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd,
                      s_gb, s_gq, s_gd, N, D, NQ, qk_scale,
                      HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, WITH_DP: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
        """This program's tokens (axis 1) of sample b (axis 0): the biased scores of every query in
        log2 units ``[BLOCK_Q, BLOCK_N]`` and (``WITH_DP``) ``dout . (x + pos)``, x read once."""
        b64 = tl.program_id(0).to(tl.int64)
        n = _valid_len(LEN, b64, N, HAS_LEN)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_q = tl.arange(0, BLOCK_Q)
        qmask = offs_q < NQ
        vrow = rows < n
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
        return b64, rows, offs_q, qmask, vrow, s, dp

    @triton.jit
    def _lp_scores_kernel(
        X, QRY, LEN, BIAS, POS, S,
        s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd,
        N, D, NQ, qk_scale,
        HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        b64, rows, offs_q, qmask, vrow, s, _ = _token_scores(
            X, QRY, QRY, LEN, BIAS, POS, s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, 0, 0, 0,
            N, D, NQ, qk_scale, HAS_LEN, HAS_BIAS, HAS_POS, False, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_PREC)
        s = tl.where(vrow[None, :], s, float("-inf"))
        tl.store(S + (b64 * NQ + offs_q[:, None]) * N + rows[None, :], s, mask=qmask[:, None] & (rows < N)[None, :])

    @triton.jit
    def _lp_weighted_sum_kernel(
        X, POS, W, LEN, OUT, LSE,
        s_xb, s_xn, s_xd, s_pn, s_pd, s_ob, s_oq, s_od,
        N, D, NQ,
        HAS_LEN: tl.constexpr, HAS_POS: tl.constexpr, SOFTMAX: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """``SOFTMAX``: out = softmax_n(W) @ (x + pos) (W log2-unit scores, -inf where invalid) and
        the natural-log log-sum-exp. Else out = W @ (x + pos) in fp32 (W zero where invalid)."""
        b64 = tl.program_id(0).to(tl.int64)
        n = _valid_len(LEN, b64, N, HAS_LEN)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        offs_q = tl.arange(0, BLOCK_Q)
        qmask = offs_q < NQ
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        for n0 in range(0, n, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            vrow = rows < n
            wmask = qmask[:, None] & vrow[None, :]
            xt = _x_tile(X, POS, b64, rows, cols, vrow, cmask, s_xb, s_xn, s_xd, s_pn, s_pd, HAS_POS)
            if SOFTMAX:
                s = tl.load(W + (b64 * NQ + offs_q[:, None]) * N + rows[None, :], mask=wmask, other=float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: weights exp(-inf) = 0
                alpha = tl.exp2(m_i - m_ref)
                p = tl.exp2(s - m_ref[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(xt.dtype), xt, input_precision=DOT_PREC)
                m_i = m_new
            else:
                w = tl.load(W + (b64 * NQ + offs_q[:, None]) * N + rows[None, :], mask=wmask, other=0.0)
                acc += tl.dot(w.to(xt.dtype), xt, input_precision=DOT_PREC)
        omask = qmask[:, None] & cmask[None, :]
        optr = OUT + b64 * s_ob + offs_q[:, None] * s_oq + cols.to(tl.int64)[None, :] * s_od
        if SOFTMAX:
            has = l_i > 0.0
            out = acc / tl.where(has, l_i, 1.0)[:, None]
            tl.store(optr, out.to(OUT.dtype.element_ty), mask=omask)
            lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(LSE + b64 * NQ + offs_q, lse, mask=qmask & (tl.program_id(1) == 0))
        else:
            tl.store(optr, acc.to(OUT.dtype.element_ty), mask=omask)

    @triton.jit
    def _lp_bwd_kernel(
        X, QRY, LEN, BIAS, POS, DOUT, LSE, DELTA, DX, DS,
        s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd, s_dxb, s_dxn,
        N, D, NQ, qk_scale, scale,
        HAS_LEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        b64, rows, offs_q, qmask, vrow, s, dp = _token_scores(
            X, QRY, DOUT, LEN, BIAS, POS, s_xb, s_xn, s_xd, s_qb, s_qq, s_qd, s_bb, s_bn, s_pn, s_pd, s_gb, s_gq, s_gd,
            N, D, NQ, qk_scale, HAS_LEN, HAS_BIAS, HAS_POS, True, BLOCK_Q, BLOCK_N, BLOCK_D, DOT_PREC)
        lse2 = tl.load(LSE + b64 * NQ + offs_q, mask=qmask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b64 * NQ + offs_q, mask=qmask, other=0.0)
        keep = qmask[:, None] & vrow[None, :] & (lse2 > float("-inf"))[:, None]
        p = tl.where(keep, tl.exp2(s - tl.where(keep, lse2[:, None], 0.0)), 0.0)
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


# --- launch configuration ------------------------------------------------------------------------

def _blocks(nq: int, d: int, dtype: torch.dtype):
    """(BLOCK_Q, BLOCK_N, BLOCK_D, warps): 16-row query tiles at least (``tl.dot``); fp32 products
    run on the FMA units with larger register layouts: smaller column blocks."""
    bq = max(16, next_pow2(nq))
    bd = 32 if dtype == torch.float32 else 64
    bd = min(bd, max(16, next_pow2(d)))
    return bq, 64, bd, (4 if bq <= 32 else 8)


# --- backend interface ---------------------------------------------------------------------------

CAPABILITIES = Capabilities(dtypes=KERNEL_CAPABILITIES.dtypes, limits=(
    Limit("queries", lambda query, **_: query.shape[1], MAX_Q, "one program holds every query's scores"),
    Limit("width D", lambda x, **_: x.shape[-1], MAX_D, "the fp32 score scratch and tiles are sized for it"),
))


def why_not(explicit: bool, x, **_) -> Optional[str]:
    return triton_why_not([x], explicit)


def _aux(x, query, lengths, bias, pos):
    dummy = x
    return (dummy if lengths is None else lengths.contiguous(), dummy if bias is None else bias,
            dummy if pos is None else pos,
            (0, 0) if bias is None else (bias.stride(0), bias.stride(1)),
            (0, 0) if pos is None else (pos.stride(0), pos.stride(1)),
            (0 if query.shape[0] == 1 else query.stride(0), query.stride(1), query.stride(2)))


def _weighted_sum(x, pos, w, ln, out, lse, has_len, softmax, bq, bd, warps):
    B, N, D = x.shape
    NQ = w.shape[1]
    launch(_lp_weighted_sum_kernel, (B, triton.cdiv(D, bd)), x, x if pos is None else pos, w, ln, out, lse,
           *x.stride(), *((0, 0) if pos is None else pos.stride()), *out.stride(), N, D, NQ,
           HAS_LEN=has_len, HAS_POS=pos is not None, SOFTMAX=softmax, BLOCK_Q=bq,
           BLOCK_N=32 if x.dtype == torch.float32 else 64, BLOCK_D=bd,
           DOT_PREC=dot_precision(x.dtype), num_warps=warps)


def forward(x, query, lengths, bias, pos, scale: float):
    B, N, D = x.shape
    NQ = query.shape[1]
    out = torch.empty((B, NQ, D), dtype=x.dtype, device=x.device)
    lse = torch.empty((B, NQ), dtype=torch.float32, device=x.device)
    if B == 0 or N == 0 or NQ == 0 or D == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    bq, bn, bd, warps = _blocks(NQ, D, x.dtype)
    ln, bt, pt, sb, sp, sq = _aux(x, query, lengths, bias, pos)
    s = torch.empty((B, NQ, N), dtype=torch.float32, device=x.device)
    launch(_lp_scores_kernel, (B, triton.cdiv(N, bn)), x, query, ln, bt, pt, s, *x.stride(), *sq, *sb, *sp,
           N, D, NQ, scale * LOG2E, HAS_LEN=lengths is not None, HAS_BIAS=bias is not None, HAS_POS=pos is not None,
           BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC=dot_precision(x.dtype), num_warps=warps)
    _weighted_sum(x, pos, s, ln, out, lse, lengths is not None, True, bq, bd, warps)
    return out, lse


def backward(grad_out, x, query, lengths, bias, pos, out, lse, scale: float):
    B, N, D = x.shape
    NQ = query.shape[1]
    dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dq = torch.zeros((B, NQ, D), dtype=torch.float32, device=x.device)
    if not (B == 0 or N == 0 or NQ == 0 or D == 0):
        bq, bn, bd, warps = _blocks(NQ, D, x.dtype)
        ln, bt, pt, sb, sp, sq = _aux(x, query, lengths, bias, pos)
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()   # rowsum(dout * out) = sum_n p dp
        ds = torch.empty((B, NQ, N), dtype=torch.float32, device=x.device)
        launch(_lp_bwd_kernel, (B, triton.cdiv(N, bn)), x, query, ln, bt, pt, grad_out, lse, delta, dx, ds,
               *x.stride(), *sq, *sb, *sp, *grad_out.stride(), dx.stride(0), dx.stride(1),
               N, D, NQ, scale * LOG2E, scale, HAS_LEN=lengths is not None, HAS_BIAS=bias is not None,
               HAS_POS=pos is not None, BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC=dot_precision(x.dtype),
               num_warps=warps)
        _weighted_sum(x, pos, ds, ln, dq, lse, lengths is not None, False, bq, bd, warps)
    dquery = (dq.sum(0, keepdim=True) if query.shape[0] == 1 else dq).to(query.dtype)
    dpos = None if pos is None else dx.sum(0, dtype=torch.float32).to(pos.dtype)
    return dx, dquery, dpos
