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

from ... import candidates
from .._register import Op
from .._util import check_modalities
from . import cuda, reference
from .cpu import norm_concat_cpu
from . import triton as triton_impl

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}
NORMS = ("layernorm", "rmsnorm")


def _expand(present: List[torch.Tensor], mask: List[bool]) -> List[Optional[torch.Tensor]]:
    it = iter(present)
    return [next(it) if h else None for h in mask]


def _to_backend(a):
    """The backends take weights/biases as lists with None for absent parameters."""
    return dict(xs=a["xs"], weights=_expand(a["weights"], a["has_w"]), biases=_expand(a["biases"], a["has_b"]),
                rms=a["rms"], eps=a["eps"])


def _fake(xs, weights, biases, has_w, has_b, rms, eps):
    return xs[0].new_empty((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs)))


def _cpu(xs, weights, biases, rms, eps):
    return norm_concat_cpu(xs, [x.shape[-1] for x in xs], weights, biases, rms, eps)


# The registered op takes only the present weights/biases plus a presence mask per modality:
# torch.library's autograd treats a list holding None as one leaf, so no Optional lists here.
OP = Op("norm_concat", "(Tensor[] xs, Tensor[] weights, Tensor[] biases, bool[] has_w, bool[] has_b, bool rms, "
        "float eps) -> Tensor", IMPLS, fake=_fake, differentiable=("xs", "weights", "biases"),
        to_backend=_to_backend, cpu=_cpu)


# --- public function -----------------------------------------------------------------------------

def _params(name: str, params, xs: Sequence[torch.Tensor], dims: Sequence[int]) -> List[Optional[torch.Tensor]]:
    m = len(xs)
    if params is None:
        return [None] * m
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise ValueError(f"{name}: expected None or a list of {m} tensors (or None entries), got {type(params).__name__}")
    if len(params) != m:
        raise ValueError(f"{name}: expected {m} entries (one per x), got {len(params)}")
    x0 = xs[0]
    dtype, device = x0.dtype, x0.device
    for i, p in enumerate(params):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a tensor or None, got {type(p).__name__}")
        if p.shape != (dims[i],):
            raise ValueError(f"{name}[{i}]: expected shape ({dims[i]},) to match xs[{i}]'s last dim, "
                             f"got {tuple(p.shape)}")
        if p.dtype is not dtype and p.dtype is not torch.float32:
            raise ValueError(f"{name}[{i}]: expected dtype {dtype} (as xs) or torch.float32, got {p.dtype}")
        if p.device != device:
            raise ValueError(f"{name}[{i}]: expected device {device} (as xs), got {p.device}")
    return params if type(params) is list else list(params)


def check_inputs(xs, weights, biases, norm, eps):
    """Validate the public arguments; return ``(xs, their widths, weights, biases, rms)``. Raises
    ``ValueError`` naming the argument before any kernel runs."""
    xs, dims = check_modalities(xs)
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    weights = _params("weights", weights, xs, dims)
    biases = _params("biases", biases, xs, dims)
    rms = norm == "rmsnorm"
    if rms and any(b is not None for b in biases):
        raise ValueError("biases: rmsnorm takes no bias (weight only); pass biases=None")
    return xs, dims, weights, biases, rms


def norm_concat(xs: Sequence[torch.Tensor], weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
                biases: Optional[Sequence[Optional[torch.Tensor]]] = None, norm: str = "layernorm",
                eps: float = 1e-5, *, backend: Optional[str] = None) -> torch.Tensor:
    """Normalise each ``xs[m]`` (``[..., D_m]``, identical leading dims) over its last dim, scale by
    ``weights[m]`` and shift by ``biases[m]`` (each ``[D_m]`` or None; rmsnorm: weight only), and
    concatenate: returns ``[..., sum(D_m)]`` in the dtype of ``xs``.

    ``norm``: ``"layernorm"`` (mean and variance) or ``"rmsnorm"``. Statistics in fp32. Weights and
    biases may be in the dtype of ``xs`` or in float32. Differentiable in xs, weights and biases.
    ``backend``: this call's backend (default: :func:`mmkernels.get_backend`).
    """
    xs, dims, weights, biases, rms = check_inputs(xs, weights, biases, norm, eps)
    if OP.cpu_path(xs[0], backend):
        return norm_concat_cpu(xs, dims, weights, biases, rms, float(eps))
    return OP(xs, [w for w in weights if w is not None], [b for b in biases if b is not None],
              [w is not None for w in weights], [b is not None for b in biases], rms, float(eps), backend=backend)


def aot_examples():
    """Representative launches for the ahead-of-time compile test (every GPU target): ``(label,
    thunk)`` pairs that call the Triton launchers (captured, not run) on CPU tensors."""
    def case(dims, dtype, rms, affine, lead=(64,), wdtype=None):
        xs = [torch.randn(*lead, d, dtype=dtype) for d in dims]
        ws = [torch.ones(d, dtype=wdtype or dtype) for d in dims] if affine else [None] * len(dims)
        bs = [torch.zeros(d, dtype=wdtype or dtype) for d in dims] if (affine and not rms) else [None] * len(dims)
        dy = torch.randn(*lead, sum(dims), dtype=dtype)

        def run():
            triton_impl.forward(xs, ws, bs, rms, 1e-5)
            for name in candidates.SLOTS[triton_impl.BWD_SLOT]:    # every backward candidate
                with candidates.use(triton_impl.BWD_SLOT, name):
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
