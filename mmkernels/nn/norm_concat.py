from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops.norm_concat import NORMS, norm_concat
from ._util import check_dims, check_layer_inputs


class _Affine(nn.Module):
    """One modality's parameters, named as in ``nn.LayerNorm`` / ``nn.RMSNorm``."""

    def __init__(self, dim: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if bias else None


class NormConcat(nn.Module):
    """``torch.cat([norm_m(x_m) for m], -1)`` with one fused kernel, ``norm_m`` a LayerNorm (or
    RMSNorm) over ``dims[m]`` features.

    State dict: ``norms.{m}.weight`` and ``norms.{m}.bias`` are exactly the parameters of the
    ``m``-th ``nn.LayerNorm(dims[m])`` (``nn.RMSNorm``: weight only). So
    ``NormConcat(dims).norms[m].load_state_dict(nn.LayerNorm(dims[m]).state_dict())`` works, and a
    model holding ``self.norms = nn.ModuleList([nn.LayerNorm(d) for d in dims])`` loads its state
    dict into ``NormConcat(dims)`` unchanged.
    """

    def __init__(self, dims: Sequence[int], norm: str = "layernorm", eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None):
        super().__init__()
        dims = check_dims(dims)
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        self.dims = tuple(dims)
        self.norm = norm
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.norms = nn.ModuleList(
            [_Affine(d, bias and norm == "layernorm", device, dtype) for d in dims] if elementwise_affine else [])

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        check_layer_inputs(xs, self.dims)
        weights = [n.weight for n in self.norms] if self.elementwise_affine else None
        biases = [n.bias for n in self.norms] if self.elementwise_affine else None
        return norm_concat(xs, weights, biases, self.norm, self.eps)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, norm={self.norm!r}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
