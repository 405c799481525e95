"""``mmkernels.concat_linear``: ``act(cat(xs, -1) @ weight.T + bias)`` without building the
concatenation — early fusion of modality features in one GEMM with a fused epilogue.

How a call travels: :func:`concat_linear` checks its arguments (``ValueError`` naming the
argument) -> ``torch.ops.mmkernels.concat_linear`` (returns the output and, for gelu / gelu_tanh /
silu, the pre-activation the backward needs) -> :func:`mmkernels.backend.select` -> that backend's
``forward``; autograd calls ``torch.ops.mmkernels.concat_linear_backward`` on the same backend.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import backend as _backend
from .._util import autocast_cast, check_modalities, fresh_outputs
from . import cuda, reference
from . import triton as triton_impl
from .triton import ACTIVATIONS, NEEDS_Z

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}


def _select(requested, xs, weight):
    return _backend.select("concat_linear", IMPLS, requested, xs=xs, weight=weight)


def _act(name: str) -> Optional[str]:
    return None if name == "none" else name


@torch.library.custom_op("mmkernels::concat_linear", mutates_args=())
def _concat_linear_op(xs: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                      activation: str, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [..., N], z)``: z is the pre-activation for gelu-like activations, else empty."""
    _, impl = _select(backend, xs, weight)
    out, z = impl.forward(xs, weight, bias, _act(activation))
    out, z = fresh_outputs([out, z], [*xs, weight, bias])
    return out, z


@_concat_linear_op.register_fake
def _(xs, weight, bias, activation, backend):
    out = xs[0].new_empty((*xs[0].shape[:-1], weight.shape[0]))
    return out, (torch.empty_like(out) if _act(activation) in NEEDS_Z else out.new_empty((0,)))


@torch.library.custom_op("mmkernels::concat_linear_backward", mutates_args=())
def _concat_linear_backward_op(grad_out: torch.Tensor, xs: List[torch.Tensor], weight: torch.Tensor,
                               bias: Optional[torch.Tensor], out: torch.Tensor, z: torch.Tensor, activation: str,
                               backend: str) -> List[torch.Tensor]:
    """Returns ``dxs + [dweight]`` plus ``[dbias]`` when there is a bias."""
    _, impl = _select(backend, xs, weight)
    dxs, dw, db = impl.backward(grad_out, xs, weight, bias, out, z, _act(activation))
    return fresh_outputs(list(dxs) + [dw] + ([] if bias is None else [db]), [grad_out, *xs, weight, bias, out, z])


@_concat_linear_backward_op.register_fake
def _(grad_out, xs, weight, bias, out, z, activation, backend):
    like = list(xs) + [weight] + ([] if bias is None else [bias])
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]


def _setup_context(ctx, inputs, output):
    xs, weight, bias, activation, backend = inputs
    out, z = output
    ctx.mark_non_differentiable(z)
    ctx.m = len(xs)
    ctx.has_bias = bias is not None
    ctx.args = (activation, backend)
    ctx.save_for_backward(*xs, weight, bias, out, z)


def _backward(ctx, grad_out, _grad_z):
    saved = list(ctx.saved_tensors)
    m = ctx.m
    xs, (weight, bias, out, z) = saved[:m], saved[m:]
    grads = _concat_linear_backward_op(grad_out, xs, weight, bias, out, z, *ctx.args)
    return list(grads[:m]), grads[m], (grads[m + 1] if ctx.has_bias else None), None, None


_concat_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --- public function -----------------------------------------------------------------------------

def check_inputs(xs, weight, bias, activation):
    """Validate the public arguments; raises ``ValueError`` naming the argument before any kernel runs."""
    xs = check_modalities(xs)
    k = sum(x.shape[-1] for x in xs)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight: expected a tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape [N, {k}] (N >= 1, {k} = sum of the xs' last dims), "
                         f"got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor or None, got {type(t).__name__}")
        if t.dtype != xs[0].dtype:
            raise ValueError(f"{name}: expected dtype {xs[0].dtype} (as xs), got {t.dtype}")
        if t.device != xs[0].device:
            raise ValueError(f"{name}: expected device {xs[0].device} (as xs), got {t.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) (weight's rows), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return xs


def concat_linear(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None) -> torch.Tensor:
    """``act(torch.cat(xs, -1) @ weight.T + bias)`` in one GEMM that reads each ``xs[m]``
    (``[..., D_m]``, identical leading dims) in place: the concatenation is never built.

    ``weight``: ``[N, sum(D_m)]`` (the ``nn.Linear`` that would follow the ``torch.cat``); ``bias``:
    ``[N]`` or None; ``activation``: None, ``"relu"``, ``"gelu"`` (erf), ``"gelu_tanh"``,
    ``"silu"``, ``"tanh"`` or ``"sigmoid"``. fp32/fp16/bf16 with fp32 accumulation (fp32 inputs use
    TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is on). Differentiable in xs, weight
    and bias. Inside ``torch.autocast`` the inputs are cast to its dtype, as for ``F.linear``.
    """
    if isinstance(xs, (list, tuple)) and xs:
        xs, weight, bias = autocast_cast([list(xs), weight, bias], xs[0])
    xs = check_inputs(xs, weight, bias, activation)
    out, _ = _concat_linear_op(xs, weight, bias, activation or "none", _backend.get_backend())
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
