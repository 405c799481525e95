"""``mmkernels.concat_linear``: ``act(cat(xs, -1) @ weight.T + bias)`` without building the
concatenation — early fusion of modality features in one GEMM with a fused epilogue.

How a call travels: :func:`concat_linear` checks its arguments (``ValueError`` naming the
argument) -> ``torch.ops.mmkernels.concat_linear`` (returns the output and, for gelu / gelu_tanh /
silu, the pre-activation the backward needs) -> :func:`mmkernels.backend.select` -> that backend's
``forward``; autograd calls ``torch.ops.mmkernels.concat_linear_backward`` on the same backend.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._register import Op
from .._util import autocast_cast, autocasting, check_bias, check_like, check_modalities, linear_params_ok
from . import cuda, reference
from . import triton as triton_impl
from .triton import ACTIVATIONS, NEEDS_Z

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}


def _act(name: str) -> Optional[str]:
    return None if name == "none" else name


def _to_backend(a):
    return dict(a, activation=_act(a["activation"]))


def _fake(xs, weight, bias, activation):
    out = xs[0].new_empty((*xs[0].shape[:-1], weight.shape[0]))
    return out, (torch.empty_like(out) if _act(activation) in NEEDS_Z else out.new_empty((0,)))


def _cpu(xs, weight, bias, activation):
    """The CPU path: the plain composition (cat, F.linear, activation) under autograd; no z."""
    return reference.concat_linear_ref(xs, weight, bias, activation), weight.new_empty(0)


# returns ``(out [..., N], z)``: z is the pre-activation the backward of gelu-like activations
# needs, else empty
OP = Op("concat_linear", "(Tensor[] xs, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)", IMPLS,
        fake=_fake, differentiable=("xs", "weight", "bias"), outputs=("out", "z"), save_outputs=("out", "z"),
        non_differentiable=("z",), to_backend=_to_backend, cpu=_cpu, plain_devices=("cpu", "cuda"))


# --- public function -----------------------------------------------------------------------------

def check_inputs(xs, weight, bias, activation):
    """Validate the public arguments; raises ``ValueError`` naming the argument before any kernel runs.
    Well-formed parameters pass one quick pass (each attribute read once); anything else goes
    through the detailed checks, which name what is wrong."""
    xs, dims = check_modalities(xs)
    x0 = xs[0]
    try:
        if activation in ACTIVATIONS and linear_params_ok(weight, bias, sum(dims), x0):
            return xs
    except (AttributeError, TypeError):
        pass
    k = sum(dims)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight: expected a tensor, got {type(weight).__name__}")
    shape = weight.shape
    if len(shape) != 2 or shape[1] != k or shape[0] < 1:
        raise ValueError(f"weight: expected shape [N, {k}] (N >= 1, {k} = sum of the xs' last dims), "
                         f"got {tuple(shape)}")
    check_like("weight", weight, xs[0])
    check_bias(bias, shape[0], xs[0])
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return xs


def concat_linear(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """``act(torch.cat(xs, -1) @ weight.T + bias)`` in one GEMM that reads each ``xs[m]``
    (``[..., D_m]``, identical leading dims) in place: the concatenation is never built.

    ``weight``: ``[N, sum(D_m)]`` (the ``nn.Linear`` that would follow the ``torch.cat``); ``bias``:
    ``[N]`` or None; ``activation``: None, ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"``,
    ``"silu"``, ``"tanh"`` or ``"sigmoid"``. fp32/fp16/bf16 with fp32 accumulation (fp32 inputs use
    TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is on). Differentiable in xs, weight
    and bias. Inside ``torch.autocast`` the inputs are cast to its dtype, as for ``F.linear``.
    ``backend``: this call's backend (default: :func:`mmkernels.get_backend`).
    """
    if autocasting() and isinstance(xs, (list, tuple)) and xs:
        xs, weight, bias = autocast_cast([list(xs), weight, bias], xs[0])
    xs = check_inputs(xs, weight, bias, activation)
    if OP.cpu_path(xs[0], backend):
        return reference.concat_linear_ref(xs, weight, bias, activation)
    out, _ = OP(xs, weight, bias, activation or "none", backend=backend)
    return out


def aot_examples():
    """Representative launches for the sm_90 ahead-of-time compile test."""
    def case(dims, n, act, dtype, rows=256, bias=True):
        xs = [torch.randn(rows, d, dtype=dtype) for d in dims]
        w = torch.randn(n, sum(dims), dtype=dtype)
        b = torch.randn(n, dtype=dtype) if bias else None
        dy = torch.randn(rows, n, dtype=dtype)

        def run():
            out, z = triton_impl.forward(xs, w, b, act)
            triton_impl.backward(dy, xs, w, b, out, z, act)
        return run

    return [
        ("bf16 768+1024+512->1024 gelu", case((768, 1024, 512), 1024, "gelu", torch.bfloat16, rows=4096)),
        ("fp16 4096+300->512 tanh", case((4096, 300), 512, "tanh", torch.float16)),
        ("bf16 3x768->10 head", case((768,) * 3, 10, None, torch.bfloat16, rows=8192)),
        ("fp32 odd 7+33->5 silu", case((7, 33), 5, "silu", torch.float32, bias=False)),
        ("bf16 64+64->96 relu / sigmoid / gelu_tanh", lambda: [case((64, 64), 96, a, torch.bfloat16)()
                                                                for a in ("relu", "sigmoid", "gelu_tanh")]),
    ]
