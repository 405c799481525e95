"""``mmkernels.gated_sum``: the gating step of a Gated Multimodal Unit over M modalities, with
missing-modality masks: ``out = sum_m softmax_m(z)_m * tanh(h_pre_m)`` in one pass.

How a call travels: :func:`gated_sum` checks its arguments (``ValueError`` naming the argument)
-> ``torch.ops.mmkernels.gated_sum`` (a ``torch.library`` custom op, one node for
``torch.compile``; it saves only its inputs) -> :func:`mmkernels.backend.select` -> that backend's
``forward``; autograd calls ``torch.ops.mmkernels.gated_sum_backward`` on the same backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import candidates
from .._register import Op
from .._util import FLOATS
from . import cuda, reference
from .cpu import gated_sum_cpu
from . import triton as triton_impl

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}


def _fake(h_pre, z, modality_mask):
    return h_pre.new_empty((*h_pre.shape[:-2], h_pre.shape[-1]))


# saves only its inputs
OP = Op("gated_sum", "(Tensor h_pre, Tensor z, Tensor? modality_mask) -> Tensor", IMPLS, fake=_fake,
        differentiable=("h_pre", "z"), cpu=gated_sum_cpu)


# --- public function -----------------------------------------------------------------------------

def check_inputs(h_pre, z, modality_mask) -> None:
    """Validate the public arguments; raises ``ValueError`` naming the argument before any kernel runs."""
    if not isinstance(h_pre, torch.Tensor):
        raise ValueError(f"h_pre: expected a tensor [..., M, H], got {type(h_pre).__name__}")
    shape = h_pre.shape
    if len(shape) < 2 or shape[-2] < 1:
        raise ValueError(f"h_pre: expected shape [..., M, H] with M >= 1, got {tuple(shape)}")
    dtype = h_pre.dtype
    if dtype not in FLOATS:
        raise ValueError(f"h_pre: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    lead_m = shape[:-1]
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z: expected a tensor, got {type(z).__name__}")
    zshape = z.shape
    if zshape != shape and zshape != lead_m:
        raise ValueError(f"z: expected shape {tuple(shape)} (feature gates, as h_pre) or {tuple(lead_m)} "
                         f"(modality gates, h_pre without H), got {tuple(zshape)}")
    if z.dtype is not dtype:
        raise ValueError(f"z: expected dtype {dtype} (as h_pre), got {z.dtype}")
    device = h_pre.device
    if z.device != device:
        raise ValueError(f"z: expected device {device} (as h_pre), got {z.device}")
    if modality_mask is None:
        return
    if not isinstance(modality_mask, torch.Tensor):
        raise ValueError(f"modality_mask: expected None or a bool tensor, got {type(modality_mask).__name__}")
    if modality_mask.dtype is not torch.bool:
        raise ValueError(f"modality_mask: expected dtype torch.bool (True = present), got {modality_mask.dtype}")
    if modality_mask.shape != lead_m:
        raise ValueError(f"modality_mask: expected shape {tuple(lead_m)} (h_pre without H), "
                         f"got {tuple(modality_mask.shape)}")
    if modality_mask.device != device:
        raise ValueError(f"modality_mask: expected device {device} (as h_pre), got {modality_mask.device}")


def gated_sum(h_pre: torch.Tensor, z: torch.Tensor, modality_mask: Optional[torch.Tensor] = None, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """``out = sum_m g_m * tanh(h_pre[..., m, :])`` with ``g = softmax over m of z``.

    ``h_pre``: ``[..., M, H]`` pre-activations of the M modality projections. ``z``: gate logits,
    ``[..., M, H]`` (one gate per feature) or ``[..., M]`` (one per modality), same dtype.
    ``modality_mask``: ``[..., M]`` bool, True where the modality is present, or None (all
    present). The softmax runs over the present modalities only (absent ones weigh exactly 0);
    values of h_pre and z at absent modalities never reach the result or the gradients (NaN there
    is harmless); a row with nothing present gives 0 and zero gradients. A logit of ``-inf``
    weighs 0 as well; a row whose logits are all ``-inf`` gives 0 on the triton and cuda backends
    and NaN on torch and reference (``torch.softmax``'s 0/0, as the plain composition gives): to
    leave modalities out, pass ``modality_mask``. Returns ``[..., H]``.
    fp32 math, fp32/fp16/bf16 in and out (fp64 on the reference backend). For M = 2 this is the
    GMU: ``sigmoid(z_1 - z_2) * tanh(h_1) + (1 - sigmoid(z_1 - z_2)) * tanh(h_2)``.
    Differentiable in h_pre and z. ``backend``: this call's backend (default:
    :func:`mmkernels.get_backend`).
    """
    check_inputs(h_pre, z, modality_mask)
    if OP.cpu_path(h_pre, backend):
        return gated_sum_cpu(h_pre, z, modality_mask)
    return OP(h_pre, z, modality_mask, backend=backend)


def aot_examples():
    """Representative launches for the ahead-of-time compile test (every GPU target)."""
    def case(lead, m, h, dtype, feature=True, mask=True):
        hp = torch.randn(*lead, m, h, dtype=dtype)
        z = torch.randn(*((*lead, m, h) if feature else (*lead, m)), dtype=dtype)
        mk = torch.rand(*lead, m) > 0.3 if mask else None
        dy = torch.randn(*lead, h, dtype=dtype)

        def run():
            triton_impl.forward(hp, z, mk)
            for name in candidates.SLOTS[triton_impl.BWD_SLOT]:    # every backward candidate
                with candidates.use(triton_impl.BWD_SLOT, name):
                    triton_impl.backward(dy, hp, z, mk)
        return run

    return [
        ("bf16 B4096 M3 H1024 feature masked", case((4096,), 3, 1024, torch.bfloat16)),
        ("bf16 B8192 M2 H512 feature", case((8192,), 2, 512, torch.bfloat16, mask=False)),
        ("fp16 B1024 M3 H1024 modality masked", case((1024,), 3, 1024, torch.float16, feature=False)),
        ("fp32 B64 M5 H300 feature masked", case((64,), 5, 300, torch.float32)),
        ("bf16 B512 M8 H96 modality", case((512,), 8, 96, torch.bfloat16, feature=False, mask=False)),
        ("bf16 B64 M3 H1 modality masked, 64-bit offsets forced", _forced_off64(case((64,), 3, 1, torch.bfloat16,
                                                                                     feature=False))),
        ("fp16 B64 M3 H40 feature masked, 64-bit offsets forced", _forced_off64(case((64,), 3, 40, torch.float16))),
    ]


def _forced_off64(run):
    """Compile the 64-bit-offset variant (normally taken only for strides past 2^31) on small,
    contiguous inputs: strides equal to 1 are constexprs on a GPU, which the interpreter never shows."""
    def forced():
        saved = triton_impl._off64
        triton_impl._off64 = lambda *a: True
        try:
            run()
        finally:
            triton_impl._off64 = saved
    return forced
