"""``mmkernels.norm_concat``: per-modality LayerNorm / RMSNorm, then concatenation, in one pass.

How a call travels: :func:`norm_concat` checks its arguments (``ValueError`` naming the argument)
-> ``torch.ops.mmkernels.norm_concat`` (a ``torch.library`` custom op, one node for
``torch.compile``) -> :func:`mmkernels.backend.select` picks reference / triton / cuda -> that
module's ``forward``; autograd calls ``torch.ops.mmkernels.norm_concat_backward``, which runs the
same backend's ``backward``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ... import backend as _backend
from ... import cuda as _ext
from .._util import check_modalities, fresh_outputs
from . import cuda, reference
from . import triton as triton_impl

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}
NORMS = ("layernorm", "rmsnorm")


def _select(requested, xs, weights, biases):
    return _backend.select("norm_concat", IMPLS, requested, xs=xs, weights=weights, biases=biases)


def _expand(present: List[torch.Tensor], mask: List[bool]) -> List[Optional[torch.Tensor]]:
    it = iter(present)
    return [next(it) if h else None for h in mask]


# The registered ops take only the present weights/biases plus a presence mask per modality:
# torch.library's autograd treats a list holding None as one leaf, so no Optional lists here.
@torch.library.custom_op("mmkernels::norm_concat", mutates_args=())
def _norm_concat_op(xs: List[torch.Tensor], weights: List[torch.Tensor], biases: List[torch.Tensor],
                    has_w: List[bool], has_b: List[bool], rms: bool, eps: float, backend: str) -> torch.Tensor:
    ws, bs = _expand(weights, has_w), _expand(biases, has_b)
    _, impl = _select(backend, xs, ws, bs)
    return impl.forward(xs, ws, bs, rms, eps)


@_norm_concat_op.register_fake
def _(xs, weights, biases, has_w, has_b, rms, eps, backend):
    if backend == "cuda" and _ext.loaded():  # the C++ Meta implementation (csrc/ops.cpp)
        return torch.ops.mmkernels.cuda_norm_concat_fwd(xs, _expand(weights, has_w), _expand(biases, has_b), rms, eps)
    return xs[0].new_empty((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs)))


@torch.library.custom_op("mmkernels::norm_concat_backward", mutates_args=())
def _norm_concat_backward_op(grad_out: torch.Tensor, xs: List[torch.Tensor], weights: List[torch.Tensor],
                             biases: List[torch.Tensor], has_w: List[bool], has_b: List[bool], rms: bool,
                             eps: float, backend: str) -> List[torch.Tensor]:
    """Returns the flat list ``dxs + dweights + dbiases`` (present parameters only)."""
    ws, bs = _expand(weights, has_w), _expand(biases, has_b)
    _, impl = _select(backend, xs, ws, bs)
    dxs, dws, dbs = impl.backward(grad_out, xs, ws, bs, rms, eps)
    flat = list(dxs) + [g for g in dws if g is not None] + [g for g in dbs if g is not None]
    return fresh_outputs(flat, [grad_out, *xs, *weights, *biases])


@_norm_concat_backward_op.register_fake
def _(grad_out, xs, weights, biases, has_w, has_b, rms, eps, backend):
    if backend == "cuda" and _ext.loaded():
        return torch.ops.mmkernels.cuda_norm_concat_bwd(grad_out, xs, _expand(weights, has_w), _expand(biases, has_b),
                                                        rms, eps)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in list(xs) + list(weights) + list(biases)]


def _setup_context(ctx, inputs, output):
    xs, weights, biases, has_w, has_b, rms, eps, backend = inputs
    ctx.sizes = (len(xs), len(weights))
    ctx.args = (has_w, has_b, rms, eps, backend)
    ctx.save_for_backward(*xs, *weights, *biases)


def _backward(ctx, grad_out):
    m, nw = ctx.sizes
    saved = list(ctx.saved_tensors)
    xs, weights, biases = saved[:m], saved[m:m + nw], saved[m + nw:]
    flat = _norm_concat_backward_op(grad_out, xs, weights, biases, *ctx.args)
    return list(flat[:m]), list(flat[m:m + nw]), list(flat[m + nw:]), None, None, None, None, None


_norm_concat_op.register_autograd(_backward, setup_context=_setup_context)


# --- public function -----------------------------------------------------------------------------

def _params(name: str, params, xs: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    m = len(xs)
    if params is None:
        return [None] * m
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise ValueError(f"{name}: expected None or a list of {m} tensors (or None entries), got {type(params).__name__}")
    if len(params) != m:
        raise ValueError(f"{name}: expected {m} entries (one per x), got {len(params)}")
    out = []
    for i, (p, x) in enumerate(zip(params, xs)):
        if p is None:
            out.append(None)
            continue
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a tensor or None, got {type(p).__name__}")
        if p.shape != (x.shape[-1],):
            raise ValueError(f"{name}[{i}]: expected shape ({x.shape[-1]},) to match xs[{i}]'s last dim, "
                             f"got {tuple(p.shape)}")
        if p.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name}[{i}]: expected dtype {x.dtype} (as xs) or torch.float32, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name}[{i}]: expected device {x.device} (as xs), got {p.device}")
        out.append(p)
    return out


def check_inputs(xs, weights, biases, norm, eps):
    """Validate the public arguments; return ``(xs, weights, biases, rms)`` as lists. Raises
    ``ValueError`` naming the argument before any kernel runs."""
    xs = check_modalities(xs)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    weights = _params("weights", weights, xs)
    biases = _params("biases", biases, xs)
    rms = norm == "rmsnorm"
    if rms and any(b is not None for b in biases):
        raise ValueError("biases: rmsnorm takes no bias (weight only); pass biases=None")
    return xs, weights, biases, rms


def norm_concat(xs: Sequence[torch.Tensor], weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
                biases: Optional[Sequence[Optional[torch.Tensor]]] = None, norm: str = "layernorm",
                eps: float = 1e-5) -> torch.Tensor:
    """Normalise each ``xs[m]`` (``[..., D_m]``, identical leading dims) over its last dim, scale by
    ``weights[m]`` and shift by ``biases[m]`` (each ``[D_m]`` or None; rmsnorm: weight only), and
    concatenate: returns ``[..., sum(D_m)]`` in the dtype of ``xs``.

    ``norm``: ``"layernorm"`` (mean and variance) or ``"rmsnorm"``. Statistics in fp32. Weights and
    biases may be in the dtype of ``xs`` or in float32. Differentiable in xs, weights and biases.
    """
    xs, weights, biases, rms = check_inputs(xs, weights, biases, norm, eps)
    return _norm_concat_op(xs, [w for w in weights if w is not None], [b for b in biases if b is not None],
                           [w is not None for w in weights], [b is not None for b in biases], rms, float(eps),
                           _backend.get_backend())


def aot_examples():
    """Representative launches for the sm_90 ahead-of-time compile test: ``(label, thunk)`` pairs
    that call the Triton launchers (captured, not run) on CPU tensors."""
    def case(dims, dtype, rms, affine, lead=(64,), wdtype=None):
        xs = [torch.randn(*lead, d, dtype=dtype) for d in dims]
        ws = [torch.ones(d, dtype=wdtype or dtype) for d in dims] if affine else [None] * len(dims)
        bs = [torch.zeros(d, dtype=wdtype or dtype) for d in dims] if (affine and not rms) else [None] * len(dims)
        dy = torch.randn(*lead, sum(dims), dtype=dtype)

        def run():
            triton_impl.forward(xs, ws, bs, rms, 1e-5)
            triton_impl.backward(dy, xs, ws, bs, rms, 1e-5)
        return run

    return [
        ("bf16 ln 768+1024+512 affine", case((768, 1024, 512), torch.bfloat16, False, True)),
        ("fp16 rms 4096+300", case((4096, 300), torch.float16, True, True)),
        ("fp32 ln odd dims, no affine", case((7, 33, 129), torch.float32, False, False)),
        ("bf16 ln 16384, fp32 params (known spill in _norm_concat_bwd_kernel: rows >= 8192)", case((16384,), torch.bfloat16, False, True, wdtype=torch.float32)),
        ("bf16 ln 32768+512 (known spill in _norm_concat_bwd_kernel: rows >= 8192)",
         case((32768, 512), torch.bfloat16, False, True, lead=(8,))),
        ("fp32 rms 65536 (known spill in _norm_concat_fwd_kernel, _norm_concat_bwd_kernel: fp32 rows of 65536)",
         case((65536,), torch.float32, True, True, lead=(4,))),
        ("fp16 ln 8 modalities", case((64,) * 8, torch.float16, False, True)),
    ]
