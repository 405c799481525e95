"""The classic fusions of multimodal sentiment analysis as layers: TFN and LMF."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from ..ops.low_rank_fusion import low_rank_fusion
from ..ops.tensor_fusion import fused_width, tensor_fusion
from ._util import check_dims, check_layer_inputs, init_like_linear


class TensorFusion(nn.Module):
    """Tensor Fusion Network's fusion (Zadeh et al., 2017): ``nn.Linear(Π(D_m + 1), out_features)``
    applied to the flattened outer product of ``[1, x_m]`` (``x_M`` innermost), computed without the
    outer product. ``weight`` and ``bias`` have that Linear's names, shapes and initialisation, so
    its state dict loads unchanged (and the other way round)."""

    def __init__(self, dims: Sequence[int], out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        dims = check_dims(dims)
        if not 2 <= len(dims) <= 4:
            raise ValueError(f"dims: expected 2 to 4 modalities, got {len(dims)}")
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features: expected a positive int, got {out_features!r}")
        self.dims = tuple(dims)
        self.in_features, self.out_features = fused_width(dims), out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        init_like_linear(self.weight, self.bias, self.in_features)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        check_layer_inputs(xs, self.dims)
        return tensor_fusion(xs, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, out_features={self.out_features}, bias={self.bias is not None}"


class LowRankFusion(nn.Module):
    """Low-rank Multimodal Fusion (Liu et al., 2018): ``Σ_r rank_weights[r] · Π_m ([1, x_m] @
    factors[m][r]) + bias``, one kernel. ``factors`` is an ``nn.ParameterList`` of
    ``[rank, D_m + 1, out_features]`` (row 0 multiplies the leading 1, as in the official code and
    MultiBench), so they are in the state dict and follow ``.to()``; initialised as the official
    code does (Xavier normal, zero bias). The official repository's weights load through
    :func:`lmf_state_dict_from_official`."""

    def __init__(self, dims: Sequence[int], out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        dims = check_dims(dims)
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"out_features: expected a positive int, got {out_features!r}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank!r}")
        self.dims, self.out_features, self.rank = tuple(dims), out_features, rank
        kw = dict(device=device, dtype=dtype)
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(rank, d + 1, out_features, **kw)) for d in dims])
        self.rank_weights = nn.Parameter(torch.empty(rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for f in self.factors:
            nn.init.xavier_normal_(f)
        nn.init.xavier_normal_(self.rank_weights.view(1, -1))
        nn.init.zeros_(self.bias)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        check_layer_inputs(xs, self.dims)
        return low_rank_fusion(xs, list(self.factors), self.rank_weights, self.bias)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, out_features={self.out_features}, rank={self.rank}"


def lmf_state_dict_from_official(state_dict: Mapping[str, torch.Tensor],
                                 modalities: Sequence[str] = ("audio", "video", "text"),
                                 prefix: str = "") -> Dict[str, torch.Tensor]:
    """A :class:`LowRankFusion` state dict from the official LMF repository's ``LMF`` module:
    ``{prefix}{name}_factor`` ``[R, D + 1, H]`` for each of ``modalities`` (in the order the layer's
    ``dims`` and inputs use), ``{prefix}fusion_weights`` ``[1, R]`` and ``{prefix}fusion_bias``
    ``[1, H]``; the module's sub-networks (``audio_subnet`` ...) are not part of the fusion and are
    ignored. ``ValueError`` naming the key when one is missing."""
    out = {}
    for i, name in enumerate(modalities):
        key = f"{prefix}{name}_factor"
        if key not in state_dict:
            raise ValueError(f"state_dict: expected key {key!r} (modality {name!r}), got {sorted(state_dict)[:8]}...")
        out[f"factors.{i}"] = state_dict[key]
    for key, dst in (("fusion_weights", "rank_weights"), ("fusion_bias", "bias")):
        if prefix + key not in state_dict:
            raise ValueError(f"state_dict: expected key {prefix + key!r}")
        t = state_dict[prefix + key]
        if t.dim() != 2 or t.shape[0] != 1:
            raise ValueError(f"state_dict[{prefix + key!r}]: expected shape [1, n], got {tuple(t.shape)}")
        out[dst] = t[0]
    return out
