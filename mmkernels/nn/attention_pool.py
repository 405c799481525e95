from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.attention_pool import attention_pool, attention_pool_varlen


def _check_heads(dim: int, num_heads: int):
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads!r}")


def _pool(x, query, lengths, key, cu_seqlens, max_seqlen):
    if cu_seqlens is not None:
        if lengths is not None:
            raise ValueError("lengths: give either lengths (padded x) or cu_seqlens (packed x), not both")
        return attention_pool_varlen(x, cu_seqlens, query, key=key, max_seqlen=max_seqlen)
    return attention_pool(x, query, lengths, key=key)


class AttentionPool(nn.Module):
    """Pool a token sequence into ``num_queries`` vectors with learned queries (the pooling head of
    CLIP / SigLIP's MAP / timm's ``AttentionPoolLatent``, without their projections), one fused kernel.

    ``forward(x, lengths=None, *, cu_seqlens=None, max_seqlen=None)``: ``x`` ``[B, L, dim]`` with
    optional ``lengths`` ``[B]``, or packed ``[T, dim]`` with ``cu_seqlens`` ``[B+1]``. Returns
    ``[B, dim]`` when ``num_queries == 1``, else ``[B, num_queries, dim]``. With ``key_proj`` the keys
    are ``nn.Linear(dim, dim)`` of x (the values stay x).
    """

    def __init__(self, dim: int, num_heads: int, num_queries: int = 1, key_proj: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _check_heads(dim, num_heads)
        if not isinstance(num_queries, int) or num_queries < 1:
            raise ValueError(f"num_queries: expected a positive int, got {num_queries!r}")
        self.dim, self.num_heads, self.num_queries = dim, num_heads, num_queries
        self.query = nn.Parameter(torch.empty(num_queries, num_heads, dim // num_heads, device=device, dtype=dtype))
        self.key_proj = nn.Linear(dim, dim, device=device, dtype=dtype) if key_proj else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query, std=self.dim ** -0.5)  # as timm's AttentionPoolLatent

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
        key = self.key_proj(x) if self.key_proj is not None else None
        query = self.query[0] if self.num_queries == 1 else self.query
        return _pool(x, query, lengths, key, cu_seqlens, max_seqlen)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_queries={self.num_queries}, "
                f"key_proj={self.key_proj is not None}")


class CrossModalAttentionPool(nn.Module):
    """A per-sample context (e.g. a text embedding) attends over another modality's tokens (image
    patches, audio frames): ``query = Linear(query_dim, dim)(context)``, then attention pooling.

    ``forward(x, context, lengths=None, *, cu_seqlens=None, max_seqlen=None)``: ``context``
    ``[B, query_dim]`` -> ``[B, dim]``; ``[B, Q, query_dim]`` -> ``[B, Q, dim]``.
    """

    def __init__(self, query_dim: int, dim: int, num_heads: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_heads(dim, num_heads)
        if not isinstance(query_dim, int) or query_dim < 1:
            raise ValueError(f"query_dim: expected a positive int, got {query_dim!r}")
        self.query_dim, self.dim, self.num_heads = query_dim, dim, num_heads
        self.query_proj = nn.Linear(query_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None) -> torch.Tensor:
        if not isinstance(context, torch.Tensor) or context.dim() not in (2, 3) or context.shape[-1] != self.query_dim:
            raise ValueError(f"context: expected [B, {self.query_dim}] or [B, Q, {self.query_dim}], got "
                             f"{tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__}")
        single = context.dim() == 2
        q = self.query_proj(context if not single else context[:, None])
        q = q.unflatten(-1, (self.num_heads, self.dim // self.num_heads))  # [B, Q, H, Dh]
        out = _pool(x, q, lengths, None, cu_seqlens, max_seqlen)
        return out.squeeze(1) if single else out   # a view both ways: its backward copies nothing

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, dim={self.dim}, num_heads={self.num_heads}"
