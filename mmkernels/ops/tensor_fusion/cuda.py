"""tensor_fusion has no CUDA C++ kernel: on GPUs the blocked cuBLAS formulation is the path. The
backend says so, and ``auto`` moves on."""
from __future__ import annotations

from typing import Optional

from ...cuda import extension_why_not


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    return extension_why_not(xs) if xs[0].device.type != "cuda" else \
        "tensor_fusion has no CUDA C++ kernel (the blocked cuBLAS formulation serves GPUs)"


def forward(*args, **kwargs):  # pragma: no cover - unreachable while why_not refuses
    raise NotImplementedError


backward = forward
