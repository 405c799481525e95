"""concat_linear in plain PyTorch: the specification (``act(cat(xs) @ W.T + b)``), the CPU backend,
and the eager/compile baselines of the benchmark."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...backend import Capabilities

ACT_FNS = {
    None: lambda z: z,
    "relu": F.relu,
    "gelu": F.gelu,                                        # exact erf form
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def concat_linear_ref(xs, weight, bias, activation):
    """The composition users write today: ``torch.cat`` then ``F.linear`` then the activation."""
    z = F.linear(torch.cat(xs, dim=-1), weight, bias)
    return z if activation is None else ACT_FNS[activation](z)


# --- backend interface -------------------------------------------------------------------------

CAPABILITIES = Capabilities()  # any device, every floating dtype (float64 too)


def why_not(explicit: bool, **_) -> Optional[str]:
    return None  # any device, any floating dtype


def forward(xs, weight, bias, activation):
    """``(out, z)``: z, the pre-activation, only for the activations whose derivative needs it
    (the op's contract with every backend); an empty tensor otherwise."""
    z = F.linear(torch.cat(list(xs), dim=-1), weight, bias)
    return ACT_FNS[activation](z), (z if activation in ("gelu", "gelu_tanh", "silu") else z.new_empty((0,)))


def backward(grad_out, xs, weight, bias, out, z, activation):
    """Gradients by ``torch.func.vjp`` of the composition: ``(dxs, dweight, dbias or None)``."""
    def f(xs_, w_, *b_):
        return concat_linear_ref(xs_, w_, b_[0] if b_ else None, activation)

    primals = (list(xs), weight) + (() if bias is None else (bias,))
    _, vjp = torch.func.vjp(f, *primals)
    grads = vjp(grad_out)
    return list(grads[0]), grads[1], (grads[2] if bias is not None else None)
