"""fusion_projections on the ``cuda`` backend: there is none. Its projections are cuBLAS GEMMs
either way and its gate GEMM is concat_linear's Triton kernel, which has no CUDA C++ counterpart
(the CUDA C++ backend covers norm_concat, attention_pool and gated_sum). ``auto`` uses
:mod:`.gemms`; naming ``cuda`` gives this reason."""
from __future__ import annotations

from typing import Optional


def why_not(explicit: bool, **_) -> Optional[str]:
    return ("no CUDA C++ kernel: the gate GEMM is concat_linear's Triton kernel and the projections are "
            "cuBLAS GEMMs under every backend; use 'auto' or 'triton'")


def forward(*args, **kwargs):  # pragma: no cover - unreachable: why_not always refuses
    raise NotImplementedError


backward = forward
