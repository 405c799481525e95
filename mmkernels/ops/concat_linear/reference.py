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


_aten = torch.ops.aten
# d act / d z times dy, from the saved output (relu, tanh, sigmoid) or pre-activation (the others):
# the very kernels autograd runs for these activations
_ACT_GRADS = {
    None: lambda dy, y, z: dy,
    "relu": lambda dy, y, z: _aten.threshold_backward(dy, y, 0),
    "tanh": lambda dy, y, z: _aten.tanh_backward(dy, y),
    "sigmoid": lambda dy, y, z: _aten.sigmoid_backward(dy, y),
    "gelu": lambda dy, y, z: _aten.gelu_backward(dy, z, approximate="none"),
    "gelu_tanh": lambda dy, y, z: _aten.gelu_backward(dy, z, approximate="tanh"),
    "silu": lambda dy, y, z: _aten.silu_backward(dy, z),
}


def backward(grad_out, xs, weight, bias, out, z, activation):
    """``(dxs, dweight, dbias or None)`` by the explicit formulas, from the saved output or
    pre-activation (nothing recomputed): ``dz = dy * act'``, ``dx_m = dz @ W[:, seg_m]``,
    ``dW = dzᵀ @ cat(xs)``, ``db = Σ_rows dz``."""
    n = weight.shape[0]
    dy = grad_out.reshape(-1, n)
    needs_z = activation in ("gelu", "gelu_tanh", "silu")     # z is empty otherwise (the forward's contract)
    dz = _ACT_GRADS[activation](dy, out.reshape(-1, n), z.reshape(-1, n) if needs_z else z)
    x2 = [x.reshape(-1, x.shape[-1]) for x in xs]
    dxs, off = [], 0
    for x, xr in zip(xs, x2):
        d = x.shape[-1]
        dxs.append(torch.mm(dz, weight[:, off:off + d]).view(x.shape))
        off += d
    dweight = torch.mm(dz.t(), x2[0] if len(x2) == 1 else torch.cat(x2, dim=1))
    return dxs, dweight, (dz.sum(0) if bias is not None else None)
