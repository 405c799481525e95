"""Benchmark cases and providers for concat_linear (used by mmkernels-bench and benchmarks/).

Providers take ``(xs, weight, bias, premade, activation)``: ``premade`` is ``torch.cat(xs)`` made
once outside the timing, for ``cublas_premade`` — cuBLAS's GEMM on an already-concatenated input
(forward: one GEMM + bias; fwd+bwd: its three GEMMs), the bound the fused kernel is held to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...bench.spec import BenchSpec, Case, Inputs, backend_provider, compiled_provider
from . import concat_linear
from .reference import concat_linear_ref

CASES = [
    # Image (768) + text (1024) + audio (512) pooled features -> 1024 hidden, GELU: the fusion MLP.
    Case("b32768_768+1024+512_n1024_gelu", dict(rows=32768, dims=(768, 1024, 512), n=1024, act="gelu"), ("quick",)),
    # MM-IMDb's GMU widths: VGG (4096) + word2vec (300) -> 512, tanh.
    Case("b8192_4096+300_n512_tanh", dict(rows=8192, dims=(4096, 300), n=512, act="tanh"), ("quick",)),
    # A classifier head over three 768-wide modalities: 10 classes, memory-bound.
    Case("b65536_3x768_n10", dict(rows=65536, dims=(768, 768, 768), n=10, act=None), ("quick",)),
    # CPU-sized cases.
    Case("cpu_b512_96+64_n48_gelu", dict(rows=512, dims=(96, 64), n=48, act="gelu"), ("cpu",)),
    Case("cpu_b1024_3x32_n10", dict(rows=1024, dims=(32, 32, 32), n=10, act=None), ("cpu",)),
]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    xs = [torch.randn(p["rows"], d, dtype=dtype, device=device) for d in p["dims"]]
    k = sum(p["dims"])
    w = torch.randn(p["n"], k, dtype=dtype, device=device) * k ** -0.5
    b = torch.randn(p["n"], dtype=dtype, device=device)
    premade = torch.cat(xs, -1)
    dy = torch.randn(p["rows"], p["n"], dtype=dtype, device=device)
    return Inputs(args=(xs, w, b, premade, p["act"]), leaves=xs + [w, b, premade], grad_out=dy)


def bytes_moved(case: Case, dtype: torch.dtype, mode: str) -> int:
    """fwd: xs + weight + out; bwd: dy + xs + weight (read), dxs + dweight (written); both for fwd+bwd."""
    p = case.params
    e = torch.empty((), dtype=dtype).element_size()
    k = sum(p["dims"])
    x, w, y = p["rows"] * k * e, p["n"] * k * e, p["rows"] * p["n"] * e
    return {"fwd": x + w + y, "bwd": y + 2 * x + 2 * w, "fwd+bwd": 2 * y + 3 * x + 3 * w}[mode]


def flops(case: Case, mode: str) -> int:
    p = case.params
    one = 2 * p["rows"] * p["n"] * sum(p["dims"])
    return {"fwd": one, "bwd": 2 * one, "fwd+bwd": 3 * one}[mode]


def _eager(xs, w, b, premade, act):
    return concat_linear_ref(xs, w, b, act)


def _premade(xs, w, b, premade, act):
    return F.linear(premade, w, b)


def _backend(name):
    run = backend_provider(concat_linear, name)
    return lambda xs, w, b, premade, act: run(xs, w, b, act)


SPEC = BenchSpec(
    op="concat_linear",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": _eager,                         # torch.cat + F.linear + activation
        "compile": compiled_provider(_eager),    # torch.compile of that
        "cublas_premade": _premade,              # the GEMM alone on a pre-made concat (the bound)
        "triton": _backend("triton"),
        "cuda": _backend("cuda"),
    },
    bytes=bytes_moved,
    flops=flops,
    baselines=("eager", "compile", "cublas_premade"),
    bounds=("cublas_premade",),
)
