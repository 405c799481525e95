from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.gated_fusion import GATES, gated_fusion
from .concat_linear import ConcatLinear
from ._util import check_dims, check_layer_inputs

class GatedFusion(nn.Module):
    """Gated Multimodal Unit (Arevalo et al., 2017) for M modalities, with missing-modality masks.

    ``h_m = tanh(x_m W_m^T + b_m)``, gate logits ``z = cat(xs) W_z^T + b_z``, ``g = softmax over
    the present modalities of z``, ``out = sum_m g_m * h_m`` (``[..., hidden]``). With
    ``gate="feature"`` every hidden unit has its own gate (``W_z`` is ``[M * hidden, sum(dims)]``,
    rows ordered modality-major); with ``gate="modality"`` one gate per modality (``[M,
    sum(dims)]``). For M = 2 and feature gates this is the GMU, whose gate is ``sigmoid(z_1 - z_2)``.

    Thin over :func:`mmkernels.ops.gated_fusion.gated_fusion`, two fused steps.
    :func:`mmkernels.ops.gated_fusion.fusion_projections` runs the GEMMs:
    every projection is written into one ``[..., M, hidden]`` buffer (no stack copy; one batched
    GEMM when the inputs are equal-width slices of one tensor) and the gate logits come from
    :func:`mmkernels.concat_linear`'s kernel, which never builds the concatenation; its backward
    sums each x_m's two gradients inside the GEMMs. Then :func:`mmkernels.gated_sum` does tanh,
    masked softmax and the weighted sum in one kernel (one more backward).

    ``forward(xs, modality_mask=None)``: ``xs[m]`` ``[..., dims[m]]``; ``modality_mask``
    ``[..., M]`` bool, True where modality m is present. Absent modalities' inputs may hold
    anything (NaN included): they are replaced by zeros before the projections and the gate
    (so they reach no output and no gradient; their gradient is 0), and their weight in the
    softmax is exactly 0. A sample with no modality present gives zeros. Replacing them costs one
    elementwise pass over the xs, taken only when a mask is given.

    Parameters: ``proj.{m}.weight/bias`` (the ``nn.Linear(dims[m], hidden)`` of each modality)
    and ``gate.weight/bias`` (a :class:`ConcatLinear`, i.e. ``nn.Linear(sum(dims), G)``).
    """

    def __init__(self, dims: Sequence[int], hidden: int, gate: str = "feature", bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        dims = check_dims(dims)
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"hidden: expected a positive int, got {hidden!r}")
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        self.dims, self.hidden, self.gate_kind = dims, hidden, gate
        m = len(dims)
        self.proj = nn.ModuleList(nn.Linear(d, hidden, bias=bias, device=device, dtype=dtype) for d in dims)
        self.gate = ConcatLinear(dims, m * hidden if gate == "feature" else m, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        for p in self.proj:
            p.reset_parameters()
        self.gate.reset_parameters()

    def forward(self, xs: Sequence[torch.Tensor], modality_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_layer_inputs(xs, self.dims)
        bias = self.proj[0].bias is not None
        return gated_fusion(xs, [p.weight for p in self.proj], [p.bias for p in self.proj] if bias else None,
                            self.gate.weight, self.gate.bias, modality_mask, self.gate_kind)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, hidden={self.hidden}, gate={self.gate_kind!r}"
