"""Benchmark cases and providers for gated_sum alone, against its HBM floor (the whole gated-fusion
layer is benchmarked in :mod:`mmkernels.ops.gated_fusion.bench`)."""
from __future__ import annotations

import torch

from ...bench.spec import BenchSpec, Case, Inputs, backend_provider, compiled_provider, traffic
from . import gated_sum
from .reference import gated_sum_ref

# --- gated_sum alone --------------------------------------------------------------------------------

CASES = [
    # headline presets: three pooled modalities -> H 1024 with feature gates; MM-IMDb's GMU
    Case("b16384_m3_h1024_feature", dict(rows=16384, m=3, h=1024, gate="feature", mask=False), ("quick",)),
    Case("b8192_m2_h512_feature", dict(rows=8192, m=2, h=512, gate="feature", mask=False), ("quick",)),
    # missing modalities (20% absent) and one gate per modality
    Case("b16384_m3_h1024_feature_masked", dict(rows=16384, m=3, h=1024, gate="feature", mask=True)),
    Case("b16384_m3_h1024_modality_masked", dict(rows=16384, m=3, h=1024, gate="modality", mask=True), ("quick",)),
    # token-level fusion of eight sensor streams
    Case("b65536_m8_h256_feature", dict(rows=65536, m=8, h=256, gate="feature", mask=False)),
    Case("cpu_b256_m3_h96_feature_masked", dict(rows=256, m=3, h=96, gate="feature", mask=True), ("cpu",)),
    Case("cpu_b512_m2_h64_modality", dict(rows=512, m=2, h=64, gate="modality", mask=False), ("cpu",)),
    # Per-call cost: 8 rows, 3 modalities, H 32.
    Case("tiny_b8_m3_h32_feature", dict(rows=8, m=3, h=32, gate="feature", mask=False), ("cpu", "overhead")),
]


def _mask(rows, m, device):
    return torch.rand(rows, m, device=device) > 0.2


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    rows, m, h = p["rows"], p["m"], p["h"]
    h_pre = torch.randn(rows, m, h, dtype=dtype, device=device)
    z = torch.randn(*((rows, m, h) if p["gate"] == "feature" else (rows, m)), dtype=dtype, device=device)
    mask = _mask(rows, m, device) if p["mask"] else None
    return Inputs(args=(h_pre, z, mask), leaves=[h_pre, z], grad_out=torch.randn(rows, h, dtype=dtype, device=device))


def traffic_of(case: Case, dtype: torch.dtype):
    """fwd reads h_pre, z (+ mask) and writes out; bwd reads dy, h_pre, z (+ mask) and writes dh, dz.
    A forward and a backward that save only the inputs read h_pre and z twice, so fwd+bwd cannot go
    below the save-inputs floor: 20 / 14 = 1.43x the fwd+bwd floor for M=3 feature gates."""
    p = case.params
    e = torch.empty((), dtype=dtype).element_size()
    rows, m, h = p["rows"], p["m"], p["h"]
    hp = rows * m * h * e
    z = hp if p["gate"] == "feature" else rows * m * e
    y = rows * h * e
    sizes = dict(h=hp, z=z, mask=rows * m if p["mask"] else 0, y=y, dy=y, dh=hp, dz=z)
    return traffic(sizes, fwd=(("h", "z", "mask"), ("y",)), bwd=(("dy", "h", "z", "mask"), ("dh", "dz")))


SPEC = BenchSpec(
    op="gated_sum",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": gated_sum_ref,                         # tanh + masked softmax + weighted sum in PyTorch
        "compile": compiled_provider(gated_sum_ref),    # torch.compile of that
        "auto": backend_provider(gated_sum, "auto"),   # what users get: the CPU path on CPU tensors
        "triton": backend_provider(gated_sum, "triton"),
        "cuda": backend_provider(gated_sum, "cuda"),
    },
    traffic=traffic_of,
)
