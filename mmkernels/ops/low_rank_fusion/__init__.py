"""``mmkernels.low_rank_fusion``: Low-rank Multimodal Fusion (Liu et al., 2018),
``Σ_r w_r Π_m ([1, x_m] @ F_m[r]) + b``: on GPUs one cuBLAS GEMM per modality for all its ranks
and one Triton kernel for the product and the weighted sum over ranks (or, a candidate the GPU
check's tournament weighs against it, one Triton kernel for all of it: :mod:`.triton`).

Factors use the official LMF layout ``[R, D_m + 1, H]`` with row 0 multiplying the leading 1 (as
MultiBench), so their weights load unchanged. How a call travels: as for every op
(:mod:`mmkernels.ops._register`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._register import Op
from ... import candidates
from .._util import autocast_cast, autocasting, check_like, check_modalities
from . import cuda, reference
from .cpu import low_rank_fusion_cpu
from . import triton as triton_impl

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}


def _fake(xs, factors, rank_weights, bias):
    return xs[0].new_empty((*xs[0].shape[:-1], factors[0].shape[-1]))


OP = Op("low_rank_fusion", "(Tensor[] xs, Tensor[] factors, Tensor? rank_weights, Tensor? bias) -> Tensor", IMPLS,
        fake=_fake, differentiable=("xs", "factors", "rank_weights", "bias"), cpu=low_rank_fusion_cpu)


def check_inputs(xs, factors, rank_weights, bias):
    """Validate the public arguments; raises ``ValueError`` naming the argument before any kernel runs."""
    xs, dims = check_modalities(xs)
    if isinstance(factors, torch.Tensor) or not isinstance(factors, (list, tuple)) or len(factors) != len(xs):
        got = type(factors).__name__ if not isinstance(factors, (list, tuple)) else f"{len(factors)} entries"
        raise ValueError(f"factors: expected a list of {len(xs)} tensors (one per modality), got {got}")
    x0 = xs[0]
    r = h = None
    for i, (d, f) in enumerate(zip(dims, factors)):
        check_like(f"factors[{i}]", f, x0)
        shape = f.shape
        if len(shape) != 3 or shape[1] != d + 1:
            raise ValueError(f"factors[{i}]: expected shape [R, {d + 1}, H] (D + 1 = {d + 1} "
                             f"for xs[{i}]), got {tuple(shape)}")
        if i == 0:
            r, h = shape[0], shape[2]
            if r < 1 or h < 1:
                raise ValueError(f"factors[0]: expected R >= 1 and H >= 1, got {tuple(shape)}")
        elif shape[0] != r or shape[2] != h:
            raise ValueError(f"factors[{i}]: expected rank {r} and H {h} (as factors[0]), got {tuple(shape)}")
    if rank_weights is not None:
        check_like("rank_weights", rank_weights, x0)
        if rank_weights.shape != (r,):
            raise ValueError(f"rank_weights: expected shape ({r},) (the factors' rank), "
                             f"got {tuple(rank_weights.shape)}")
    if bias is not None:
        check_like("bias", bias, x0)
        if bias.shape != (h,):
            raise ValueError(f"bias: expected shape ({h},) (the factors' H), got {tuple(bias.shape)}")
    return xs, (factors if type(factors) is list else list(factors))


def low_rank_fusion(xs: Sequence[torch.Tensor], factors: Sequence[torch.Tensor],
                    rank_weights: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``Σ_r rank_weights[r] · Π_m ([1, xs[m]] @ factors[m][r]) + bias`` -> ``[..., H]``.

    ``xs``: tensors ``[..., D_m]`` (identical leading dims); ``factors``: one ``[R, D_m + 1, H]``
    per modality; ``rank_weights``: ``[R]`` or None (all ones); ``bias``: ``[H]`` or None.
    fp32/fp16/bf16 with fp32 accumulation; differentiable in every tensor argument.
    """
    if autocasting() and isinstance(xs, (list, tuple)) and xs:
        xs, factors, rank_weights, bias = autocast_cast([list(xs), list(factors) if isinstance(factors, (list, tuple))
                                                         else factors, rank_weights, bias], xs[0])
    xs, factors = check_inputs(xs, factors, rank_weights, bias)
    if OP.cpu_path(xs[0], backend):
        return low_rank_fusion_cpu(xs, factors, rank_weights, bias)
    return OP(xs, factors, rank_weights, bias, backend=backend)


def aot_examples():
    """Representative launches for the sm_90 ahead-of-time compile test."""
    def case(dims, r, h, dtype, rows=256):
        xs = [torch.randn(rows, d, dtype=dtype) for d in dims]
        fs = [torch.randn(r, d + 1, h, dtype=dtype) for d in dims]
        w, b, dy = torch.randn(r, dtype=dtype), torch.randn(h, dtype=dtype), torch.randn(rows, h, dtype=dtype)

        def run():
            for slot in (triton_impl.FWD_SLOT, triton_impl.BWD_SLOT):
                for name in candidates.SLOTS[slot]:                     # every candidate of both passes
                    if name == "fused" and len(dims) > triton_impl.MAX_M:
                        continue                                        # refused by why_not
                    with candidates.use(slot, name):
                        triton_impl.forward(xs, fs, w, b)
                        triton_impl.backward(dy, xs, fs, w, b)
        return run

    return [
        ("bf16 128+32+32 r4 h64 (MOSI)", case((128, 32, 32), 4, 64, torch.bfloat16)),
        ("fp16 768+1024+512 r8 h512", case((768, 1024, 512), 8, 512, torch.float16)),
        ("fp32 odd 5+7 r3 h9", case((5, 7), 3, 9, torch.float32)),
        ("fp32 5 modalities 3+4+5+6+7 r2 h40", case((3, 4, 5, 6, 7), 2, 40, torch.float32, rows=100)),
    ]
