"""The gated-fusion layer (:class:`mmkernels.nn.GatedFusion`): :func:`gated_fusion` = its GEMMs,
then :func:`mmkernels.gated_sum`.

``fusion_projections``: the GEMMs of a gated-fusion layer in one registered op —
M per-modality projections ``x_m W_m^T + b_m`` (all to width H) stacked into ``h_pre [..., M, H]``,
and the gate logits ``z = cat(xs) W_z^T + b_z`` (``[..., G]``) — the first step of
:class:`mmkernels.nn.GatedFusion`.

One op rather than two because the xs feed both: its backward sums each x_m's two gradients
inside the GEMMs instead of by autograd's extra pass over dx. Registered as
``torch.ops.mmkernels.fusion_projections`` (and ``_backward``) so ``torch.compile`` sees one node.
Backends: ``reference`` (``torch.stack`` of ``F.linear``; ``torch.cat`` + ``F.linear``),
``triton`` (:mod:`.gemms`, named for what it runs: vendor GEMMs (cuBLAS) into place for h_pre,
concat_linear's Triton GEMM for z) and ``cuda`` (none: :mod:`.cuda` says why).
It is not in :data:`mmkernels.ops.OPS`: its own code launches no Triton kernel (the gate GEMM is
concat_linear's, compiled and benchmarked there; the layer is benchmarked as ``gated_fusion``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import candidates
from ...backend import get_backend
from .._register import Op, _tracing
from .._util import autocast_cast, autocasting, check_modalities, linear_params_ok
from ..gated_sum import OP as GATED_SUM
from ..gated_sum.cpu import gated_sum_cpu
from . import cuda, fused, gemms, reference

IMPLS = {"reference": reference, "triton": gemms, "cuda": cuda}
GATES = ("feature", "modality")


def _fake(xs, proj_weights, proj_biases, gate_weight, gate_bias):
    lead = xs[0].shape[:-1]
    return (xs[0].new_empty((*lead, len(xs), proj_weights[0].shape[0])),
            xs[0].new_empty((*lead, gate_weight.shape[0])))


OP = Op("fusion_projections", "(Tensor[] xs, Tensor[] proj_weights, Tensor[] proj_biases, Tensor gate_weight, "
        "Tensor? gate_bias) -> (Tensor, Tensor)", IMPLS, fake=_fake,
        differentiable=("xs", "proj_weights", "proj_biases", "gate_weight", "gate_bias"), outputs=("h_pre", "z"),
        cpu=reference.fusion_projections_ref)


def _same(name, t, shape, dtype, device):
    """A parameter of ``shape`` (a tuple) in the xs' dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype is not dtype:
        raise ValueError(f"{name}: expected dtype {dtype} (as xs), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (as xs), got {t.device}")


def _well_formed(xs, dims, proj_weights, proj_biases, gate_weight, gate_bias) -> bool:
    """Whether the parameters are well-formed, in as few tensor accesses as possible (this runs on
    every call; a torch dtype below is a tensor's); anything else goes through
    :func:`check_inputs`' detailed checks."""
    m = len(xs)
    if type(proj_weights) not in (list, tuple) or len(proj_weights) != m:
        return False
    if proj_biases is not None and (type(proj_biases) not in (list, tuple) or len(proj_biases) != m):
        return False
    x0 = xs[0]
    dtype, device = x0.dtype, x0.device
    h = proj_weights[0].shape[0]
    for i in range(m):
        w = proj_weights[i]
        ws = w.shape
        if not (w.dtype is dtype and len(ws) == 2 and ws[0] == h and ws[1] == dims[i] and w.device == device):
            return False
        if proj_biases is not None:
            b = proj_biases[i]
            if not (b.dtype is dtype and b.shape == (h,) and b.device == device):
                return False
    return h >= 1 and linear_params_ok(gate_weight, gate_bias, sum(dims), x0)


def check_inputs(xs, proj_weights, proj_biases, gate_weight, gate_bias) -> List[torch.Tensor]:
    """``ValueError`` naming the argument before any kernel runs; returns xs as a list."""
    xs, dims = check_modalities(xs)
    try:
        if _well_formed(xs, dims, proj_weights, proj_biases, gate_weight, gate_bias):
            return xs
    except (AttributeError, IndexError, TypeError):
        pass
    m, k = len(xs), sum(dims)
    for name, ts in (("proj_weights", proj_weights), ("proj_biases", proj_biases)):
        if ts is not None and (isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)) or len(ts) != m):
            raise ValueError(f"{name}: expected a list of {m} tensors (one per x)")
    if proj_weights is None:
        raise ValueError(f"proj_weights: expected a list of {m} tensors (one per x), got None")
    w0 = proj_weights[0]
    if not isinstance(w0, torch.Tensor) or w0.dim() != 2 or w0.shape[0] < 1:
        raise ValueError(f"proj_weights[0]: expected a tensor [H, {dims[0]}] with H >= 1, got "
                         f"{tuple(w0.shape) if isinstance(w0, torch.Tensor) else type(w0).__name__}")
    h = w0.shape[0]
    x0 = xs[0]
    dtype, device = x0.dtype, x0.device
    for i, d in enumerate(dims):
        _same(f"proj_weights[{i}]", proj_weights[i], (h, d), dtype, device)
        if proj_biases is not None:
            _same(f"proj_biases[{i}]", proj_biases[i], (h,), dtype, device)
    if not isinstance(gate_weight, torch.Tensor) or gate_weight.dim() != 2 or gate_weight.shape[0] < 1:
        raise ValueError(f"gate_weight: expected a tensor [G, {k}] with G >= 1")
    g = gate_weight.shape[0]
    _same("gate_weight", gate_weight, (g, k), dtype, device)
    if gate_bias is not None:
        _same("gate_bias", gate_bias, (g,), dtype, device)
    return xs


def fusion_projections(xs: Sequence[torch.Tensor], proj_weights: Sequence[torch.Tensor],
                       proj_biases: Optional[Sequence[torch.Tensor]], gate_weight: torch.Tensor,
                       gate_bias: Optional[torch.Tensor] = None, *,
                       backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(torch.stack([F.linear(x_m, W_m, b_m) for m], -2), F.linear(torch.cat(xs, -1), W_z, b_z))``
    without the stack or the concatenation: ``xs[m]`` ``[..., D_m]`` (identical leading dims),
    ``proj_weights[m]`` ``[H, D_m]``, ``proj_biases`` None or ``[H]`` each, ``gate_weight``
    ``[G, sum(D_m)]``, ``gate_bias`` ``[G]`` or None. Returns ``h_pre [..., M, H]`` and
    ``z [..., G]``. Differentiable in all tensors. Inside ``torch.autocast`` the inputs are cast
    to its dtype, as for ``F.linear``."""
    if autocasting() and isinstance(xs, (list, tuple)) and xs:
        xs, proj_weights, proj_biases, gate_weight, gate_bias = autocast_cast(
            [list(xs), proj_weights, proj_biases, gate_weight, gate_bias], xs[0])
    xs = check_inputs(xs, proj_weights, proj_biases, gate_weight, gate_bias)
    if OP.cpu_path(xs[0], backend):
        return reference.fusion_projections_ref(xs, proj_weights, proj_biases, gate_weight, gate_bias)
    return OP(xs, list(proj_weights), list(proj_biases or []), gate_weight, gate_bias, backend=backend)


def gated_fusion(xs: Sequence[torch.Tensor], proj_weights: Sequence[torch.Tensor],
                 proj_biases: Optional[Sequence[torch.Tensor]], gate_weight: torch.Tensor,
                 gate_bias: Optional[torch.Tensor], modality_mask: Optional[torch.Tensor] = None,
                 gate: str = "feature", *, backend: Optional[str] = None) -> torch.Tensor:
    """The computation of :class:`GatedFusion` on explicit tensors (the layer is a thin holder of
    its parameters). ``gate_weight``: ``[M * H, sum(D_m)]`` for ``gate="feature"``, ``[M,
    sum(D_m)]`` for ``gate="modality"``. Inside ``torch.autocast`` the GEMMs run in its dtype (as
    ``nn.Linear`` would), and so does the output."""
    if gate not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
    if autocasting() and isinstance(xs, (list, tuple)) and xs:  # torch.autocast: as F.linear would
        xs, proj_weights, proj_biases, gate_weight, gate_bias = autocast_cast(
            [list(xs), proj_weights, proj_biases, gate_weight, gate_bias], xs[0])
    xs = check_inputs(xs, proj_weights, proj_biases, gate_weight, gate_bias)
    m, hidden = len(xs), proj_weights[0].shape[0]
    want = m * hidden if gate == "feature" else m
    if gate_weight.shape[0] != want:
        raise ValueError(f"gate_weight: expected {want} rows for {gate!r} gates (M={m}, H={hidden}), "
                         f"got {gate_weight.shape[0]}")
    if modality_mask is not None:
        lead = tuple(xs[0].shape[:-1])
        if not isinstance(modality_mask, torch.Tensor) or modality_mask.dtype != torch.bool:
            got = modality_mask.dtype if isinstance(modality_mask, torch.Tensor) else type(modality_mask).__name__
            raise ValueError(f"modality_mask: expected a bool tensor of shape {(*lead, m)}, got {got}")
        if tuple(modality_mask.shape) != (*lead, m):
            raise ValueError(f"modality_mask: expected shape {(*lead, m)} (the xs' leading dims, then M), "
                             f"got {tuple(modality_mask.shape)}")
        if modality_mask.device != xs[0].device:
            raise ValueError(f"modality_mask: expected device {xs[0].device} (as xs), got {modality_mask.device}")
        # absent inputs may hold anything: zeros before any GEMM, so nothing of them reaches a result
        absent = (~modality_mask).unsqueeze(-1).unbind(-2)       # M views [..., 1]
        xs = [x.masked_fill(a, 0) for x, a in zip(xs, absent)]
    # the arguments were checked (and cast) above: the registered ops directly, not the public
    # functions (h_pre and z are well-formed by construction)
    if OP.cpu_path(xs[0], backend):   # the CPU path: both steps' plain formulations
        h_pre, z = reference.fusion_projections_ref(xs, proj_weights, proj_biases, gate_weight, gate_bias)
        # h_pre is finite where absent (the inputs were zeroed there)
        return gated_sum_cpu(h_pre, z.view(*z.shape[:-1], m, hidden) if gate == "feature" else z, modality_mask, True)
    if (fused.takes(xs, gate_weight, hidden, gate == "feature")
            and candidates.choice(fused.FWD_SLOT, xs[0].device) == "fused" and not _tracing()
            and OP.select(backend or get_backend(), dict(xs=xs, proj_weights=list(proj_weights),
                                                         proj_biases=list(proj_biases or []), gate_weight=gate_weight,
                                                         gate_bias=gate_bias))[0] == "triton"):
        # the slot's "fused" design (the gating in the gate GEMM's epilogue), where the GEMMs would
        # run on the triton backend
        return fused.gated_fusion(xs, proj_weights, proj_biases, gate_weight, gate_bias, modality_mask)
    h_pre, z = OP(xs, list(proj_weights), list(proj_biases or []), gate_weight, gate_bias, backend=backend)
    if gate == "feature":
        z = z.view(*z.shape[:-1], m, hidden)
    return GATED_SUM(h_pre, z, modality_mask, backend=backend)
