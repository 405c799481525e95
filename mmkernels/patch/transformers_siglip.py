"""transformers ``SiglipMultiheadAttentionPoolingHead`` and ``Siglip2MultiheadAttentionPoolingHead``:
a learned ``probe`` attending through ``nn.MultiheadAttention`` (batch first), then LayerNorm + MLP
with a residual. SigLIP2's ``attention_mask`` ``[B, N]`` (1 keeps a token) goes through the same transformers mask
function as in the original and becomes its ``finfo(dtype).min`` additive bias, so an all-padding
row averages uniformly as it does there."""
from __future__ import annotations

import torch
from torch import nn

from ._absorb import absorbed_heads, key_padding_bias
from ._core import first, hooks_why_not, linear_why_not, options_of, original_forward

NAME = "transformers_siglip"
CLASSES = ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead")


def matches(m) -> bool:
    return type(m).__name__ in CLASSES and hasattr(m, "probe") and hasattr(m, "attention")


def mha_why_not(a, name="attention"):
    """What an ``nn.MultiheadAttention`` must be for the absorbed form."""
    if type(a) is not nn.MultiheadAttention:
        if type(a).__module__.startswith("peft") or hasattr(a, "base_layer"):
            return f"LoRA/PEFT-wrapped projections ({name})"
        return f"{name} is {type(a).__name__}, not nn.MultiheadAttention (unrecognised)"
    if a.bias_k is not None or a.bias_v is not None:
        return "add_bias_kv: the learned extra key/value token is not supported"
    if a.add_zero_attn:
        return "add_zero_attn is not supported"
    if a.dropout > 0 and a.training:
        return "attention dropout active in training"
    if not a.batch_first:
        return f"{name}: expected batch_first=True (as transformers builds it)"
    if a.head_dim * a.num_heads != a.embed_dim:
        return f"shapes contradict the type: num_heads * head_dim != embed_dim {a.embed_dim}"
    return first(hooks_why_not(name, a), linear_why_not(f"{name}.out_proj", a.out_proj))


def mha_weights(a):
    """(Wq, Wk, Wv, bq, bk, bv) of an nn.MultiheadAttention, packed or separate."""
    E = a.embed_dim
    if a.in_proj_weight is not None:
        wq, wk, wv = a.in_proj_weight[:E], a.in_proj_weight[E:2 * E], a.in_proj_weight[2 * E:]
    else:
        wq, wk, wv = a.q_proj_weight, a.k_proj_weight, a.v_proj_weight
    b = a.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
    return wq, wk, wv, bq, bk, bv


def why_not(m):
    a = m.attention
    reason = mha_why_not(a)
    if reason:
        return reason
    if m.probe.dim() != 3 or m.probe.shape[0] != 1 or m.probe.shape[-1] != a.embed_dim:
        return f"shapes contradict the type: probe {tuple(m.probe.shape)} vs embed_dim {a.embed_dim}"
    return None


def _mask_bias(self, hidden_state, attention_mask):
    """The additive ``[B, N]`` bias the original builds from ``attention_mask``, through the same
    transformers function its forward calls (``create_bidirectional_mask``, or the older
    ``_prepare_4d_attention_mask``); a boolean result becomes 0 / finfo.min as the original makes
    it. None: no mask (transformers may drop an all-ones mask); False: a form not handled."""
    B, N, _ = hidden_state.shape
    dt = self.probe.dtype
    g = type(self).forward.__globals__
    if "create_bidirectional_mask" in g:
        probe = self.probe.expand(B, -1, -1)
        m = g["create_bidirectional_mask"](config=self.config, inputs_embeds=probe, attention_mask=attention_mask,
                                           encoder_hidden_states=hidden_state)
    elif "_prepare_4d_attention_mask" in g:
        m = g["_prepare_4d_attention_mask"](attention_mask, hidden_state.dtype)
    else:
        return False
    if m is None:
        return None
    if m.dtype == torch.bool:
        m = torch.where(m, torch.zeros((), dtype=dt, device=m.device),
                        torch.full((), torch.finfo(dt).min, dtype=dt, device=m.device))
    bias = key_padding_bias(m, B, N, dt)
    return False if bias is None else bias


def forward(self, hidden_state, attention_mask=None):
    a = self.attention
    B, N, C = hidden_state.shape
    bias = None
    original = original_forward(self)
    if (a.dropout > 0 and a.training) or C != a.kdim:
        return original(hidden_state) if attention_mask is None else original(hidden_state, attention_mask)
    if attention_mask is not None:
        bias = _mask_bias(self, hidden_state, attention_mask)
        if bias is False:
            return original(hidden_state, attention_mask)
    wq, wk, wv, bq, bk, bv = mha_weights(a)
    H, hd = a.num_heads, a.head_dim
    q = torch.nn.functional.linear(self.probe, wq, bq).reshape(1, self.probe.shape[1], H, hd)
    o = absorbed_heads(hidden_state, q, wk, bk, wv, bv, scale=hd ** -0.5, bias=bias,
                       backend=options_of(self)["backend"])
    hidden_state = a.out_proj(o)
    residual = hidden_state
    hidden_state = self.layernorm(hidden_state)
    hidden_state = residual + self.mlp(hidden_state)
    return hidden_state.squeeze(1) if hidden_state.shape[1] == 1 else hidden_state[:, 0]   # one probe: a view whose backward copies nothing
