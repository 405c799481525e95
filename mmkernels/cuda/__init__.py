"""Building and loading the CUDA C++ extension from csrc/.

Not built yet: csrc/ holds no kernels in this release (the CUDA C++ backend issue adds them, with
on-demand and ahead-of-time builds). Every op's ``cuda`` backend asks :func:`extension_why_not`."""
from __future__ import annotations

from typing import Optional


def extension_why_not(tensors) -> Optional[str]:
    if tensors[0].device.type != "cuda":
        return f"needs CUDA tensors, got {tensors[0].device.type}"
    return "the CUDA C++ extension (csrc/) is not built in this release"
