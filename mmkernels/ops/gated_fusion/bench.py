"""Benchmark cases and providers for the whole gated-fusion layer (``gated_fusion``): GEMM-bound,
against cuBLAS doing the layer's GEMMs alone on pre-made tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...bench.spec import BenchSpec, Case, Inputs, aligned, backend_provider, compiled_provider, traffic
from . import gated_fusion
from .reference import gated_fusion_ref

# --- the whole layer ----------------------------------------------------------------------------

CASES = [
    Case("b16384_768+1024+512_h1024_feature", dict(rows=16384, dims=(768, 1024, 512), h=1024, gate="feature",
                                                   mask=False), ("quick",)),
    Case("b8192_4096+300_h512_feature", dict(rows=8192, dims=(4096, 300), h=512, gate="feature", mask=False),
         ("quick",)),
    Case("b16384_768+1024+512_h1024_modality_masked", dict(rows=16384, dims=(768, 1024, 512), h=1024,
                                                           gate="modality", mask=True)),
    # Odd rows, widths and H with feature gates and a mask: the tournament's ragged case for
    # gated_fusion.fwd.
    Case("b4099_300+33+129_h77_feature_masked", dict(rows=4099, dims=(300, 33, 129), h=77, gate="feature",
                                                    mask=True)),
    Case("cpu_b256_96+64+32_h64_feature_masked", dict(rows=256, dims=(96, 64, 32), h=64, gate="feature", mask=True),
         ("cpu",)),
    Case("cpu_b128_48+40_h32_modality", dict(rows=128, dims=(48, 40), h=32, gate="modality", mask=False), ("cpu",)),
    # Per-call cost: 8 rows of 32 + 16 features -> 16.
    Case("tiny_b8_32+16_h16_feature", dict(rows=8, dims=(32, 16), h=16, gate="feature", mask=False),
         ("cpu", "overhead")),
]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    rows, dims, h = p["rows"], p["dims"], p["h"]
    m, k = len(dims), sum(dims)
    g = m * h if p["gate"] == "feature" else m
    xs = [torch.randn(rows, d, dtype=dtype, device=device) for d in dims]
    ws = [torch.randn(h, d, dtype=dtype, device=device) * d ** -0.5 for d in dims]
    bs = [torch.randn(h, dtype=dtype, device=device) * 0.1 for _ in dims]
    wz = torch.randn(g, k, dtype=dtype, device=device) * k ** -0.5
    bz = torch.randn(g, dtype=dtype, device=device) * 0.1
    mask = (torch.rand(rows, m, device=device) > 0.2) if p["mask"] else None
    premade = torch.cat(xs, -1)  # for the cuBLAS bounds only, made outside the timing
    # the same GEMMs with every row 16-byte aligned (zero-padded K), for cublas_gemms_aligned
    padded = ([aligned(x) for x in xs], [aligned(w) for w in ws], aligned(premade), aligned(wz))
    return Inputs(args=(xs, ws, bs, wz, bz, mask, p["gate"], premade, padded),
                  leaves=[*xs, *ws, *bs, wz, bz, premade, *padded[0], *padded[1], padded[2], padded[3]],
                  grad_out=torch.randn(rows, h, dtype=dtype, device=device))


def traffic_of(case: Case, dtype: torch.dtype):
    """The layer's own inputs, parameters and outputs (it is GEMM-bound: the FLOPs set its floor).
    fwd reads xs and every weight and bias, writes out; bwd reads dy, xs and the weights, writes
    dxs and every weight's and bias's gradient."""
    p = case.params
    e = torch.empty((), dtype=dtype).element_size()
    m, k, h = len(p["dims"]), sum(p["dims"]), p["h"]
    g = m * h if p["gate"] == "feature" else m
    x, y = p["rows"] * k * e, p["rows"] * h * e
    w, b = (h + g) * k * e, (m * h + g) * e     # projections [H, D_m] + gate [G, K]; their biases
    sizes = dict(x=x, w=w, b=b, mask=p["rows"] * m if p["mask"] else 0, y=y, dy=y, dx=x, dw=w, db=b)
    return traffic(sizes, fwd=(("x", "w", "b", "mask"), ("y",)),
                   bwd=(("dy", "x", "w", "mask"), ("dx", "dw", "db")))


def flops_of(case: Case, mode: str) -> int:
    p = case.params
    m, h = len(p["dims"]), p["h"]
    g = m * h if p["gate"] == "feature" else m
    one = 2 * p["rows"] * (h * sum(p["dims"]) + g * sum(p["dims"]))
    return {"fwd": one, "bwd": 2 * one, "fwd+bwd": 3 * one}[mode]


def _layer_eager(xs, ws, bs, wz, bz, mask, gate, premade, padded):
    return gated_fusion_ref(xs, ws, bs, wz, bz, mask, gate)


def _cublas_gemms(xs, ws, bs, wz, bz, mask, gate, premade, padded):
    """The layer's GEMMs alone, by cuBLAS on ready inputs: the bound the fused layer is held to."""
    return (*[F.linear(x, w, b) for x, w, b in zip(xs, ws, bs)], F.linear(premade, wz, bz))


def _cublas_gemms_aligned(xs, ws, bs, wz, bz, mask, gate, premade, padded):
    """The same GEMMs on zero-padded copies whose rows are 16-byte aligned (e.g. 300 -> 304 wide in
    bf16): the bound without cuBLAS's unaligned-K kernels, so a lead over cublas_gemms is not won on
    alignment alone."""
    pxs, pws, pcat, pwz = padded
    return (*[F.linear(x, w, b) for x, w, b in zip(pxs, pws, bs)], F.linear(pcat, pwz, bz))


def _layer(backend):
    run = backend_provider(gated_fusion, backend)
    return lambda xs, ws, bs, wz, bz, mask, gate, premade, padded: run(xs, ws, bs, wz, bz, mask, gate)


SPEC = BenchSpec(
    op="gated_fusion",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": _layer_eager,                           # nn.Linear + stack + cat + tanh + softmax + sum
        "compile": compiled_provider(_layer_eager),      # torch.compile of that
        "cublas_gemms": _cublas_gemms,                   # the GEMMs alone (the bound)
        "cublas_gemms_aligned": _cublas_gemms_aligned,   # and on 16-byte aligned (padded) rows
        "auto": _layer("auto"),                          # what users get: the CPU path on CPU tensors
        "triton": _layer("triton"),                      # the mmkernels layer
        "cuda": _layer("cuda"),
    },
    traffic=traffic_of,
    flops=flops_of,
    baselines=("eager", "compile", "cublas_gemms", "cublas_gemms_aligned"),
    bounds=("cublas_gemms", "cublas_gemms_aligned"),
)
