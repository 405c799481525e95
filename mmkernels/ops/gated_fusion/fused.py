"""GatedFusion's ``fused`` candidate (slot ``gated_fusion.fwd``): the gating in the gate GEMM's
epilogue.

The layer is ``out = sum_m softmax_m(z)_m * tanh(h_pre_m)`` with ``h_pre_m = x_m W_m^T + b_m``
(the projections, cuBLAS into one ``[rows, M, H]`` buffer, as the ``separate`` path) and the
feature gates ``z = cat(xs) W_z^T + b_z`` (``[rows, M * H]``). ``_gated_gate_kernel`` computes,
for a tile of ``BM`` rows and ``BH`` hidden units, the M gate tiles ``z_m = X @ W_z[m*H + h]^T``
(M accumulators; the xs read in place through TMA descriptors, as concat_linear's GEMM), adds the
bias and, in the epilogue, the masked softmax over m, ``tanh`` of the h_pre tile and the weighted
sum: ``out`` is written there; ``z`` only when the backward needs it.

Bytes per row, ``e`` bytes per element, beyond the GEMM's own operand reads (``X``: ``K * e``):

* ``separate``: the gate GEMM writes z (``M*H*e``), gated_sum reads h_pre and z (``2*M*H*e``)
  and writes out (``H*e``): ``3*M*H*e + H*e`` (3 * 3 * 1024 * 2 + 2048 = 20 KB for the headline
  M = 3, H = 1024, bf16).
* ``fused``: the epilogue reads h_pre once (``M*H*e``), writes out (``H*e``) and, when training,
  z (``M*H*e``): ``2*M*H*e + H*e`` (14 KB) training, ``M*H*e + H*e`` (8 KB) inference, and one
  launch fewer.

The backward is the ``separate`` path's: gated_sum's Triton backward from the saved h_pre and z
(``dh``, ``dz``), then fusion_projections' cuBLAS GEMMs. Feature gates with M <= :data:`MAX_M`
only (the accumulators live in registers); everything else takes the ``separate`` path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import candidates
from ...runtime import HAS_TRITON, TRITON_INTERPRET, cdiv, launch
from .._util import dot_precision, rows2d
from ..concat_linear import triton as cl

# the layer's forward designs (settled per GPU by the GPU check's tournament): "separate", the gate
# GEMM (concat_linear's choice) writing z, then gated_sum; "fused", this module
FWD_SLOT = candidates.declare("gated_fusion.fwd", ("separate", "fused"))
MAX_M = 4

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .._tl import tanh as _tanh

    @triton.jit
    def _gate_dot(A, KS, KOFF, W, woff, m0, h0, acc, BK: tl.constexpr, DOT_PREC: tl.constexpr):
        """``acc += X[m0:m0+BM] @ W[woff+h0 : +BH]^T`` over every input segment."""
        for i in tl.static_range(len(KS)):
            for k in range(0, KS[i], BK):
                a = A[i].load([m0, k])
                b = tl.trans(W.load([woff + h0, KOFF[i] + k]))
                acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        return acc

    @triton.jit
    def _gate_logit(acc, BIAS, boff, hs, hmask, present, HAS_BIAS: tl.constexpr):
        """The logits of one modality: the accumulator plus its bias; ``-inf`` where absent."""
        if HAS_BIAS:
            acc += tl.load(BIAS + boff + hs, mask=hmask, other=0.0).to(tl.float32)[None, :]
        return tl.where(present[:, None], acc, float("-inf"))

    @triton.jit
    def _gate_add(HP, SHR, SHM, SHH, Z, SZR, rows, m, H, hs, mask, present, z, zmax, den, num,
                  STORE_Z: tl.constexpr):
        """One modality's terms added to the softmax's denominator and the weighted sum:
        ``exp(z - zmax)`` and ``exp(z - zmax) * tanh(h_pre_m)``, 0 where absent (its h_pre is
        never loaded there); its logits stored in z's columns ``m*H + hs`` when ``STORE_Z``."""
        e = tl.where(present[:, None], tl.exp(z - zmax), 0.0)
        hp = tl.load(HP + rows[:, None] * SHR + m * SHM + hs[None, :] * SHH, mask=mask & present[:, None],
                     other=0.0).to(tl.float32)
        if STORE_Z:
            tl.store(Z + rows[:, None] * SZR + m * H + hs[None, :],
                     tl.where(present[:, None], z, 0.0).to(Z.dtype.element_ty), mask=mask)
        return den + e, num + e * _tanh(hp)

    @triton.jit
    def _gate_present(MASK, SMR, SMM, rows, m, rmask, HAS_MASK: tl.constexpr):
        if HAS_MASK:
            return tl.load(MASK + rows * SMR + m * SMM, mask=rmask, other=0) != 0
        return rmask

    @triton.jit
    def _gated_gate_kernel(
        A0, A1, A2, A3, A4, A5, A6, A7, KS, KOFF, W,
        BIAS, HP, SHR, SHM, SHH, MASK, SMR, SMM, Z, SZR, OUT, SOR, R, H,
        MODS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, STORE_Z: tl.constexpr,
        DOT_PREC: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """``OUT[rows, h] = sum_m softmax_m(z)_m tanh(HP[rows, m, h])`` with
        ``z_m = cat(A) @ W[m*H + h]^T + BIAS[m*H + h]`` for one [BM, BH] tile (grouped order);
        ``Z[rows, m*H + h] = z_m`` when ``STORE_Z``. Up to four modalities (``MODS``)."""
        m0, h0 = cl._grouped_tile(tl.program_id(0), R, H, BM, BH, GROUP_M)
        A = (A0, A1, A2, A3, A4, A5, A6, A7)
        acc0 = _gate_dot(A, KS, KOFF, W, 0, m0, h0, tl.zeros([BM, BH], dtype=tl.float32), BK, DOT_PREC)
        acc1 = tl.zeros([BM, BH], dtype=tl.float32)
        acc2 = tl.zeros([BM, BH], dtype=tl.float32)
        acc3 = tl.zeros([BM, BH], dtype=tl.float32)
        if MODS > 1:
            acc1 = _gate_dot(A, KS, KOFF, W, H, m0, h0, acc1, BK, DOT_PREC)
        if MODS > 2:
            acc2 = _gate_dot(A, KS, KOFF, W, 2 * H, m0, h0, acc2, BK, DOT_PREC)
        if MODS > 3:
            acc3 = _gate_dot(A, KS, KOFF, W, 3 * H, m0, h0, acc3, BK, DOT_PREC)
        rows = (m0 + tl.arange(0, BM)).to(tl.int64)
        hs = h0 + tl.arange(0, BH)
        rmask = rows < R
        hmask = hs < H
        mask = rmask[:, None] & hmask[None, :]
        p0 = _gate_present(MASK, SMR, SMM, rows, 0, rmask, HAS_MASK)
        z0 = _gate_logit(acc0, BIAS, 0, hs, hmask, p0, HAS_BIAS)
        zmax = z0
        if MODS > 1:
            p1 = _gate_present(MASK, SMR, SMM, rows, 1, rmask, HAS_MASK)
            z1 = _gate_logit(acc1, BIAS, H, hs, hmask, p1, HAS_BIAS)
            zmax = tl.maximum(zmax, z1)
        if MODS > 2:
            p2 = _gate_present(MASK, SMR, SMM, rows, 2, rmask, HAS_MASK)
            z2 = _gate_logit(acc2, BIAS, 2 * H, hs, hmask, p2, HAS_BIAS)
            zmax = tl.maximum(zmax, z2)
        if MODS > 3:
            p3 = _gate_present(MASK, SMR, SMM, rows, 3, rmask, HAS_MASK)
            z3 = _gate_logit(acc3, BIAS, 3 * H, hs, hmask, p3, HAS_BIAS)
            zmax = tl.maximum(zmax, z3)
        zmax = tl.where(zmax == float("-inf"), 0.0, zmax)   # a row with nothing present: every e is 0
        den = tl.zeros([BM, BH], dtype=tl.float32)
        num = tl.zeros([BM, BH], dtype=tl.float32)
        den, num = _gate_add(HP, SHR, SHM, SHH, Z, SZR, rows, 0, H, hs, mask, p0, z0, zmax, den, num, STORE_Z)
        if MODS > 1:
            den, num = _gate_add(HP, SHR, SHM, SHH, Z, SZR, rows, 1, H, hs, mask, p1, z1, zmax, den, num, STORE_Z)
        if MODS > 2:
            den, num = _gate_add(HP, SHR, SHM, SHH, Z, SZR, rows, 2, H, hs, mask, p2, z2, zmax, den, num, STORE_Z)
        if MODS > 3:
            den, num = _gate_add(HP, SHR, SHM, SHH, Z, SZR, rows, 3, H, hs, mask, p3, z3, zmax, den, num, STORE_Z)
        out = tl.where(den > 0.0, num / tl.where(den > 0.0, den, 1.0), 0.0)
        tl.store(OUT + rows[:, None] * SOR + hs[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def tile(device: torch.device, elem_bytes: int):
    """``(BM, BH, BK, num_warps, num_stages)``: the interpreter's small tile; else 128 x 32 tiles
    (M accumulators of 16 fp32 per thread with 8 warps; 64 wide, the epilogue spilled in the sm_90
    compile) in as many stages as the chip's shared memory holds (each stage: ``BM x BK`` of X and
    ``MODS x BH x BK`` of W; budgeted for four); on sm_100 64 x 32 tiles in 4 warps (8 warps were
    held to 128 registers there and spilled)."""
    if TRITON_INTERPRET:
        return 32, 16, 32, 4, 1
    bm, bh, bk = 128, 32, 64
    if (cl.chip_arch(device) or 0) // 10 == 10:   # sm_100: 8 warps got 128 registers each and spilled
        return 64, bh, bk, 4, 3
    per_stage = (bm + MAX_M * bh) * bk * max(2, elem_bytes)
    budget = cl.smem_budget(device)
    stages = max(1, min(3, budget // per_stage))
    if stages < 2:
        bm = 64
        stages = max(1, min(3, budget // ((bm + MAX_M * bh) * bk * max(2, elem_bytes))))
    return bm, bh, bk, 8, stages


def takes(xs, gate_weight, hidden: int, feature: bool) -> bool:
    """Whether the fused design serves this layer (feature gates, at most :data:`MAX_M` inputs,
    not more inputs than the GEMM's descriptor slots)."""
    return feature and 1 <= len(xs) <= min(MAX_M, cl.MAX_SEGMENTS) and gate_weight.shape[0] == len(xs) * hidden


def gate_and_sum(xs, h_pre, gate_weight, gate_bias, modality_mask, store_z: bool):
    """``(out [rows, H], z [rows, M*H] or an empty tensor)`` from h_pre ``[rows, M, H]`` and the
    gate GEMM's operands (see the module)."""
    x2 = [cl._aligned(rows2d(x)) for x in xs]
    rows, m, h = h_pre.shape
    out = torch.empty((rows, h), dtype=h_pre.dtype, device=h_pre.device)
    z = torch.empty((rows, m * h) if store_z else (0,), dtype=h_pre.dtype, device=h_pre.device)
    if rows == 0 or h == 0:
        return out, z
    w, offs = cl._aligned_weight(gate_weight, [x.shape[1] for x in x2])
    bm, bh, bk, warps, stages = tile(h_pre.device, h_pre.element_size())
    descs = [cl._desc(x) for x in x2]
    for d in descs:
        d.block_shape = [bm, bk]
    wd = cl._desc(w)
    wd.block_shape = [bh, bk]
    mask = None if modality_mask is None else modality_mask.reshape(rows, m).view(torch.uint8)
    bias = gate_bias.contiguous() if gate_bias is not None else out
    zz = z if store_z else out
    args = (*descs, *[None] * (cl.MAX_SEGMENTS - len(descs)), tuple(x.shape[1] for x in x2), tuple(offs), wd, bias,
            h_pre, *h_pre.stride(), out if mask is None else mask, *((0, 0) if mask is None else mask.stride()),
            zz, zz.stride(0) if store_z else 0, out, out.stride(0), rows, h)
    launch(_gated_gate_kernel, (cdiv(rows, bm) * cdiv(h, bh),), *args, MODS=m, HAS_BIAS=gate_bias is not None,
           HAS_MASK=mask is not None, STORE_Z=store_z, DOT_PREC=dot_precision(h_pre.dtype), BM=bm, BH=bh, BK=bk,
           GROUP_M=8, num_warps=warps, num_stages=stages)
    return out, z


def _layer(xs, pws, pbs, gw, gb, mask, store_z: bool):
    """``(out [..., H], h_pre, z)``: the projections (cuBLAS, into h_pre), then the fused kernel."""
    from . import gemms
    x2 = [rows2d(x) for x in xs]
    hidden = pws[0].shape[0]
    h_pre = torch.empty((x2[0].shape[0], len(xs), hidden), dtype=xs[0].dtype, device=xs[0].device)
    if h_pre.numel() > 0:
        gemms._projections(x2, pws, pbs, h_pre)
    out, z = gate_and_sum(xs, h_pre, gw, gb, mask, store_z)
    return out.view(*xs[0].shape[:-1], hidden), h_pre, z


class FusedGatedFusion(torch.autograd.Function):
    """The layer with the gating in the gate GEMM's epilogue; the backward: gated_sum's Triton
    backward from the saved h_pre and z, then fusion_projections' cuBLAS GEMMs."""

    @staticmethod
    def forward(ctx, n: int, mask: Optional[torch.Tensor], has_biases: bool, *flat):
        xs, pws = list(flat[:n]), list(flat[n:2 * n])
        pbs = list(flat[2 * n:3 * n]) if has_biases else []
        gw, gb = flat[-2], flat[-1]
        out, h_pre, z = _layer(xs, pws, pbs, gw, gb, mask, True)
        ctx.save_for_backward(*xs, *pws, *pbs, gw, gb, h_pre, z, mask)
        ctx.layout = (n, has_biases, gb is not None, mask is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from ..gated_sum import triton as gated_sum_triton
        from .reference import backward as projections_backward
        n, has_biases, has_gb, has_mask = ctx.layout
        saved = ctx.saved_tensors
        xs, pws = list(saved[:n]), list(saved[n:2 * n])
        pbs = list(saved[2 * n:3 * n]) if has_biases else []
        rest = saved[3 * n if has_biases else 2 * n:]
        gw, gb, h_pre, z, mask = rest
        rows, m, hidden = h_pre.shape
        dh, dz = gated_sum_triton.backward(grad_out.reshape(rows, hidden), h_pre, z.view(rows, m, hidden),
                                           None if mask is None else mask.reshape(rows, m))
        dxs, dws, dbs, dgw, dgb = projections_backward(dh, dz.view(rows, m * hidden), xs, pws, pbs or None, gw,
                                                       gb if has_gb else None)
        return (None, None, None, *dxs, *dws, *(dbs if has_biases else []), dgw, dgb if has_gb else None)


def gated_fusion(xs, proj_weights, proj_biases, gate_weight, gate_bias, modality_mask):
    """The layer's output ``[..., H]`` (the xs already zeroed where absent, as the caller does)."""
    n = len(xs)
    has_biases = bool(proj_biases)
    flat = [*xs, *proj_weights, *(proj_biases if has_biases else []), gate_weight, gate_bias]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in flat)):
        return _layer(xs, list(proj_weights), list(proj_biases or []), gate_weight, gate_bias, modality_mask, False)[0]
    return FusedGatedFusion.apply(n, modality_mask, has_biases, *flat)
