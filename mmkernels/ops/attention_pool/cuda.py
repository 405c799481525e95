"""attention_pool on the CUDA C++ backend (csrc/). Not part of this build yet: the CUDA C++ backend
issue fills csrc/ and this binding; until then the backend says why it can't run."""
from __future__ import annotations

from typing import Optional

from ...cuda import extension_why_not


def why_not(explicit: bool, x, **_) -> Optional[str]:
    return extension_why_not([x])


def forward(*args, **kwargs):  # pragma: no cover - unreachable while why_not refuses
    raise NotImplementedError


backward = forward
