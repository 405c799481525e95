"""Benchmark cases and providers for low_rank_fusion (LMF), against its FLOP and HBM floors."""
from __future__ import annotations

import torch

from ...bench.spec import BenchSpec, Case, Inputs, backend_provider, compiled_provider, traffic
from . import low_rank_fusion
from .reference import low_rank_fusion_ref

CASES = [
    Case("lmf_mosi_b4096", dict(rows=4096, dims=(128, 32, 32), r=4, h=64), ("quick",)),
    Case("lmf_b16384_768+1024+512_r8_h512", dict(rows=16384, dims=(768, 1024, 512), r=8, h=512)),
    # odd rows, widths and H (the tournament's odd case)
    Case("lmf_b4099_300+33+129_r5_h77", dict(rows=4099, dims=(300, 33, 129), r=5, h=77)),
    # small enough for the Triton interpreter in the harness tests
    Case("cpu_lmf_b64_16+8+8_r2_h16", dict(rows=64, dims=(16, 8, 8), r=2, h=16), ("cpu",)),
    # Per-call cost (benchmarks/per_call.py)
    Case("tiny_b8_16+8+8_r2_h16", dict(rows=8, dims=(16, 8, 8), r=2, h=16), ("cpu", "overhead")),
]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    xs = [torch.randn(p["rows"], d, dtype=dtype, device=device) for d in p["dims"]]
    fs = [torch.randn(p["r"], d + 1, p["h"], dtype=dtype, device=device) * (d + 1) ** -0.5 for d in p["dims"]]
    w = torch.randn(p["r"], dtype=dtype, device=device)
    b = torch.randn(p["h"], dtype=dtype, device=device)
    return Inputs(args=(xs, fs, w, b), leaves=[*xs, *fs, w, b],
                  grad_out=torch.randn(p["rows"], p["h"], dtype=dtype, device=device))


def traffic_of(case: Case, dtype: torch.dtype):
    p = case.params
    e = torch.empty((), dtype=dtype).element_size()
    x = p["rows"] * sum(p["dims"]) * e
    f = p["r"] * sum(d + 1 for d in p["dims"]) * p["h"] * e
    y = p["rows"] * p["h"] * e
    sizes = dict(x=x, f=f, y=y, dy=y, dx=x, df=f)
    return traffic(sizes, fwd=(("x", "f"), ("y",)), bwd=(("dy", "x", "f"), ("dx", "df")))


def flops_of(case: Case, mode: str) -> int:
    """2·rows·R·Σ(D_m+1)·H for the projections; the backward recomputes them and runs two more."""
    p = case.params
    one = 2 * p["rows"] * p["r"] * sum(d + 1 for d in p["dims"]) * p["h"]
    return one if mode == "fwd" else 4 * one


SPEC = BenchSpec(
    op="low_rank_fusion",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": low_rank_fusion_ref,
        "compile": compiled_provider(low_rank_fusion_ref),
        "auto": backend_provider(low_rank_fusion, "auto"),
        "triton": backend_provider(low_rank_fusion, "triton"),
        "reference": backend_provider(low_rank_fusion, "reference"),   # the reference backend (the table's verdict)
        "cuda": backend_provider(low_rank_fusion, "cuda"),
    },
    traffic=traffic_of,
    flops=flops_of,
)
