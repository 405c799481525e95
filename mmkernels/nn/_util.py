"""Argument checks shared by the multi-modality layers."""
from __future__ import annotations

import math

from typing import Sequence, Tuple

import torch


def check_dims(dims) -> Tuple[int, ...]:
    """A layer's per-modality widths: a non-empty list of positive ints."""
    if isinstance(dims, int) or len(dims) == 0 or any(not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"dims: expected a non-empty list of positive ints, got {dims!r}")
    return tuple(dims)


def check_layer_inputs(xs: Sequence[torch.Tensor], dims: Tuple[int, ...]) -> None:
    """One input per modality, each with the layer's width as its last dim (the op's own checks
    follow). Well-formed input passes in one read of each shape."""
    if type(xs) is list or type(xs) is tuple:
        try:
            if len(xs) == len(dims) and all(x.shape[-1] == d for x, d in zip(xs, dims)):
                return
        except (AttributeError, IndexError, TypeError):
            pass
    if isinstance(xs, torch.Tensor) or len(xs) != len(dims):
        raise ValueError(f"xs: expected a list of {len(dims)} tensors, got "
                         f"{type(xs).__name__ if isinstance(xs, torch.Tensor) else len(xs)}")
    for i, (x, d) in enumerate(zip(xs, dims)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"xs[{i}]: expected a tensor, got {type(x).__name__}")
        if x.shape[-1:] != (d,):
            raise ValueError(f"xs[{i}]: expected last dim {d}, got shape {tuple(x.shape)}")


def init_like_linear(weight: torch.Tensor, bias, fan_in: int) -> None:
    """``nn.Linear``'s initialisation of ``weight`` ``[out, fan_in]`` and ``bias`` (or None)."""
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(fan_in)
        torch.nn.init.uniform_(bias, -bound, bound)
