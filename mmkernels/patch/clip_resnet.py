"""CLIP's ResNet ``AttentionPool2d``: openai's layout (as in open_clip ``modified_resnet``:
``positional_embedding``, ``q_proj``/``k_proj``/``v_proj``/``c_proj``) and timm's (``resnet*_clip``:
``pos_embed``, ``qkv`` or ``q``/``k``/``v``, ``proj``, optional ``cls_token``). Both prepend the mean
(or class) token to the ``H x W`` feature map, add a positional embedding, run full self-attention
over all ``H W + 1`` tokens and keep token 0: only the query row is computed here, with the
per-sample query of the mean token. timm's ``RotAttentionPool2d`` (rotary embedding on the keys)
is refused."""
from __future__ import annotations

import torch
from torch import nn

from ._absorb import absorbed_heads
from ._core import first, linear_why_not, options_of, original_forward

NAME = "clip_resnet"


def _openai(m) -> bool:
    return all(hasattr(m, a) for a in ("positional_embedding", "q_proj", "k_proj", "v_proj", "c_proj", "num_heads"))


def _timm(m) -> bool:
    return all(hasattr(m, a) for a in ("pos_embed", "proj", "num_heads", "head_dim")) and hasattr(m, "qkv")


def matches(m) -> bool:
    n = type(m).__name__
    return (n == "AttentionPool2d" and (_openai(m) or _timm(m))) or n == "RotAttentionPool2d"


def why_not(m):
    if type(m).__name__ == "RotAttentionPool2d":
        return "rotary position embedding on keys"
    if _openai(m):
        reason = first(*(linear_why_not(n, getattr(m, n)) for n in ("q_proj", "k_proj", "v_proj")))
        if reason:
            return reason
        E, C = m.k_proj.out_features, m.k_proj.in_features
        if E != C or m.q_proj.weight.shape != (E, C) or m.v_proj.weight.shape != (E, C) or E % m.num_heads:
            return f"shapes contradict the type: q/k/v_proj must be [{C}, {C}] (embed_dim) with heads dividing it"
        if m.positional_embedding.dim() != 2 or m.positional_embedding.shape[1] != C:
            return f"positional_embedding of shape {tuple(m.positional_embedding.shape)}, expected [HW + 1, {C}]"
        return None
    if getattr(m, "pool_type", "token") != "token":
        return f"pool_type {m.pool_type!r} returns every token's output, not only the query row"
    if m.qkv is None:
        reason = first(*(linear_why_not(n, getattr(m, n)) for n in ("q", "k", "v")))
        lin = m.k
    else:
        reason = linear_why_not("qkv", m.qkv)
        lin = m.qkv
    if reason:
        return reason
    E = m.num_heads * m.head_dim
    if lin.in_features != m.in_features or lin.out_features != (E if m.qkv is None else 3 * E):
        return f"shapes contradict the type: projections are not [{m.in_features} -> {E}] per q/k/v"
    drop = getattr(m, "drop", None)
    if isinstance(drop, nn.Dropout) and drop.p > 0 and m.training:
        return "attention dropout active in training"
    return None


def _qkv(m):
    E = m.num_heads * m.head_dim
    if m.qkv is None:
        return (m.q.weight, m.k.weight, m.v.weight, m.q.bias, m.k.bias, m.v.bias)
    w, b = m.qkv.weight, m.qkv.bias
    return (w[:E], w[E:2 * E], w[2 * E:]) + ((None,) * 3 if b is None else (b[:E], b[E:2 * E], b[2 * E:]))


def forward_openai(self, x):
    B, C, Hs, Ws = x.shape
    pos = self.positional_embedding
    if pos.shape[0] != Hs * Ws + 1 or C != self.k_proj.in_features:
        return original_forward(self)(x)
    t = x.reshape(B, C, Hs * Ws).transpose(1, 2)                         # [B, HW, C]
    tokens = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)           # [B, HW + 1, C]
    pos = pos.to(x.dtype)
    H = self.num_heads
    hd = C // H
    q = self.q_proj(tokens[:, 0] + pos[0]).reshape(B, 1, H, hd)
    o = absorbed_heads(tokens, q, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias,
                       scale=hd ** -0.5, pos=pos, backend=options_of(self)["backend"])
    return self.c_proj(o[:, 0])


def forward_timm(self, x, pre_logits: bool = False):
    from timm.layers import resample_abs_pos_embed
    drop = getattr(self, "drop", None)
    if self.training and isinstance(drop, nn.Dropout) and drop.p > 0:
        return original_forward(self)(x, pre_logits=pre_logits)
    B, _, Hs, Ws = x.shape
    t = x.flatten(2).transpose(1, 2)
    first_tok = t.mean(1, keepdim=True) if self.cls_token is None else self.cls_token.expand(B, -1, -1)
    tokens = torch.cat([first_tok, t], dim=1)
    pos = resample_abs_pos_embed(self.pos_embed.unsqueeze(0), (Hs, Ws), old_size=self.feat_size,
                                 num_prefix_tokens=1)[0]
    # the original adds pos_embed in the promoted dtype of x and the parameter
    dt = torch.promote_types(tokens.dtype, pos.dtype)
    tokens, pos = tokens.to(dt), pos.to(dt)
    H, hd = self.num_heads, self.head_dim
    wq, wk, wv, bq, bk, bv = _qkv(self)
    q = torch.nn.functional.linear(tokens[:, 0] + pos[0], wq, bq).reshape(B, 1, H, hd)
    o = absorbed_heads(tokens, q, wk, bk, wv, bv, scale=hd ** -0.5, pos=pos, backend=options_of(self)["backend"])
    o = o[:, 0]
    if drop is not None:
        o = drop(o)
    if pre_logits:
        return o
    return self.proj(o)


def forward(self, *args, **kwargs):
    return (forward_openai if _openai(self) else forward_timm)(self, *args, **kwargs)
