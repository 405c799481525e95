from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.concat_linear import ACTIVATIONS, concat_linear
from ._util import check_dims, check_layer_inputs, init_like_linear


class ConcatLinear(nn.Module):
    """``act(nn.Linear(sum(dims), out_features)(torch.cat(xs, -1)))`` in one fused GEMM that never
    builds the concatenation.

    A drop-in for that Linear: ``weight`` ``[out_features, sum(dims)]`` and ``bias`` have the
    Linear's names, shapes and initialisation, so ``ConcatLinear(dims, n).load_state_dict(
    nn.Linear(sum(dims), n).state_dict())`` works unchanged (and the other way round).
    """

    def __init__(self, dims: Sequence[int], out_features: int, bias: bool = True,
                 activation: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        dims = check_dims(dims)
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features: expected a positive int, got {out_features!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.dims = tuple(dims)
        self.in_features, self.out_features = sum(dims), out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        init_like_linear(self.weight, self.bias, self.in_features)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        check_layer_inputs(xs, self.dims)
        return concat_linear(xs, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}")
