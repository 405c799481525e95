"""``mmkernels.tensor_fusion``: the Tensor Fusion Network's fusion (Zadeh et al., 2017) —
``Linear`` over the flattened outer product ``[1, z_1] ⊗ … ⊗ [1, z_M]`` — in column blocks: the
``[..., Π(D_m + 1)]`` outer product is never materialised whole.

How a call travels: :func:`tensor_fusion` checks its arguments (``ValueError`` naming the
argument) -> ``torch.ops.mmkernels.tensor_fusion`` -> :func:`mmkernels.backend.select` -> that
backend's ``forward``; autograd calls ``torch.ops.mmkernels.tensor_fusion_backward``. Every
backend works in blocks of K columns (a slice of ``[1, z_1]`` times the others' outer product,
multiplied by cuBLAS on a GPU) and, for large batches, chunks of rows: at most 8 MB of the outer
product exist at once on a CPU and 1/32 of it on a GPU (:func:`reference.gpu_budget`), forward and
backward, and each weight block is read once per chunk. There is no Triton kernel (:mod:`.triton`
says why): the ``triton`` backend is the blocked cuBLAS path with the GPU's blocks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._register import Op
from .._util import autocast_cast, autocasting, check_bias, check_like, check_modalities, linear_params_ok
from . import cuda, reference
from .cpu import tensor_fusion_cpu
from . import triton as triton_impl

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}


def _fake(xs, weight, bias):
    return xs[0].new_empty((*xs[0].shape[:-1], weight.shape[0]))


OP = Op("tensor_fusion", "(Tensor[] xs, Tensor weight, Tensor? bias) -> Tensor", IMPLS, fake=_fake,
        differentiable=("xs", "weight", "bias"), cpu=tensor_fusion_cpu, plain_devices=("cpu", "cuda"))


def fused_width(dims) -> int:
    """K = Π(D_m + 1): the width of the flattened outer product."""
    k = 1
    for d in dims:  # a plain loop: torch.compile traces it (not math.prod over a generator)
        k *= d + 1
    return k


def check_inputs(xs, weight, bias):
    """Validate the public arguments; raises ``ValueError`` naming the argument before any kernel runs."""
    xs, dims = check_modalities(xs)
    k = fused_width(dims)
    try:
        if 2 <= len(xs) <= 4 and linear_params_ok(weight, bias, k, xs[0]) and k * weight.shape[0] < 2 ** 62:
            return xs
    except (AttributeError, TypeError):
        pass
    if not 2 <= len(xs) <= 4:
        raise ValueError(f"xs: expected 2 to 4 modalities, got {len(xs)}")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight: expected a tensor, got {type(weight).__name__}")
    shape = weight.shape
    if len(shape) != 2 or shape[1] != k or shape[0] < 1:
        expr = " * ".join(f"({d}+1)" for d in dims)
        raise ValueError(f"weight: expected shape [H, {k}] (H >= 1, {k} = {expr}, the product of the xs' "
                         f"last dims plus one), got {tuple(shape)}")
    if k * shape[0] >= 2 ** 62:
        raise ValueError(f"weight: {shape[0]} x {k} elements overflow int64 offsets")
    check_like("weight", weight, xs[0])
    check_bias(bias, shape[0], xs[0])
    return xs


def tensor_fusion(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``F.linear(flatten([1, x_1] ⊗ … ⊗ [1, x_M]), weight, bias)`` without the outer product.

    ``xs``: 2 to 4 tensors ``[..., D_m]`` (identical leading dims); ``weight``: ``[H, Π(D_m + 1)]``,
    its columns in ``torch.einsum`` order with ``x_M`` innermost and each modality's leading 1
    first; ``bias``: ``[H]`` or None. fp32/fp16/bf16 with fp32 accumulation. Differentiable in xs,
    weight and bias. ``backend``: this call's backend (default: :func:`mmkernels.get_backend`).
    """
    if autocasting() and isinstance(xs, (list, tuple)) and xs:
        xs, weight, bias = autocast_cast([list(xs), weight, bias], xs[0])
    xs = check_inputs(xs, weight, bias)
    if OP.cpu_path(xs[0], backend):
        return tensor_fusion_cpu(xs, weight, bias)
    return OP(xs, weight, bias, backend=backend)


def aot_examples():
    """Launches for the ahead-of-time compile test: none, tensor_fusion has no Triton kernel."""
    return []
