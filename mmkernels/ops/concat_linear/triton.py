"""concat_linear in Triton: one autotuned GEMM kernel whose K loop walks several inputs.

``_concat_linear_gemm_kernel`` computes ``C = act(sum_i A_i @ B[koff_i : koff_i + K_i, :] + bias)``
where the A_i travel as TMA tensor descriptors, one top-level argument each (``A0`` ..
``A{MAX_SEGMENTS-1}``, unused ones None; Triton's launcher packs only top-level descriptors, not
descriptors inside a tuple): each input is read in place with its own shape and strides, and
tiles past its width are zero-filled by the copy engine. More than ``MAX_SEGMENTS`` inputs: the
last slot takes the remaining ones concatenated (one copy of those inputs only). With the M
modality inputs as the A_i and ``weight.T`` as B it is the forward — the concatenation is never
built; the epilogue adds the bias, applies the activation and, for activations whose derivative
needs it, also stores the pre-activation z. The backward:

* ``dz = dy * act'(.)`` in ``_concat_linear_dz_kernel``, which also sums dz over rows for dbias
  (per-program fp32 partials, deterministic). relu / tanh / sigmoid take the derivative from the
  saved output y (no extra tensor: y exists anyway); gelu / gelu_tanh / silu are not invertible, so
  the forward stores z (one extra [rows, N] write and read, far cheaper than recomputing the GEMM).
  Without an activation dz is dy itself and no kernel runs.
* ``dx_m = dz @ weight[:, seg_m]`` and ``dweight[:, seg_m] = dz.T @ x_m`` (x_m read in place,
  written into its column slice of dweight): on a GPU cuBLAS GEMMs (:func:`vendor_backward` says
  why), under the interpreter and the sm_90 capture this GEMM with one segment, one launch per
  modality each, the weight gradient split over K when its output has few tiles.

Tile order is grouped (``GROUP_M`` row tiles share weight tiles in L2). Configurations are
autotuned per (rows, N, K) bucket on a GPU; with ``MMKERNELS_AUTOTUNE=0`` the pruning's choice
launches without timing; under the interpreter one small configuration runs.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ... import candidates
from ...backend import KERNEL_CAPABILITIES
from .._util import dot_precision, rows2d
from . import vendor
from ... import runtime
from ...runtime import (HAS_TRITON, TRITON_INTERPRET, cdiv, launch, launch_tuned, next_pow2, num_sms,
                        triton_why_not)

# the forward's two designs (settled per GPU by the GPU check's tournament, :mod:`mmkernels.candidates`):
# "inplace", this module's GEMM reading the xs in place; "cublas", :mod:`.vendor` (one copy into a
# reused aligned buffer, then the vendor GEMM with its bias epilogue)
FWD_SLOT = candidates.declare("concat_linear.fwd", ("inplace", "cublas"))
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
NEEDS_Z = ("gelu", "gelu_tanh", "silu")      # derivative needs the pre-activation
FROM_Y = ("relu", "tanh", "sigmoid")         # derivative is a function of the output


def _configs(interpret: bool = TRITON_INTERPRET, autotune: bool = True):
    """The GEMM's configurations: Hopper's search space (``autotune``), or four heuristic tiles of
    which the pruning keeps one per kind of problem (no timing: ``MMKERNELS_AUTOTUNE=0``, graph
    capture); one small tile under the interpreter."""
    if not HAS_TRITON:
        return []
    from triton import Config
    if not autotune and not interpret:
        # per kind of problem one tile fits each chip class: the 4-stage ones Hopper/Blackwell
        # datacenter parts (227 KB) and the A100 (163 KB); the 2-3 stage ones the ~100 KB parts
        # (sm_86, sm_89, sm_120), where the pruning drops the others
        return [Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st,
                       pre_hook=_set_block_shapes)
                for bm, bn, bk, w, st in [(128, 128, 64, 8, 4), (64, 64, 64, 4, 3), (128, 32, 128, 4, 4),
                                          (32, 64, 32, 4, 3), (128, 64, 64, 4, 3), (128, 32, 64, 4, 3),
                                          (64, 64, 64, 4, 2)]]
    if interpret:
        return [Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4, num_stages=1,
                       pre_hook=_set_block_shapes)]
    big = [  # Hopper: BM a multiple of 64 per warpgroup (wgmma), 3-4 shared-memory stages
        ({"BM": 128, "BN": 256, "BK": 64}, 8, 3),
        ({"BM": 256, "BN": 128, "BK": 64}, 8, 3),
        ({"BM": 128, "BN": 128, "BK": 64}, 8, 4),
        ({"BM": 128, "BN": 128, "BK": 64}, 4, 4),
        ({"BM": 128, "BN": 64, "BK": 64}, 4, 4),
        ({"BM": 64, "BN": 128, "BK": 64}, 4, 4),
        ({"BM": 64, "BN": 64, "BK": 64}, 4, 4),
    ]
    small_n = [  # classifier heads (N <= 128): memory-bound, one N tile, long K steps, many rows
        ({"BM": 128, "BN": 16, "BK": 128}, 4, 4),
        ({"BM": 128, "BN": 32, "BK": 128}, 4, 4),
        ({"BM": 64, "BN": 16, "BK": 256}, 4, 3),
        ({"BM": 128, "BN": 64, "BK": 128}, 4, 3),
    ]
    exact_fp32 = [  # fp32 without TF32 runs on the FMA units: small tiles (BK = 32 marks them)
        ({"BM": 32, "BN": 64, "BK": 32}, 4, 3),
        ({"BM": 64, "BN": 32, "BK": 32}, 4, 3),
    ]
    # the ~100 KB chips (sm_86, sm_89, sm_120): mma.sync tiles in 2-3 stages (<= 72 KB in 16 bits);
    # 128 x 128 in 8 warps (gelu epilogue) and 64 x 128 spilled in the sm_86 compile
    small_smem = [
        ({"BM": 128, "BN": 64, "BK": 64}, 4, 3),
        ({"BM": 128, "BN": 32, "BK": 64}, 4, 3),
        ({"BM": 64, "BN": 64, "BK": 64}, 4, 2),    # TF32 operands there (twice the bytes)
    ]
    return [Config({**kw, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)
            for kw, w, s in big + small_n + exact_fp32 + small_smem]


# Descriptors a launch takes as separate arguments: the modality count of every layer we know of
# (image, speech, text, video, depth, ...) fits without a copy.
MAX_SEGMENTS = 8
A_NAMES = tuple(f"A{i}" for i in range(MAX_SEGMENTS))


def _set_block_shapes(nargs, **_):
    """Autotuner pre-hook: the TMA descriptors' boxes follow the configuration's tile sizes."""
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    for name in A_NAMES:
        if nargs[name] is not None:
            nargs[name].block_shape = [bk, bm] if nargs["A_KM"] else [bm, bk]
    nargs["B"].block_shape = [bk, bn] if nargs["B_KN"] else [bn, bk]


def _acc_per_thread(c) -> int:
    return c.kwargs["BM"] * c.kwargs["BN"] // (32 * c.num_warps)


SMEM_RESERVE = 27 * 1024   # of a block's shared memory, left for the epilogue's layout conversions
HOPPER_SMEM = 227 * 1024
SMEM_BUDGET = HOPPER_SMEM - SMEM_RESERVE  # Hopper's (and where no chip is involved: the interpreter)


def chip_arch(device):
    """The target the kernels for ``device`` are chosen for (``major * 10 + minor``): the
    ahead-of-time compile's, else the GPU's (:func:`mmkernels.runtime.target_arch`); None for the
    interpreter."""
    return runtime.target_arch(device)


def smem_budget(device) -> int:
    """Bytes of shared memory the GEMM's operand stages may take on the chip the kernel for
    ``device`` is chosen for (:func:`mmkernels.runtime.shared_memory_limit`: the ahead-of-time
    compile's target, else the GPU's): A100 163 KB, the ~100 KB parts (sm_86, sm_89, sm_120),
    Hopper and B200 227 KB, less :data:`SMEM_RESERVE`."""
    return (runtime.shared_memory_limit(device) or HOPPER_SMEM) - SMEM_RESERVE


def _smem(c, elem_bytes: int) -> int:
    return c.num_stages * (c.kwargs["BM"] + c.kwargs["BN"]) * c.kwargs["BK"] * elem_bytes


def _prune(configs, nargs, **meta):
    """Filters, each kept only if something passes it: the FMA-path tiles (BK = 32) for exact fp32,
    the tensor-core tiles otherwise; shared memory within the chip's budget (:func:`smem_budget`;
    fp32 tiles are twice as big), no 2-stage tile where deeper pipelines fit, and below sm_90 no
    256-deep K tile and at most 64 accumulators per thread;
    with an activation in the epilogue or output rows that are not 16-byte aligned (unvectorised
    stores), at most 64 fp32 accumulators per thread (more spill registers in the epilogue, seen in
    the sm_90 compile); no tiles much wider than N or taller than the rows (masked work only).
    With no timing (``UNTUNED``, set by :func:`mmkernels.runtime.launch_tuned`), the one tile whose
    width suits N best (the largest such)."""
    n, m = nargs["N"], nargs["M"]
    heavy_epilogue = meta.get("ACT", "none") != "none" or not nargs["C_ALIGNED"]
    c_arg = nargs.get("C")
    device = c_arg.device if isinstance(c_arg, torch.Tensor) else None
    budget = smem_budget(device)
    arch = chip_arch(device)
    # everything the filters read: the same answer for the same list (kept alive by the entry)
    key = (id(configs), n, m, heavy_epilogue, nargs["ELEM_BYTES"], meta.get("DOT_PREC"), budget, arch,
           bool(meta.get("UNTUNED")))
    hit = _PRUNED.get(key)
    if hit is not None and hit[0] is configs:
        return list(hit[1])
    filters = [
        lambda c: (c.kwargs["BK"] == 32) == (meta.get("DOT_PREC") == "ieee"),
        lambda c: _smem(c, nargs["ELEM_BYTES"]) <= budget,
        # where 3-4 stages fit (Hopper, B200, A100), the 2-stage tiles of the small chips go
        lambda c: c.num_stages >= 3 or budget < 128 * 1024,
        # below sm_90 the descriptors become plain loads staged in registers: the 256-deep K tile
        # spilled there (sm_80 compile: 1.2 KB per thread)
        lambda c: arch is None or arch >= 90 or c.kwargs["BK"] <= 128,
        # and there at most 64 fp32 accumulators per thread (128 x 128 tiles in 4 warps spilled)
        lambda c: arch is None or arch >= 90 or _acc_per_thread(c) <= 64,
        lambda c: not heavy_epilogue or _acc_per_thread(c) <= 64,
        lambda c: c.kwargs["BN"] <= max(16, next_pow2(n)) and c.kwargs["BM"] <= max(64, next_pow2(m)),
    ]
    keep = list(configs)
    for f in filters:
        keep = [c for c in keep if f(c)] or keep
    if meta.get("UNTUNED"):   # the width that suits N best; of those, the largest tile
        keep = [min(keep, key=lambda c: (abs(c.kwargs["BN"] - min(n, 128)), -c.kwargs["BM"] * c.kwargs["BN"]))]
    if len(_PRUNED) >= 4096:
        _PRUNED.clear()
    _PRUNED[key] = (configs, keep)
    return list(keep)


# _prune's answers (it runs on every untuned launch: ~5 us of Python each time otherwise)
_PRUNED: dict = {}


if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .._tl import tanh as _tanh

    @triton.jit
    def _activation(z, ACT: tl.constexpr):
        if ACT == "relu":
            return tl.maximum(z, 0.0)
        elif ACT == "gelu":
            return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif ACT == "gelu_tanh":
            return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
        elif ACT == "silu":
            return z * tl.sigmoid(z)
        elif ACT == "tanh":
            return _tanh(z)
        elif ACT == "sigmoid":
            return tl.sigmoid(z)
        else:
            return z

    @triton.jit
    def _activation_grad(v, ACT: tl.constexpr):
        """d act / d z, from z (gelu, gelu_tanh, silu) or from the output y (relu, tanh, sigmoid)."""
        if ACT == "relu":
            return tl.where(v > 0.0, 1.0, 0.0)
        elif ACT == "gelu":
            return 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
        elif ACT == "gelu_tanh":
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            t = _tanh(u)
            return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * v * v)
        elif ACT == "silu":
            s = tl.sigmoid(v)
            return s * (1.0 + v * (1.0 - s))
        elif ACT == "tanh":
            return 1.0 - v * v
        elif ACT == "sigmoid":
            return v * (1.0 - v)
        else:
            return tl.full(v.shape, 1.0, tl.float32)

    @triton.jit
    def _grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """``(m0, n0)`` of program ``pid``'s output tile in grouped order: ``GROUP_M`` row tiles
        walk the column tiles together, so they share the B tiles in L2."""
        n_m = tl.cdiv(M, BM)
        group = GROUP_M * tl.cdiv(N, BN)
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        return (first_m + (pid % group) % size_m) * BM, ((pid % group) // size_m) * BN

    # The key: problem-size buckets, the operand width (a descriptor shows the autotuner no dtype;
    # fp32 tiles need twice the shared memory), the output's alignment and every constexpr that
    # changes pruning or code: everything :func:`_prune` reads.
    @triton.autotune(configs=_configs(),
                     key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "ELEM_BYTES", "C_ALIGNED", "A_KM", "B_KN", "HAS_BIAS",
                          "ACT", "STORE_Z", "DOT_PREC"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _concat_linear_gemm_kernel(
        A0, A1, A2, A3, A4, A5, A6, A7,  # one descriptor per K segment (None past the last)
        KS, KOFF,                       # tuples, one entry per K segment: width, offset in B's K
        B, B_NOFF, C, SCM, SCN, SCK, BIAS, Z, SZM,
        M, N, K_PER, M_BUCKET, N_BUCKET, K_BUCKET, ELEM_BYTES, C_ALIGNED,
        A_KM: tl.constexpr, B_KN: tl.constexpr,
        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_Z: tl.constexpr, DOT_PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """Tiles of A and B arrive by TMA (tensor descriptors): no per-element address registers, and
        reads past a segment's width or the rows are zero-filled, so no K/M/N masks in the loop.
        A_KM: A's descriptor holds A transposed ([K, M], e.g. dz for dz.T @ x); B_KN: B's holds
        [K, N] (else [N, K], e.g. the weight); B_NOFF shifts B's N coordinate (a weight segment)."""
        pid_k = tl.program_id(1)  # split-K: this program sums K rows [pid_k * K_PER, (pid_k + 1) * K_PER)
        m0, n0 = _grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        k_lo = pid_k * K_PER
        A = (A0, A1, A2, A3, A4, A5, A6, A7)
        for i in tl.static_range(len(KS)):
            k_hi = tl.minimum(KS[i], k_lo + K_PER)
            for k in range(k_lo, k_hi, BK):
                if A_KM:
                    a = tl.trans(A[i].load([k, m0]))
                else:
                    a = A[i].load([m0, k])
                if B_KN:
                    b = B.load([KOFF[i] + k, B_NOFF + n0])
                else:
                    b = tl.trans(B.load([B_NOFF + n0, KOFF[i] + k]))
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        lm = tl.arange(0, BM)
        rm = m0 + lm
        rn = n0 + tl.arange(0, BN)
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if STORE_Z:
            tl.store(Z + m0.to(tl.int64) * SZM + lm[:, None] * SZM + rn[None, :], acc.to(Z.dtype.element_ty),
                     mask=mask)
        y = _activation(acc, ACT)
        c_base = C + pid_k.to(tl.int64) * SCK + m0.to(tl.int64) * SCM
        tl.store(c_base + lm[:, None] * SCM + rn[None, :] * SCN, y.to(C.dtype.element_ty), mask=mask)

    # with autotuning off (or under CUDA-graph capture before a tuned choice exists): the pruning's
    # one tile per kind of problem among these
    _concat_linear_gemm_kernel.untuned_configs = _configs(autotune=False)

    @triton.jit
    def _concat_linear_dz_kernel(
        DY, SDYM, SDYN, V, SVM, DZ, SDZM, DBP, M, N, rows_per_prog,
        ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """dz = dy * act'(v) for rows [pid_r * rows_per_prog, ...) and columns of block pid_n; plus
        this program's fp32 column sums of dz (for dbias)."""
        pid_r = tl.program_id(0)
        pid_n = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        lo = pid_r * rows_per_prog
        hi = tl.minimum(lo + rows_per_prog, M)
        for r0 in range(lo, hi, BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (rows < hi)[:, None] & cmask[None, :]
            dy = tl.load(DY + rows[:, None] * SDYM + cols[None, :] * SDYN, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(V + rows[:, None] * SVM + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dz = dy * _activation_grad(v, ACT)
            tl.store(DZ + rows[:, None] * SDZM + cols[None, :], dz.to(DZ.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                db += tl.sum(dz, axis=0)
        if HAS_BIAS:
            tl.store(DBP + pid_r.to(tl.int64) * N + cols, db, mask=cmask)


# --- launchers -----------------------------------------------------------------------------------

def _split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Split K when the output has too few tiles for the GPU (the weight gradient of a narrow
    layer: [N, D_m] tiles, K = all the rows): ~2 waves of 128x128 tiles, >= 1024 rows per split."""
    tiles = cdiv(m, 128) * cdiv(n, 128)
    return max(1, min(cdiv(2 * num_sms(device), tiles), k // 1024))


def _desc(t: torch.Tensor):
    """A TMA descriptor over a row-major 2-D tensor with 16-byte aligned rows (the box is set per
    configuration by :func:`_set_block_shapes`). Built without the dataclass's per-call validation:
    the callers pass tensors :func:`_aligned` / :func:`_aligned_weight` made TMA-ready (16-byte
    aligned base and row stride, unit column stride, no empty dimension)."""
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding = t, list(t.shape), list(t.stride()), [1, 16 // t.element_size()], "zero"
    return d


def _gemm(segments, b, koffs, c, *, a_km=False, b_kn=False, b_noff=0, bias=None, act=None, z=None, split_k=1):
    """``c = act(sum_i A_i @ B[koffs[i]:koffs[i]+K_i] + bias)`` with ``A_i = segments[i]`` (or its
    transpose when ``a_km``) and ``B = b.T`` (or ``b`` itself when ``b_kn``, its columns from
    ``b_noff``); z: also store the pre-activation. ``split_k > 1`` (one segment, no epilogue): fp32
    partial products over K ranges, summed here in a fixed order (deterministic)."""
    m, n = c.shape
    if m == 0 or n == 0:
        return
    widths = [a.shape[0] if a_km else a.shape[1] for a in segments]
    k_total = sum(widths)
    k_per = 1 << 30  # no split: past every K (TMA coordinates are int32)
    target = c
    if split_k > 1:
        assert len(segments) == 1 and bias is None and act is None and z is None
        k_per = cdiv(cdiv(k_total, split_k), 256) * 256  # a multiple of every BK
        split_k = cdiv(k_total, k_per)
        target = torch.empty((split_k, m, n), dtype=torch.float32, device=c.device)
    assert len(segments) <= MAX_SEGMENTS, len(segments)
    descs = [_desc(a) for a in segments] + [None] * (MAX_SEGMENTS - len(segments))
    c_aligned = target.stride(-1) == 1 and (target.stride(-2) * target.element_size()) % 16 == 0
    args = (*descs, tuple(widths), tuple(koffs),
            _desc(b), b_noff, target, target.stride(-2), target.stride(-1), target.stride(0) if split_k > 1 else 0,
            c if bias is None else bias, c if z is None else z, n if z is None else z.stride(0),
            m, n, k_per, next_pow2(m), next_pow2(n), next_pow2(min(k_total, k_per)), segments[0].element_size(),
            int(c_aligned))
    consts = dict(A_KM=a_km, B_KN=b_kn, HAS_BIAS=bias is not None, ACT=act or "none", STORE_Z=z is not None,
                  DOT_PREC=dot_precision(c.dtype))
    grid = lambda meta: (cdiv(m, meta["BM"]) * cdiv(n, meta["BN"]), split_k)
    launch_tuned(_concat_linear_gemm_kernel, grid, args, consts)
    if split_k > 1:
        c.copy_(target.sum(0))



def _is_aligned(t: torch.Tensor) -> bool:
    """Rows of ``t`` ([rows, D]) start on 16-byte boundaries and are contiguous: the GEMM's tile
    loads become 16-byte copies (cp.async / TMA-friendly)."""
    e = t.element_size()
    if t.numel() == 0:
        return True
    # rows must not overlap (an expanded tensor's zero row stride is no TMA stride)
    return (t.stride(1) == 1 and (t.stride(0) >= t.shape[1] or t.shape[0] == 1) and t.stride(0) > 0
            and (t.stride(0) * e) % 16 == 0 and t.data_ptr() % 16 == 0)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are 16-byte aligned, else a copy whose rows are padded to 16
    bytes (one extra read and write of ``t``; e.g. D = 300 in bf16)."""
    if _is_aligned(t):
        return t
    per = 16 // t.element_size()
    buf = torch.empty((t.shape[0], -(-t.shape[1] // per) * per), dtype=t.dtype, device=t.device)
    buf[:, : t.shape[1]].copy_(t)
    return buf[:, : t.shape[1]]


def _aligned_weight(weight: torch.Tensor, dims):
    """``(w, offsets)`` with every modality's column segment of ``weight`` starting on a 16-byte
    boundary: ``weight`` itself when it already is (widths multiple of 8 for 16-bit types), else a
    padded copy (``N * K`` elements, small next to the activations)."""
    offs = [sum(dims[:i]) for i in range(len(dims))]
    e = weight.element_size()
    if _is_aligned(weight) and all((o * e) % 16 == 0 for o in offs):
        return weight, offs
    per = 16 // e
    padded = [-(-d // per) * per for d in dims]
    poffs = [sum(padded[:i]) for i in range(len(dims))]
    # zero padding: a tile running past a segment reads zeros there (times A's zero-filled columns)
    w = torch.zeros((weight.shape[0], sum(padded)), dtype=weight.dtype, device=weight.device)
    for d, o, po in zip(dims, offs, poffs):
        w[:, po:po + d].copy_(weight[:, o:o + d])
    return w, poffs


# --- backend interface ---------------------------------------------------------------------------

CAPABILITIES = KERNEL_CAPABILITIES


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    return triton_why_not(xs, explicit)


def forward(xs, weight, bias, activation):
    """Returns ``(out, z)``: z is the pre-activation for gelu / gelu_tanh / silu, else an empty tensor.
    The design is the slot ``concat_linear.fwd``'s choice for the xs' device."""
    if candidates.choice(FWD_SLOT, xs[0].device) == "cublas":
        return vendor.forward(xs, weight, bias, activation)
    lead = xs[0].shape[:-1]
    x2 = [rows2d(x) for x in xs]
    if len(x2) > MAX_SEGMENTS:  # the last descriptor slot takes the remaining inputs, concatenated
        x2 = x2[:MAX_SEGMENTS - 1] + [torch.cat(x2[MAX_SEGMENTS - 1:], dim=1)]
    x2 = [_aligned(x) for x in x2]
    rows, n = x2[0].shape[0], weight.shape[0]
    out = torch.empty((rows, n), dtype=xs[0].dtype, device=xs[0].device)
    z = torch.empty((rows, n) if activation in NEEDS_Z else (0,), dtype=out.dtype, device=out.device)
    w, offs = _aligned_weight(weight, [x.shape[-1] for x in x2])
    _gemm(x2, w, offs, out, bias=None if bias is None else bias.contiguous(), act=activation,
          z=z if activation in NEEDS_Z else None)
    return out.view(*lead, n), (z.view(*lead, n) if activation in NEEDS_Z else z)


def backward(grad_out, xs, weight, bias, out, z, activation):
    """Returns ``(dxs, dweight, dbias or None)``. ``bias`` only says whether there is one: the
    gradient needs the saved output (relu, tanh, sigmoid) or pre-activation z (gelu-like)."""
    has_bias = bias is not None
    n = weight.shape[0]
    dy = grad_out.reshape(-1, n)
    rows = dy.shape[0]
    dbias = None
    if activation is None:
        dz = _aligned(dy)
        if has_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(weight.dtype)
    else:
        src = (z if activation in NEEDS_Z else out).reshape(-1, n)
        per = 16 // dy.element_size()  # rows padded to 16 bytes: dz is the GEMMs' A operand
        dz = torch.empty((rows, -(-n // per) * per), dtype=dy.dtype, device=dy.device)[:, :n]
        block_n = min(128, max(16, next_pow2(n)))
        n_col = cdiv(n, block_n)
        n_row = max(1, min(cdiv(rows, 32), (4 * num_sms(dy.device)) // n_col or 1))
        rows_per_prog = cdiv(max(rows, 1), n_row)
        # every program writes its row of column sums (zeros where it has no rows): no memset
        partial = (torch.empty if rows > 0 else torch.zeros)((n_row if has_bias else 1, n), dtype=torch.float32,
                                                              device=dy.device)
        if rows > 0:
            launch(_concat_linear_dz_kernel, (n_row, n_col), dy, dy.stride(0), dy.stride(1), src, src.stride(0),
                   dz, dz.stride(0), partial, rows, n, rows_per_prog, ACT=activation, HAS_BIAS=has_bias,
                   BLOCK_R=max(1, 4096 // block_n), BLOCK_N=block_n, num_warps=4)
        if has_bias:
            dbias = partial.sum(0).to(weight.dtype)
    if not vendor_backward(dy):
        return _backward_gemms_triton(xs, weight, dz, rows, n) + (dbias,)
    # the vendor GEMMs (cuBLAS): x_m's rows and weight's column slices are read in place
    dxs: List[torch.Tensor] = []
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    off = 0
    for x in xs:
        d = x.shape[-1]
        dxs.append(torch.mm(dz, weight[:, off:off + d]).view(x.shape))     # dx_m = dz @ W[:, seg_m]
        torch.mm(dz.t(), rows2d(x), out=dweight[:, off:off + d])           # dW[:, seg_m] = dz^T @ x_m
        off += d
    return dxs, dweight, dbias


def vendor_backward(t: torch.Tensor) -> bool:
    """Whether the backward's 2M plain GEMMs (dx_m and dW's column block per modality) run on the
    vendor library: on a GPU, yes — cuBLAS beat this package's GEMM there and each Triton launch costs
    tens of µs of host time (H200, 2026-12-04: the Triton backward took 2.2 ms where its kernels
    took 1.0 and cuBLAS on a pre-made concatenation 0.8; benchmarks/RESULTS.md). The Triton
    interpreter and the sm_90 ahead-of-time capture (CPU tensors) run the package's GEMM, which the
    forward uses."""
    return t.device.type == "cuda" and not TRITON_INTERPRET


def _backward_gemms_triton(xs, weight, dz, rows: int, n: int):
    """``(dxs, dweight)`` through the package's own GEMM (see :func:`vendor_backward`)."""
    x2 = [_aligned(rows2d(x)) for x in xs]
    dxs: List[torch.Tensor] = []
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    w, woffs = _aligned_weight(weight, [x.shape[-1] for x in xs])
    off = 0
    for x, xr, wo in zip(xs, x2, woffs):
        d = x.shape[-1]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _gemm([dz], w, [0], dx.view(-1, d), b_kn=True, b_noff=wo)           # dx_m = dz @ W[:, seg_m]
        if rows == 0:
            dweight[:, off:off + d].zero_()
        else:                                                               # dW[:, seg_m] = dz^T @ x_m
            _gemm([dz], xr, [0], dweight[:, off:off + d], a_km=True, b_kn=True,
                  split_k=_split_k(n, d, rows, dz.device))
        dxs.append(dx)
        off += d
    return dxs, dweight
