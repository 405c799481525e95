"""Benchmark cases and providers for tensor_fusion (TFN), against its FLOP and HBM floors."""
from __future__ import annotations

import torch

from ...bench.spec import BenchSpec, Case, Inputs, backend_provider, compiled_provider, traffic
from . import fused_width, tensor_fusion
from .reference import tensor_fusion_ref

CASES = [
    # the paper's sizes on CMU-MOSI: text 128, audio 32, video 32 -> H 128
    Case("tfn_mosi_b1024", dict(rows=1024, dims=(128, 32, 32), h=128), ("quick",)),
    Case("tfn_b4096_64+64+64_h256", dict(rows=4096, dims=(64, 64, 64), h=256)),
    # small enough for the Triton interpreter in the harness tests
    Case("cpu_tfn_b64_8+4+4_h16", dict(rows=64, dims=(8, 4, 4), h=16), ("cpu",)),
    # Per-call cost (benchmarks/per_call.py; on a GPU, the plain route's host cost)
    Case("tiny_b8_8+4+4_h16", dict(rows=8, dims=(8, 4, 4), h=16), ("cpu", "overhead")),
]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    xs = [torch.randn(p["rows"], d, dtype=dtype, device=device) for d in p["dims"]]
    k = fused_width(p["dims"])
    w = torch.randn(p["h"], k, dtype=dtype, device=device) * k ** -0.5
    b = torch.randn(p["h"], dtype=dtype, device=device)
    return Inputs(args=(xs, w, b), leaves=[*xs, w, b],
                  grad_out=torch.randn(p["rows"], p["h"], dtype=dtype, device=device))


def traffic_of(case: Case, dtype: torch.dtype):
    """fwd reads the xs and the weight, writes out; bwd reads dy, xs, weight, writes dxs, dweight."""
    p = case.params
    e = torch.empty((), dtype=dtype).element_size()
    x = p["rows"] * sum(p["dims"]) * e
    w = p["h"] * fused_width(p["dims"]) * e
    y = p["rows"] * p["h"] * e
    sizes = dict(x=x, w=w, b=p["h"] * e, y=y, dy=y, dx=x, dw=w)
    return traffic(sizes, fwd=(("x", "w", "b"), ("y",)), bwd=(("dy", "x", "w"), ("dx", "dw")))


def flops_of(case: Case, mode: str) -> int:
    """2·rows·K·H per GEMM: one forward, two backward (dA-contraction and dweight)."""
    p = case.params
    one = 2 * p["rows"] * fused_width(p["dims"]) * p["h"]
    return one if mode == "fwd" else 3 * one


SPEC = BenchSpec(
    op="tensor_fusion",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": tensor_fusion_ref,                       # materialised outer product + F.linear
        "compile": compiled_provider(tensor_fusion_ref),
        "auto": backend_provider(tensor_fusion, "auto"),  # the chunked CPU path on CPU tensors
        "triton": backend_provider(tensor_fusion, "triton"),
        "torch": backend_provider(tensor_fusion, "torch"),           # the plain formulation under autograd
        "reference": backend_provider(tensor_fusion, "reference"),   # the reference backend
        "cuda": backend_provider(tensor_fusion, "cuda"),
    },
    traffic=traffic_of,
    flops=flops_of,
)
