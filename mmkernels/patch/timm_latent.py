"""timm ``AttentionPoolLatent`` (the ``global_pool='map'`` head of SigLIP / SigLIP2 / PE / NaFlex
ViTs; open_clip's timm-based SigLIP towers hold the same module). Attributes are detected, not
versions: ``q`` may be a Linear or Identity (``q_proj=False``) or absent, ``pos_embed`` may be
None, ``mlp`` None (``out_features=0``), ``attn_mask`` may or may not be an argument.

Masks: one key-padding mask for every head and latent (``[B, 1, 1 or latent_len (stride 0), N]``,
NaFlex's form), boolean or additive, becomes latent_pool's bias; any other mask runs the original
forward. A row masked everywhere gives what the original gives: with ``finfo.min`` masks the
uniform average, with -inf / boolean masks zeros under ``fused_attn`` (PyTorch's SDPA) and NaN
without (its explicit softmax)."""
from __future__ import annotations

import torch
from torch import nn

from ._absorb import absorbed_heads, dead_rows, key_padding_bias
from ._core import first, identity_like, linear_why_not, options_of, original_forward

NAME = "timm_latent"


def matches(m) -> bool:
    return type(m).__name__ == "AttentionPoolLatent" and hasattr(m, "latent") and hasattr(m, "kv")


def why_not(m):
    if not identity_like(getattr(m, "q_norm", None)) or not identity_like(getattr(m, "k_norm", None)):
        return "qk_norm/k_norm: a norm on the projected keys does not absorb into the query"
    q = getattr(m, "q", None)
    reason = first(linear_why_not("kv", m.kv), None if identity_like(q) else linear_why_not("q", q))
    if reason:
        return reason
    H, hd = getattr(m, "num_heads", 0), getattr(m, "head_dim", 0)
    E = H * hd
    if E == 0 or m.kv.out_features != 2 * E:
        return f"shapes contradict the type: kv.out_features {m.kv.out_features} != 2 * num_heads * head_dim ({2 * E})"
    if m.kv.in_features != E:
        return f"shapes contradict the type: kv.in_features {m.kv.in_features} != embed_dim {E}"
    lat = m.latent
    if lat.dim() != 3 or lat.shape[0] != 1:
        return f"latent of shape {tuple(lat.shape)}, expected [1, latent_len, latent_dim]"
    width = q.out_features if isinstance(q, nn.Linear) else lat.shape[-1]
    if width != E or (isinstance(q, nn.Linear) and q.in_features != lat.shape[-1]):
        return f"shapes contradict the type: query width {width} != embed_dim {E}"
    pe = getattr(m, "pos_embed", None)
    if pe is not None and (pe.dim() != 2 or pe.shape[-1] != E):
        return f"pos_embed of shape {tuple(pe.shape)}, expected [feat_size, {E}]"
    return None


def forward(self, x, attn_mask=None):
    B, N, C = x.shape
    pe = getattr(self, "pos_embed", None)
    bias = None
    fused = getattr(self, "fused_attn", True)
    if attn_mask is not None and (fused or attn_mask.dtype != torch.bool):  # unfused: scores + a bool mask
        bias = key_padding_bias(attn_mask, B, N, x.dtype)
    if (attn_mask is not None and bias is None) or C != self.kv.in_features or (pe is not None and pe.shape[0] != N):
        return original_forward(self)(x, attn_mask) if attn_mask is not None else original_forward(self)(x)
    H, hd = self.num_heads, self.head_dim
    E = H * hd
    q = getattr(self, "q", None)
    lat = self.latent
    q = (lat if identity_like(q) else q(lat)).reshape(1, lat.shape[1], H, hd)
    w, b = self.kv.weight, self.kv.bias
    o = absorbed_heads(x, q, w[:E], None if b is None else b[:E], w[E:], None if b is None else b[E:],
                       scale=hd ** -0.5, bias=bias, pos=None if pe is None else pe.to(x.dtype),
                       backend=options_of(self)["backend"])
    o = dead_rows(o, bias, 0.0 if fused else float("nan"))
    x = self.proj(o)
    x = self.proj_drop(x)
    if getattr(self, "mlp", None) is not None:
        x = x + self.mlp(self.norm(x))
    pool = getattr(self, "pool", "token")
    if pool == "token":
        x = x.squeeze(1) if x.shape[1] == 1 else x[:, 0]   # one latent: a view whose backward copies nothing
    elif pool == "avg":
        x = x.mean(1)
    return x
