"""Benchmark cases and providers for concat_linear (used by mmkernels-bench and benchmarks/).

Providers take ``(xs, weight, bias, premade, activation, padded)``: ``premade`` is ``torch.cat(xs)``
made once outside the timing, for ``cublas_premade`` — cuBLAS's GEMM on an already-concatenated input
(forward: one GEMM + bias; fwd+bwd: its three GEMMs), the bound the fused kernel is held to;
``padded`` is that input and the weight zero-padded to a 16-byte aligned K (4396 -> 4400 in bf16),
for ``cublas_premade_aligned``: the same bound where cuBLAS may not pick its unaligned-K kernels
(the fused kernel pads unaligned inputs internally), so "vs cuBLAS" is not won on alignment.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...bench.spec import BenchSpec, Case, Inputs, aligned, backend_provider, compiled_provider, traffic
from . import concat_linear
from .reference import concat_linear_ref

CASES = [
    # Image (768) + text (1024) + audio (512) pooled features -> 1024 hidden, GELU: the fusion MLP.
    Case("b32768_768+1024+512_n1024_gelu", dict(rows=32768, dims=(768, 1024, 512), n=1024, act="gelu"), ("quick",)),
    # MM-IMDb's GMU widths: VGG (4096) + word2vec (300) -> 512, tanh.
    Case("b8192_4096+300_n512_tanh", dict(rows=8192, dims=(4096, 300), n=512, act="tanh"), ("quick",)),
    # A classifier head over three 768-wide modalities: 10 classes, memory-bound.
    Case("b65536_3x768_n10", dict(rows=65536, dims=(768, 768, 768), n=10, act=None), ("quick",)),
    # Odd widths and rows (unaligned inputs, a ragged last row tile, an N no tile fits): the
    # tournament's ragged case for concat_linear.fwd.
    Case("b4099_300+33+129_n77_silu", dict(rows=4099, dims=(300, 33, 129), n=77, act="silu")),
    # CPU-sized cases.
    Case("cpu_b512_96+64_n48_gelu", dict(rows=512, dims=(96, 64), n=48, act="gelu"), ("cpu",)),
    Case("cpu_b1024_3x32_n10", dict(rows=1024, dims=(32, 32, 32), n=10, act=None), ("cpu",)),
    # Per-call cost: three [8, <= 64] inputs -> 16, gelu.
    Case("tiny_b8_64+32+48_n16_gelu", dict(rows=8, dims=(64, 32, 48), n=16, act="gelu"), ("cpu", "overhead")),
]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    xs = [torch.randn(p["rows"], d, dtype=dtype, device=device) for d in p["dims"]]
    k = sum(p["dims"])
    w = torch.randn(p["n"], k, dtype=dtype, device=device) * k ** -0.5
    b = torch.randn(p["n"], dtype=dtype, device=device)
    premade = torch.cat(xs, -1)
    padded = (aligned(premade), aligned(w))
    dy = torch.randn(p["rows"], p["n"], dtype=dtype, device=device)
    return Inputs(args=(xs, w, b, premade, p["act"], padded), leaves=xs + [w, b, premade, *padded], grad_out=dy)


def traffic_of(case: Case, dtype: torch.dtype):
    """fwd reads xs, weight, bias and writes out; bwd reads dy, xs, weight (and, with an activation,
    what its derivative needs: one [rows, N] tensor) and writes dxs, dweight, dbias."""
    p = case.params
    e = torch.empty((), dtype=dtype).element_size()
    k = sum(p["dims"])
    x, w, y, b = p["rows"] * k * e, p["n"] * k * e, p["rows"] * p["n"] * e, p["n"] * e
    sizes = dict(x=x, w=w, b=b, y=y, dy=y, dx=x, dw=w, db=b)
    saved = ("y",) if p["act"] else ()
    return traffic(sizes, fwd=(("x", "w", "b"), ("y",)), bwd=(("dy", "x", "w") + saved, ("dx", "dw", "db")))


def flops(case: Case, mode: str) -> int:
    p = case.params
    one = 2 * p["rows"] * p["n"] * sum(p["dims"])
    return {"fwd": one, "bwd": 2 * one, "fwd+bwd": 3 * one}[mode]


def _eager(xs, w, b, premade, act, padded):
    return concat_linear_ref(xs, w, b, act)


def _premade(xs, w, b, premade, act, padded):
    return F.linear(premade, w, b)


def _premade_aligned(xs, w, b, premade, act, padded):
    return F.linear(padded[0], padded[1], b)


def _backend(name):
    run = backend_provider(concat_linear, name)
    return lambda xs, w, b, premade, act, padded: run(xs, w, b, act)


SPEC = BenchSpec(
    op="concat_linear",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": _eager,                         # torch.cat + F.linear + activation
        "compile": compiled_provider(_eager),    # torch.compile of that
        "cublas_premade": _premade,              # the GEMM alone on a pre-made concat (the bound)
        "cublas_premade_aligned": _premade_aligned,  # and on its 16-byte aligned (padded) copy
        "auto": _backend("auto"),                # what users get: the plain composition where the table says torch
        "torch": _backend("torch"),              # the torch backend: the plain composition under autograd
        "reference": _backend("reference"),      # the reference backend: cat + cuBLAS, explicit backward
        "triton": _backend("triton"),
        "cuda": _backend("cuda"),
    },
    traffic=traffic_of,
    flops=flops,
    baselines=("eager", "compile", "cublas_premade", "cublas_premade_aligned"),
    bounds=("cublas_premade", "cublas_premade_aligned"),
)
