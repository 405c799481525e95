"""How the model calls its mmkernels layers: through the layers themselves (registered ops, so the
backend dispatch picks reference / Triton / CUDA), or — ``eager=True``, the model's ``"torch"``
backend — through the ops' plain PyTorch reference compositions on the same parameters, inline.

The ``"torch"`` path is the model as people write it without mmkernels (LayerNorm + cat + Linear,
einsum attention pooling, Linear + stack + softmax gating), which ``torch.compile`` can see into and
fuse. It is the baseline of the training-step benchmark and is numerically the reference backend.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..nn import AttentionPool, ConcatLinear, CrossModalAttentionPool, GatedFusion, LowRankFusion, NormConcat, TensorFusion
from ..ops.attention_pool.reference import attention_pool_ref
from ..ops.concat_linear.reference import concat_linear_ref
from ..ops.gated_fusion.reference import gated_fusion_ref
from ..ops.low_rank_fusion.reference import low_rank_fusion_ref
from ..ops.norm_concat.reference import norm_concat_ref
from ..ops.tensor_fusion.reference import tensor_fusion_ref


def pool(layer: AttentionPool, x: torch.Tensor, lengths: Optional[torch.Tensor], eager: bool) -> torch.Tensor:
    """``[B, L, D]`` -> ``[B, D]`` (one query)."""
    if not eager:
        return layer(x, lengths)
    key = layer.key_proj(x) if layer.key_proj is not None else None
    return attention_pool_ref(x, layer.query[None], lengths, key)[0][:, 0]


def cross_pool(layer: CrossModalAttentionPool, x: torch.Tensor, context: torch.Tensor,
               lengths: torch.Tensor, eager: bool) -> torch.Tensor:
    """``[B, L, D]`` tokens with ``lengths``, ``context`` ``[B, query_dim]`` -> ``[B, D]``."""
    if not eager:
        return layer(x, context, lengths)
    q = layer.query_proj(context[:, None]).unflatten(-1, (layer.num_heads, layer.dim // layer.num_heads))
    return attention_pool_ref(x, q, lengths)[0][:, 0]


def norm_concat(layer: NormConcat, xs: Sequence[torch.Tensor], eager: bool) -> torch.Tensor:
    if not eager:
        return layer(xs)
    ws = [n.weight for n in layer.norms] if layer.elementwise_affine else [None] * len(xs)
    bs = [n.bias for n in layer.norms] if layer.elementwise_affine else [None] * len(xs)
    return norm_concat_ref(xs, ws, bs, layer.norm == "rmsnorm", layer.eps)


def concat_linear(layer: ConcatLinear, xs: Sequence[torch.Tensor], eager: bool) -> torch.Tensor:
    if not eager:
        return layer(xs)
    return concat_linear_ref(xs, layer.weight, layer.bias, layer.activation)


def gated_fusion(layer: GatedFusion, xs: Sequence[torch.Tensor], modality_mask: Optional[torch.Tensor],
                 eager: bool) -> torch.Tensor:
    if not eager:
        return layer(xs, modality_mask)
    biases = [p.bias for p in layer.proj] if layer.proj[0].bias is not None else None
    return gated_fusion_ref(xs, [p.weight for p in layer.proj], biases, layer.gate.weight, layer.gate.bias,
                            modality_mask, layer.gate_kind)


def tensor_fusion(layer: TensorFusion, xs: Sequence[torch.Tensor], eager: bool) -> torch.Tensor:
    if not eager:
        return layer(xs)
    return tensor_fusion_ref(xs, layer.weight, layer.bias)


def low_rank_fusion(layer: LowRankFusion, xs: Sequence[torch.Tensor], eager: bool) -> torch.Tensor:
    if not eager:
        return layer(xs)
    return low_rank_fusion_ref(xs, list(layer.factors), layer.rank_weights, layer.bias)
