"""Benchmark cases and providers for norm_concat (used by mmkernels-bench and benchmarks/)."""
from __future__ import annotations

import torch

from ...bench.spec import BenchSpec, Case, Inputs, backend_provider, compiled_provider, traffic
from . import norm_concat
from .reference import norm_concat_ref

CASES = [
    # Image (ViT-B 768) + text (1024) + audio (512) pooled vectors; the headline speed target.
    Case("b32768_768+1024+512", dict(lead=(32768,), dims=(768, 1024, 512)), ("quick",)),
    # Token-level fusion of aligned ViT-L/14 patch tokens (1024) with text-side features (768).
    Case("b64xt577_1024+768", dict(lead=(64, 577), dims=(1024, 768))),
    # MM-IMDb: VGG image features (4096) + word2vec text (300).
    Case("b8192_4096+300", dict(lead=(8192,), dims=(4096, 300)), ("quick",)),
    # Many small modalities (sensor-style fusion, M = 8).
    Case("b65536_8x128", dict(lead=(65536,), dims=(128,) * 8)),
    # One very wide modality (LLM hidden size) next to a small one.
    Case("b2048_16384+512", dict(lead=(2048,), dims=(16384, 512))),
    # CPU-sized cases.
    Case("cpu_b256_768+1024+512", dict(lead=(256,), dims=(768, 1024, 512)), ("cpu",)),
    Case("cpu_b512_300+64", dict(lead=(512,), dims=(300, 64)), ("cpu",)),
    # Per-call cost: three [8, <= 64] inputs, where the host path is all the time there is.
    Case("tiny_b8_64+32+48", dict(lead=(8,), dims=(64, 32, 48)), ("cpu", "overhead")),
]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    lead, dims = case.params["lead"], case.params["dims"]
    xs = [torch.randn(*lead, d, dtype=dtype, device=device) for d in dims]
    ws = [torch.randn(d, dtype=dtype, device=device) for d in dims]
    bs = [torch.randn(d, dtype=dtype, device=device) for d in dims]
    dy = torch.randn(*lead, sum(dims), dtype=dtype, device=device)
    return Inputs(args=(xs, ws, bs), leaves=xs + ws + bs, grad_out=dy)


def _rows(case):
    n = 1
    for s in case.params["lead"]:
        n *= s
    return n


def traffic_of(case: Case, dtype: torch.dtype):
    """fwd reads x, weights, biases and writes y; bwd reads dy, x, weights (the row statistics are
    recomputed or saved: small) and writes dx, dweights, dbiases."""
    e = torch.empty((), dtype=dtype).element_size()
    act = _rows(case) * sum(case.params["dims"]) * e
    par = sum(case.params["dims"]) * e
    sizes = dict(x=act, y=act, dy=act, dx=act, w=par, b=par, dw=par, db=par)
    return traffic(sizes, fwd=(("x", "w", "b"), ("y",)), bwd=(("dy", "x", "w"), ("dx", "dw", "db")))


def _eager(xs, ws, bs):
    return norm_concat_ref(xs, ws, bs, False, 1e-5)


SPEC = BenchSpec(
    op="norm_concat",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": _eager,                                   # F.layer_norm per modality + torch.cat
        "compile": compiled_provider(_eager),              # torch.compile of that
        "auto": backend_provider(norm_concat, "auto"),     # what users get: the CPU path on CPU tensors
        "triton": backend_provider(norm_concat, "triton"),
        "cuda": backend_provider(norm_concat, "cuda"),
    },
    traffic=traffic_of,
)
