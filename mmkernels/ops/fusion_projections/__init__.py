"""``fusion_projections``: the GEMMs of a gated-fusion layer in one registered op —
M per-modality projections ``x_m W_m^T + b_m`` (all to width H) stacked into ``h_pre [..., M, H]``,
and the gate logits ``z = cat(xs) W_z^T + b_z`` (``[..., G]``) — the first step of
:class:`mmkernels.nn.GatedFusion`.

One op rather than two because the xs feed both: its backward sums each x_m's two gradients
inside the GEMMs instead of by autograd's extra pass over dx. Registered as
``torch.ops.mmkernels.fusion_projections`` (and ``_backward``) so ``torch.compile`` sees one node.
Backends: ``reference`` (``torch.stack`` of ``F.linear``; ``torch.cat`` + ``F.linear``),
``triton`` (:mod:`.fused`: vendor GEMMs into place for h_pre, concat_linear's Triton GEMM for z)
and ``cuda`` (none: :mod:`.cuda` says why).
It is not in :data:`mmkernels.ops.OPS`: its own code launches no Triton kernel (the gate GEMM is
concat_linear's, compiled and benchmarked there; the layer is benchmarked as ``gated_fusion``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ... import backend as _backend
from .._util import autocast_cast, check_modalities, fresh_outputs
from . import cuda, fused, reference

IMPLS = {"reference": reference, "triton": fused, "cuda": cuda}


def _select(requested, xs):
    return _backend.select("fusion_projections", IMPLS, requested, xs=xs)


@torch.library.custom_op("mmkernels::fusion_projections", mutates_args=())
def _fusion_projections_op(xs: List[torch.Tensor], proj_weights: List[torch.Tensor], proj_biases: List[torch.Tensor],
                           gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor],
                           backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    _, impl = _select(backend, xs)
    h_pre, z = impl.forward(xs, proj_weights, proj_biases, gate_weight, gate_bias)
    h_pre, z = fresh_outputs([h_pre, z], [*xs, *proj_weights, *proj_biases, gate_weight, gate_bias])
    return h_pre, z


@_fusion_projections_op.register_fake
def _(xs, proj_weights, proj_biases, gate_weight, gate_bias, backend):
    lead = xs[0].shape[:-1]
    return (xs[0].new_empty((*lead, len(xs), proj_weights[0].shape[0])),
            xs[0].new_empty((*lead, gate_weight.shape[0])))


@torch.library.custom_op("mmkernels::fusion_projections_backward", mutates_args=())
def _fusion_projections_backward_op(dh: torch.Tensor, dz: torch.Tensor, xs: List[torch.Tensor],
                                    proj_weights: List[torch.Tensor], proj_biases: List[torch.Tensor],
                                    gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor],
                                    backend: str) -> List[torch.Tensor]:
    """Returns ``dxs + dproj_weights + dproj_biases + [dgate_weight]`` (+ ``[dgate_bias]``)."""
    _, impl = _select(backend, xs)
    dxs, dws, dbs, dgw, dgb = impl.backward(dh, dz, xs, proj_weights, proj_biases, gate_weight, gate_bias)
    flat = list(dxs) + list(dws) + list(dbs) + [dgw] + ([] if gate_bias is None else [dgb])
    return fresh_outputs(flat, [dh, dz, *xs, *proj_weights, *proj_biases, gate_weight, gate_bias])


@_fusion_projections_backward_op.register_fake
def _(dh, dz, xs, proj_weights, proj_biases, gate_weight, gate_bias, backend):
    like = [*xs, *proj_weights, *proj_biases, gate_weight] + ([] if gate_bias is None else [gate_bias])
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]


def _setup_context(ctx, inputs, output):
    xs, proj_weights, proj_biases, gate_weight, gate_bias, backend = inputs
    ctx.sizes = (len(xs), len(proj_biases))
    ctx.has_gate_bias, ctx.backend = gate_bias is not None, backend
    ctx.save_for_backward(*xs, *proj_weights, *proj_biases, gate_weight, gate_bias)


def _backward(ctx, dh, dz):
    m, nb = ctx.sizes
    s = list(ctx.saved_tensors)
    xs, ws, bs, gw, gb = s[:m], s[m:2 * m], s[2 * m:2 * m + nb], s[2 * m + nb], s[2 * m + nb + 1]
    if dh is None:
        dh = torch.zeros((*xs[0].shape[:-1], m, ws[0].shape[0]), dtype=xs[0].dtype, device=xs[0].device)
    if dz is None:
        dz = torch.zeros((*xs[0].shape[:-1], gw.shape[0]), dtype=xs[0].dtype, device=xs[0].device)
    g = _fusion_projections_backward_op(dh, dz, xs, ws, bs, gw, gb, ctx.backend)
    k = 2 * m + nb
    return list(g[:m]), list(g[m:2 * m]), list(g[2 * m:k]), g[k], (g[k + 1] if ctx.has_gate_bias else None), None


_fusion_projections_op.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(xs, proj_weights, proj_biases, gate_weight, gate_bias) -> List[torch.Tensor]:
    """``ValueError`` naming the argument before any kernel runs; returns xs as a list."""
    xs = check_modalities(xs)
    m, k = len(xs), sum(x.shape[-1] for x in xs)

    def same(name, t, shape):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != xs[0].dtype:
            raise ValueError(f"{name}: expected dtype {xs[0].dtype} (as xs), got {t.dtype}")
        if t.device != xs[0].device:
            raise ValueError(f"{name}: expected device {xs[0].device} (as xs), got {t.device}")

    for name, ts in (("proj_weights", proj_weights), ("proj_biases", proj_biases)):
        if ts is not None and (isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)) or len(ts) != m):
            raise ValueError(f"{name}: expected a list of {m} tensors (one per x)")
    if proj_weights is None:
        raise ValueError(f"proj_weights: expected a list of {m} tensors (one per x), got None")
    w0 = proj_weights[0]
    if not isinstance(w0, torch.Tensor) or w0.dim() != 2 or w0.shape[0] < 1:
        raise ValueError(f"proj_weights[0]: expected a tensor [H, {xs[0].shape[-1]}] with H >= 1, got "
                         f"{tuple(w0.shape) if isinstance(w0, torch.Tensor) else type(w0).__name__}")
    h = w0.shape[0]
    for i, x in enumerate(xs):
        same(f"proj_weights[{i}]", proj_weights[i], (h, x.shape[-1]))
        if proj_biases is not None:
            same(f"proj_biases[{i}]", proj_biases[i], (h,))
    if not isinstance(gate_weight, torch.Tensor) or gate_weight.dim() != 2 or gate_weight.shape[0] < 1:
        raise ValueError(f"gate_weight: expected a tensor [G, {k}] with G >= 1")
    same("gate_weight", gate_weight, (gate_weight.shape[0], k))
    if gate_bias is not None:
        same("gate_bias", gate_bias, (gate_weight.shape[0],))
    return xs


def fusion_projections(xs: Sequence[torch.Tensor], proj_weights: Sequence[torch.Tensor],
                       proj_biases: Optional[Sequence[torch.Tensor]], gate_weight: torch.Tensor,
                       gate_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(torch.stack([F.linear(x_m, W_m, b_m) for m], -2), F.linear(torch.cat(xs, -1), W_z, b_z))``
    without the stack or the concatenation: ``xs[m]`` ``[..., D_m]`` (identical leading dims),
    ``proj_weights[m]`` ``[H, D_m]``, ``proj_biases`` None or ``[H]`` each, ``gate_weight``
    ``[G, sum(D_m)]``, ``gate_bias`` ``[G]`` or None. Returns ``h_pre [..., M, H]`` and
    ``z [..., G]``. Differentiable in all tensors. Inside ``torch.autocast`` the inputs are cast
    to its dtype, as for ``F.linear``."""
    if isinstance(xs, (list, tuple)) and xs:
        xs, proj_weights, proj_biases, gate_weight, gate_bias = autocast_cast(
            [list(xs), proj_weights, proj_biases, gate_weight, gate_bias], xs[0])
    xs = check_inputs(xs, proj_weights, proj_biases, gate_weight, gate_bias)
    return _fusion_projections_op(xs, list(proj_weights), list(proj_biases or []), gate_weight, gate_bias,
                                  _backend.get_backend())
