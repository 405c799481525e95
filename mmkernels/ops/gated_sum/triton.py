"""gated_sum in Triton: one launch forward, one launch backward, saving only the inputs.

A program owns ``ROWS`` rows and a ``BLOCK_H`` slice of the hidden dim; the masked softmax over
the modality axis, ``tanh`` and the weighted sum all happen in registers, in fp32.

* Forward: the loop over modalities is unrolled (M is a constexpr) over ``[ROWS, BLOCK_H]``
  tiles, in two passes: the largest present logit, then exp / tanh / sum with the logits re-read
  from L1. No padded modality slots and one reciprocal per output keep the special-function unit
  (exp, reciprocal) below the rate HBM feeds it: with M = 3, ~10 MUFU operations per output.
* Backward, two candidates (slot ``gated_sum.bwd``, settled per GPU by the GPU check's
  tournament: :mod:`mmkernels.candidates`):
  - ``padded`` (the default): every modality at once, as a ``[ROWS, MP, BLOCK_H]`` tile (M padded
    to a power of two, MP); it moves about twice the forward's bytes per output, so the padding
    should cost no time; modality gates always take it (their program walks all of H).
  - ``unrolled`` (feature gates): the forward's unrolled ``[ROWS, BLOCK_H]`` loop over modalities
    in three passes (largest logit; softmax denominator and out; then each modality's dh and dz),
    the logits and h_pre re-read from L1/L2 in passes 2 and 3, so HBM still sees each input once:
    no padded slots (M = 3 pads to 4), a wider tile per program, at the price of recomputing
    exp and tanh in pass 3 (MUFU: about 5 operations per input element, within the H100's rate at
    HBM speed, which is what the GPU decides). Bytes per output element, M = 3 bf16: reads h_pre,
    z (12 B) and dy (2 B), writes dh, dz (12 B).

* Absent modalities (mask False, or m >= M) are never loaded: their loads are masked, with
  ``-inf`` for z (softmax weight exactly 0) and 0 for h_pre (``tanh(0) = 0``), so NaN or garbage
  stored there cannot reach the result or any gradient. A row with nothing present has a zero
  softmax denominator: it gives out = 0 and zero gradients.
* Backward, per element: ``dh_m = dy * g_m * (1 - t_m^2)`` and, with out = sum_k g_k t_k
  recomputed in registers, ``dz_m = g_m * dy * (t_m - out)`` for feature gates; modality gates
  sum that over the hidden dim, so their program walks all of H (one program per row tile) and
  writes ``dz`` once at the end: no atomics, deterministic.
* Row bases are int64; offsets inside a row are int32 unless strides make them pass 2^31
  (``OFF64``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import candidates
from ...backend import KERNEL_CAPABILITIES, Capabilities, Limit
from ...runtime import HAS_TRITON, cdiv, launch_tuned, next_pow2, triton_why_not, tune_bucket

MAX_M = 32  # modalities: the forward unrolls its loop over them, the backward pads them to a power of two
BWD_SLOT = candidates.declare("gated_sum.bwd", ("padded", "unrolled"))

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .._tl import tanh as _tanh

    @triton.jit
    def _load3(P, s_r, s_m, s_h, rows64, ms, hs, mask, other):
        """A [ROWS, MP, BLOCK_H] tile of a [rows, M, H] tensor, in fp32."""
        ptrs = P + rows64[:, None, None] * s_r + ms[None, :, None] * s_m + hs[None, None, :] * s_h
        return tl.load(ptrs, mask=mask, other=other).to(tl.float32)

    @triton.jit
    def _present(MASK, s_mr, s_mm, rows64, ms, n_rows, M, HAS_MASK: tl.constexpr):
        """[ROWS, MP]: row in range, modality in range, and (with a mask) marked present."""
        ok = (rows64 < n_rows)[:, None] & (ms < M)[None, :]
        if HAS_MASK:
            ok = ok & (tl.load(MASK + rows64[:, None] * s_mr + ms[None, :] * s_mm, mask=ok, other=0) != 0)
        return ok

    @triton.jit
    def _modality_weights(Z, s_zr, s_zm, rows64, ms, ok):
        """Modality gates: softmax over the present modalities of each row, [ROWS, MP] (rows with
        nothing present: all zeros)."""
        z = tl.load(Z + rows64[:, None] * s_zr + ms[None, :] * s_zm, mask=ok, other=float("-inf")).to(tl.float32)
        zmax = tl.max(z, axis=1)
        zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
        e = tl.exp(z - zmax[:, None])
        den = tl.sum(e, axis=1)
        return e * (1.0 / tl.where(den > 0.0, den, 1.0))[:, None]

    @triton.jit
    def _feature_weights(z):
        """Feature gates: softmax over axis 1 of a [ROWS, MP, BLOCK_H] tile of logits with -inf at
        absent modalities (all -inf: zeros)."""
        zmax = tl.max(z, axis=1)
        zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
        e = tl.exp(z - zmax[:, None, :])
        den = tl.sum(e, axis=1)
        return e * (1.0 / tl.where(den > 0.0, den, 1.0))[:, None, :]  # den = 0: every e is 0

    @triton.jit
    def _modality_m(Z, s_zr, s_zm, s_zh, MASK, s_mr, s_mm, HP, s_hr, s_hm, s_hh, rows64, hs, rmask, base, m,
                    FEATURE: tl.constexpr, HAS_MASK: tl.constexpr, OFF64: tl.constexpr):
        """Modality m of a row tile: its logits (``-inf`` where absent; ``[ROWS, BLOCK_H]`` for
        feature gates, ``[ROWS]`` for modality gates), the pointers of its h_pre tile and the mask
        of what is present there. Absent entries are never loaded."""
        if OFF64:  # m * stride can pass 2^31 (a stride may be the constexpr 1: widen m, not it)
            mi = tl.full((), m, tl.int64)
        else:
            mi = m
        present = rmask
        if HAS_MASK:
            present = present & (tl.load(MASK + rows64 * s_mr + mi * s_mm, mask=rmask, other=0) != 0)
        ok = base & present[:, None]
        if FEATURE:
            z = tl.load(Z + rows64[:, None] * s_zr + mi * s_zm + hs[None, :] * s_zh, mask=ok, other=float("-inf"))
        else:
            z = tl.load(Z + rows64 * s_zr + mi * s_zm, mask=present, other=float("-inf"))
        return z.to(tl.float32), HP + rows64[:, None] * s_hr + mi * s_hm + hs[None, :] * s_hh, ok

    @triton.jit
    def _row_tile(n_rows, H, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, OFF64: tl.constexpr):
        """This program's ``[ROWS, BLOCK_H]`` tile: its rows (int64), hidden columns, row mask and
        the tile's in-range mask."""
        rows64 = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        if OFF64:
            hs = hs.to(tl.int64)
        rmask = rows64 < n_rows
        return rows64, hs, rmask, rmask[:, None] & (hs < H)[None, :]

    @triton.jit
    def _unrolled_sums(Z, s_zr, s_zm, s_zh, MASK, s_mr, s_mm, HP, s_hr, s_hm, s_hh, rows64, hs, rmask, base,
                       M: tl.constexpr, FEATURE: tl.constexpr, HAS_MASK: tl.constexpr, OFF64: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_H: tl.constexpr):
        """The unrolled modality loop's first two passes over a row tile: the largest present
        logit (0 where nothing is present: every weight 0), then, re-reading the (L1-resident)
        logits with h_pre, the softmax denominator and ``sum_m e_m tanh(h_pre_m)``. Returns
        ``(zmax, den, num)``; zmax and den are ``[ROWS]`` for modality gates."""
        if FEATURE:
            zmax = tl.full((ROWS, BLOCK_H), float("-inf"), tl.float32)
        else:
            zmax = tl.full((ROWS,), float("-inf"), tl.float32)
        for m in tl.static_range(M):
            z, _, _ = _modality_m(Z, s_zr, s_zm, s_zh, MASK, s_mr, s_mm, HP, s_hr, s_hm, s_hh, rows64, hs, rmask,
                                  base, m, FEATURE, HAS_MASK, OFF64)
            zmax = tl.maximum(zmax, z)
        zmax = tl.where(zmax == float("-inf"), 0.0, zmax)
        num = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
        den = tl.zeros(zmax.shape, dtype=tl.float32)
        for m in tl.static_range(M):
            z, hp, ok = _modality_m(Z, s_zr, s_zm, s_zh, MASK, s_mr, s_mm, HP, s_hr, s_hm, s_hh, rows64, hs,
                                    rmask, base, m, FEATURE, HAS_MASK, OFF64)
            e = tl.exp(z - zmax)                                 # absent: exp(-inf) = 0
            t = _tanh(tl.load(hp, mask=ok, other=0.0).to(tl.float32))
            den += e
            if FEATURE:
                num += e * t
            else:
                num += e[:, None] * t
        return zmax, den, num

    @triton.jit
    def _gated_sum_fwd_kernel(
        HP, s_hr, s_hm, s_hh,            # h_pre [rows, M, H]
        Z, s_zr, s_zm, s_zh,             # z [rows, M, H] (feature) or [rows, M] (modality; s_zh unused)
        MASK, s_mr, s_mm,                # mask [rows, M] as uint8 (HAS_MASK)
        OUT, s_or,                       # out [rows, H], unit column stride
        n_rows, H, H_BUCKET, ROWS_BUCKET,  # buckets: autotune key only
        M: tl.constexpr, FEATURE: tl.constexpr, HAS_MASK: tl.constexpr, OFF64: tl.constexpr,
        ROWS: tl.constexpr, MP: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # The modality loop is unrolled (M is a constexpr) over [ROWS, BLOCK_H] tiles: no padded
        # modality slots, one exp per logit, one reciprocal per output.
        rows64, hs, rmask, base = _row_tile(n_rows, H, ROWS, BLOCK_H, OFF64)
        zmax, den, num = _unrolled_sums(Z, s_zr, s_zm, s_zh, MASK, s_mr, s_mm, HP, s_hr, s_hm, s_hh, rows64, hs,
                                        rmask, base, M, FEATURE, HAS_MASK, OFF64, ROWS, BLOCK_H)
        inv = 1.0 / tl.where(den > 0.0, den, 1.0)               # den = 0: num is 0 too
        if FEATURE:
            out = num * inv
        else:
            out = num * inv[:, None]
        tl.store(OUT + rows64[:, None] * s_or + hs[None, :], out.to(OUT.dtype.element_ty), mask=base)

    @triton.jit
    def _gated_sum_bwd_kernel(
        HP, s_hr, s_hm, s_hh,
        Z, s_zr, s_zm, s_zh,
        MASK, s_mr, s_mm,
        DY, s_yr, s_yh,                  # grad of out [rows, H]
        DH, DZ,                          # contiguous [rows, M, H] and z's shape
        n_rows, M, H, H_BUCKET, ROWS_BUCKET,  # buckets: autotune key only
        FEATURE: tl.constexpr, HAS_MASK: tl.constexpr, OFF64: tl.constexpr,
        ROWS: tl.constexpr, MP: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        rows64 = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        ms = tl.arange(0, MP)
        if OFF64:
            ms = ms.to(tl.int64)
        rmask = rows64 < n_rows
        ok = _present(MASK, s_mr, s_mm, rows64, ms, n_rows, M, HAS_MASK)
        # feature gates: one BLOCK_H slice per program (axis 1); modality gates: one program walks
        # all of H, summing dy * (t - out) per modality for dz
        if FEATURE:
            h_lo = tl.program_id(1) * BLOCK_H
            h_hi = h_lo + BLOCK_H
        else:
            h_lo = 0
            h_hi = H
            g2 = _modality_weights(Z, s_zr, s_zm, rows64, ms, ok)
            acc = tl.zeros((ROWS, MP), dtype=tl.float32)
        for h0 in range(h_lo, h_hi, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            if OFF64:
                hs = hs.to(tl.int64)
            hmask = hs < H
            ok3 = ok[:, :, None] & hmask[None, None, :]
            t = _tanh(_load3(HP, s_hr, s_hm, s_hh, rows64, ms, hs, ok3, 0.0))
            if FEATURE:
                g = _feature_weights(_load3(Z, s_zr, s_zm, s_zh, rows64, ms, hs, ok3, float("-inf")))
            else:
                g = g2[:, :, None]
            out = tl.sum(g * t, axis=1)
            dy = tl.load(DY + rows64[:, None] * s_yr + hs[None, :] * s_yh,
                         mask=rmask[:, None] & hmask[None, :], other=0.0).to(tl.float32)
            dyt = dy[:, None, :] * (t - out[:, None, :])     # d out / d g_m, times dy
            st3 = rmask[:, None, None] & (ms < M)[None, :, None] & hmask[None, None, :]
            off3 = rows64[:, None, None] * M * H + ms[None, :, None] * H + hs[None, None, :]
            # absent entries: exactly 0, even where dy is not finite (0 * inf would be NaN)
            dh = tl.where(ok3, dy[:, None, :] * g * (1.0 - t * t), 0.0)
            tl.store(DH + off3, dh.to(DH.dtype.element_ty), mask=st3)
            if FEATURE:
                tl.store(DZ + off3, tl.where(ok3, g * dyt, 0.0).to(DZ.dtype.element_ty), mask=st3)
            else:
                acc += tl.sum(tl.where(ok3, dyt, 0.0), axis=2)
        if not FEATURE:
            tl.store(DZ + rows64[:, None] * M + ms[None, :], (g2 * acc).to(DZ.dtype.element_ty),
                     mask=rmask[:, None] & (ms < M)[None, :])

    @triton.jit
    def _gated_sum_bwd_unrolled_kernel(
        HP, s_hr, s_hm, s_hh,
        Z, s_zr, s_zm, s_zh,
        MASK, s_mr, s_mm,
        DY, s_yr, s_yh,                  # grad of out [rows, H]
        DH, DZ,                          # contiguous [rows, M, H]
        n_rows, H, H_BUCKET, ROWS_BUCKET,  # buckets: autotune key only
        M: tl.constexpr, HAS_MASK: tl.constexpr, OFF64: tl.constexpr,
        ROWS: tl.constexpr, MP: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # Feature gates only. Pass 1: the largest present logit; pass 2: softmax denominator and
        # out = sum_m g_m t_m; pass 3: per modality, g_m and t_m again (z and h_pre from L1/L2),
        # dh_m = dy g_m (1 - t_m^2) and dz_m = g_m dy (t_m - out).
        rows64, hs, rmask, base = _row_tile(n_rows, H, ROWS, BLOCK_H, OFF64)
        zmax, den, num = _unrolled_sums(Z, s_zr, s_zm, s_zh, MASK, s_mr, s_mm, HP, s_hr, s_hm, s_hh, rows64, hs,
                                        rmask, base, M, True, HAS_MASK, OFF64, ROWS, BLOCK_H)
        inv = 1.0 / tl.where(den > 0.0, den, 1.0)
        out = num * inv
        dy = tl.load(DY + rows64[:, None] * s_yr + hs[None, :] * s_yh, mask=base, other=0.0).to(tl.float32)
        for m in tl.static_range(M):
            z, hp, ok = _modality_m(Z, s_zr, s_zm, s_zh, MASK, s_mr, s_mm, HP, s_hr, s_hm, s_hh, rows64, hs,
                                    rmask, base, m, True, HAS_MASK, OFF64)
            g = tl.exp(z - zmax) * inv
            t = _tanh(tl.load(hp, mask=ok, other=0.0).to(tl.float32))
            off = rows64[:, None] * M * H + m * H + hs[None, :]
            # absent entries: exactly 0, even where dy is not finite (0 * inf would be NaN)
            tl.store(DH + off, tl.where(ok, dy * g * (1.0 - t * t), 0.0).to(DH.dtype.element_ty), mask=base)
            tl.store(DZ + off, tl.where(ok, g * dy * (t - out), 0.0).to(DZ.dtype.element_ty), mask=base)


# --- launch configuration ------------------------------------------------------------------------

def _cost(rows: int, block_h: int, mp: int, elem_size: int) -> int:
    """Registers a tile costs, in 16-bit elements: the forward holds one [ROWS, BLOCK_H] tile of
    h_pre and z per modality (unrolled), the backward [ROWS, MP, BLOCK_H] tiles; fp32 counts twice."""
    return rows * block_h * mp * elem_size // 2


def _warps(rows: int, block_h: int, mp: int, backward: bool) -> int:
    """4 warps until a thread would hold more than 16 elements of one tile, else 8 (a thread's
    share of a tile row stays >= 8 elements: 16-byte loads for 16-bit types)."""
    return 4 if rows * block_h * (mp if backward else 1) <= 2048 else 8


def _heuristic_tile(mp: int, h: int, backward: bool, elem_size: int = 2):
    """A tile costing ~4K (forward) or ~2K (backward) 16-bit registers' worth of elements, as wide
    as H up to 512 (forward) / 256 (backward), narrower when many modalities would not fit; many
    rows per program when H is small."""
    budget = 2048 if backward else 4096
    block_h = min(next_pow2(h), 256 if backward else 512)
    while block_h > 16 and _cost(1, block_h, mp, elem_size) > budget:
        block_h //= 2
    rows = max(1, min(64, budget // _cost(1, block_h, mp, elem_size)))
    return rows, block_h, _warps(rows, block_h, mp, backward)


def _unrolled_tile(h: int):
    """The unrolled backward's untuned tile: 1024 elements per modality tile (8 per thread of 4
    warps: 16-byte loads of 16-bit inputs), as wide as H up to 512."""
    block_h = min(next_pow2(h), 512)
    return max(1, min(64, 1024 // block_h)), block_h, 4


def _space():
    return [(rows, bh, 4) for bh in (64, 128, 256, 512, 1024) for rows in (1, 2, 4, 8, 16, 32, 64)]


def _prune(configs, nargs, **meta):
    """Tiles costing 1K-8K (forward) or 1K-4K (backward) 16-bit elements (see :func:`_cost`), at
    least 128 wide (or all of H) and no wider than H needs, with 16 bytes per thread and load (a
    forward tile of at least 2 KB); warps by :func:`_warps`. ``HI``: another upper bound (the
    unrolled backward: the forward's tiles and warps, the backward's budget)."""
    mp, h, bwd = meta["MP"], nargs["H"], bool(meta.get("BWD"))
    es = nargs["HP"].element_size()
    hi = meta.get("HI") or (4096 if bwd else 8192)
    hp = max(64, next_pow2(h))
    keep, seen = [], set()
    for c in configs:
        r, bh = c.kwargs["ROWS"], c.kwargs["BLOCK_H"]
        if (bh > hp or bh < min(hp, 128) or not 1024 <= _cost(r, bh, mp, es) <= hi or (r, bh) in seen
                or (not bwd and r * bh * es < 2048)):
            continue
        seen.add((r, bh))
        keep.append(_config(r, bh, _warps(r, bh, mp, bwd)))
    return keep or [_config(*_heuristic_tile(mp, h, bwd, es))]


def _config(rows, block_h, warps):
    return triton.Config({"ROWS": rows, "BLOCK_H": block_h}, num_warps=warps)


if HAS_TRITON:
    # key: the modality count, H and the row count bucketed (a tiny first batch must not pick the
    # tile of every later size: few rows want narrow tiles to fill the GPU), the gate kind, masking
    _TUNE_KEY = ["M", "H_BUCKET", "ROWS_BUCKET", "FEATURE", "HAS_MASK", "OFF64"]

    def _tuned(kernel, bwd: bool):
        def prune(configs, nargs, **meta):
            return _prune(configs, nargs, BWD=bwd, **meta)
        return triton.autotune(configs=[_config(*c) for c in _space()], key=_TUNE_KEY,
                               prune_configs_by={"early_config_prune": prune})(kernel)

    _gated_sum_fwd_tuned = _tuned(_gated_sum_fwd_kernel, bwd=False)
    _gated_sum_bwd_tuned = _tuned(_gated_sum_bwd_kernel, bwd=True)
    # the unrolled backward walks [ROWS, BLOCK_H] tiles as the forward does (its tiles of 2 KB at
    # least and its warps: 16-byte loads) but holds four fp32 tiles across its third pass (zmax,
    # 1/den, out, dy): the backward's budget of 4K (wider tiles spill in the sm_90 compile)
    _gated_sum_bwd_unrolled_tuned = triton.autotune(
        configs=[_config(*c) for c in _space()], key=[k for k in _TUNE_KEY if k != "FEATURE"],
        prune_configs_by={"early_config_prune": lambda configs, nargs, **meta: _prune(configs, nargs, HI=4096, **meta)},
    )(_gated_sum_bwd_unrolled_kernel)


# --- backend interface ---------------------------------------------------------------------------

CAPABILITIES = Capabilities(dtypes=KERNEL_CAPABILITIES.dtypes, limits=(
    Limit("modalities", lambda h_pre, **_: h_pre.shape[-2], MAX_M, "one tile holds them all"),))


def why_not(explicit: bool, h_pre, **_) -> Optional[str]:
    return triton_why_not([h_pre], explicit)


def _rows_bucket(rows: int) -> int:
    return tune_bucket(rows, 1024, 1 << 20)


def _off64(m: int, h: int, *mh_strides) -> bool:
    return any((m - 1) * sm + (h - 1) * sh >= 2 ** 31 for sm, sh in mh_strides)


def _as_rows(h_pre, z, mask):
    """``[rows, M, H]``, z ``[rows, M, H]`` / ``[rows, M]``, mask ``[rows, M]`` as uint8: views
    when the leading dims collapse."""
    m, h = h_pre.shape[-2:]
    rows = h_pre.shape[:-2].numel()                     # explicit: -1 is ambiguous when H == 0
    h3 = h_pre.reshape(rows, m, h)
    z3 = z.reshape(rows, m, h) if z.dim() == h_pre.dim() else z.reshape(rows, m)
    m2 = None if mask is None else mask.reshape(rows, m).view(torch.uint8)
    return h3, z3, m2


def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2) if t.dim() == 3 else 0)


def _common(h3, z3, m2):
    rows, m, h = h3.shape
    feature = z3.dim() == 3
    dummy = h3
    args = (h3, *_strides3(h3), z3, *_strides3(z3),
            dummy if m2 is None else m2, *((0, 0) if m2 is None else m2.stride()))
    consts = dict(FEATURE=feature, HAS_MASK=m2 is not None, MP=next_pow2(m))
    mh = [(h3.stride(1), h3.stride(2)), (z3.stride(1), z3.stride(2) if feature else 0), (h, 1)]
    if m2 is not None:
        mh.append((m2.stride(1), 0))
    return rows, m, h, feature, args, consts, mh


def forward(h_pre, z, modality_mask) -> torch.Tensor:
    h3, z3, m2 = _as_rows(h_pre, z, modality_mask)
    rows, m, h, feature, args, consts, mh = _common(h3, z3, m2)
    out = torch.empty((rows, h), dtype=h_pre.dtype, device=h_pre.device)
    if rows > 0 and h > 0:
        consts["OFF64"] = _off64(m, h, *mh)
        grid = lambda meta: (cdiv(rows, meta["ROWS"]), cdiv(h, meta["BLOCK_H"]))  # noqa: E731
        launch_tuned(_gated_sum_fwd_tuned, grid, (*args, out, out.stride(0), rows, h, next_pow2(h), _rows_bucket(rows)),
                     dict(consts, M=m), fallback=_config(*_heuristic_tile(consts["MP"], h, False, h3.element_size())))
    return out.view(*h_pre.shape[:-2], h)


def backward(grad_out, h_pre, z, modality_mask):
    """Returns ``(dh_pre, dz)``, contiguous, in the dtypes of h_pre and z."""
    h3, z3, m2 = _as_rows(h_pre, z, modality_mask)
    rows, m, h, feature, args, consts, mh = _common(h3, z3, m2)
    dy = grad_out.reshape(rows, h)
    dh = torch.empty(h_pre.shape, dtype=h_pre.dtype, device=h_pre.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    if rows > 0 and h > 0:
        consts["OFF64"] = _off64(m, h, *mh, (0, dy.stride(1)))
        tail = (dy, dy.stride(0), dy.stride(1), dh, dz, rows)
        if feature and candidates.choice(BWD_SLOT, h_pre.device) == "unrolled":
            consts.pop("FEATURE")
            grid = lambda meta: (cdiv(rows, meta["ROWS"]), cdiv(h, meta["BLOCK_H"]))  # noqa: E731
            launch_tuned(_gated_sum_bwd_unrolled_tuned, grid, (*args, *tail, h, next_pow2(h), _rows_bucket(rows)),
                         dict(consts, M=m), fallback=_config(*_unrolled_tile(h)))
            return dh, dz
        n_h = (lambda meta: cdiv(h, meta["BLOCK_H"])) if feature else (lambda meta: 1)
        grid = lambda meta: (cdiv(rows, meta["ROWS"]), n_h(meta))  # noqa: E731
        launch_tuned(_gated_sum_bwd_tuned, grid,
                     (*args, *tail, m, h, next_pow2(h), _rows_bucket(rows)), consts,
                     fallback=_config(*_heuristic_tile(consts["MP"], h, True, h3.element_size())))
    elif rows > 0:  # H == 0: nothing to sum, the modality gates' gradient is zero
        dz.zero_()
    return dh, dz
