"""transformers ``Aimv2AttentionPoolingHead``: the learned ``cls_token`` is the query itself (no
query projection), keys and values are ``k_proj`` / ``v_proj``, then ``output_proj``."""
from __future__ import annotations

from ._absorb import absorbed_heads
from ._core import first, linear_why_not, options_of, original_forward

NAME = "aimv2"


def matches(m) -> bool:
    return type(m).__name__ == "Aimv2AttentionPoolingHead" and hasattr(m, "cls_token") and hasattr(m, "k_proj")


def why_not(m):
    reason = first(linear_why_not("k_proj", m.k_proj), linear_why_not("v_proj", m.v_proj))
    if reason:
        return reason
    D, H = m.hidden_size, m.num_heads
    if H < 1 or D % H or m.k_proj.in_features != D or m.k_proj.out_features != D or m.v_proj.out_features != D \
            or m.v_proj.in_features != D:
        return f"shapes contradict the type: k_proj/v_proj are not [{D}, {D}] with {H} heads"
    if tuple(m.cls_token.shape) != (1, 1, D):
        return f"shapes contradict the type: cls_token {tuple(m.cls_token.shape)}, expected (1, 1, {D})"
    return None


def forward(self, hidden_states):
    B, N, D = hidden_states.shape
    if D != self.hidden_size:
        return original_forward(self)(hidden_states)
    H = self.num_heads
    q = self.cls_token.reshape(1, 1, H, D // H)
    o = absorbed_heads(hidden_states, q, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias,
                       scale=(D // H) ** -0.5, backend=options_of(self)["backend"])
    return self.output_proj(o.mean(dim=1))
