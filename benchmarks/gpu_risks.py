"""GPU-only questions the CPU checks cannot answer, each timed or checked once (``gpu_check.sh risks``):

* ``nc_alignment``: CUDA norm_concat fwd+bwd, bf16, B8192, dims 4096+296 (every modality on the
  16-byte path) against 4096+300 (the 300-wide modality scalar; with per-modality launch classes
  the 4096-wide one stays vectorised). Near-equal times answer the risk.
* ``nc_bwd_blocks``: the cached CUDA norm_concat backward (bf16 768+1024+512, B32768) with
  ``__launch_bounds__(256, 2)`` (<= 128 registers, the default) against one block per SM
  (``MMKERNELS_NORM_CONCAT_BWD_BLOCKS=1``: no spill), each in its own process (read once).
* ``graph_capture``: the first call of every Triton op inside ``torch.cuda.graph`` capture with
  autotuning on (no timing may run there), then a replay, checked against eager.
* ``ragged_tuning``: attention_pool forward over 24 ragged sequence lengths: how many autotune
  keys (each one a timing of every configuration) the run creates, and the seconds it took.
* ``gated_sum_rows``: gated_sum's tuned tile for a tiny first batch and for a large one (the row
  count is part of its autotune key).

Writes one JSON object (``--out``) and prints one line per question.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def _ms(fn) -> float:
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _norm_concat_fwd_bwd_ms(dims, rows, backend="cuda", bwd_only=False) -> float:
    import mmkernels
    xs = [torch.randn(rows, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for d in dims]
    ws = [torch.ones(d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for d in dims]
    bs = [torch.zeros(d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for d in dims]
    dy = torch.randn(rows, sum(dims), device="cuda", dtype=torch.bfloat16)
    with mmkernels.use_backend(backend):
        if bwd_only:
            out = mmkernels.norm_concat(xs, ws, bs)
            return _ms(lambda: torch.autograd.grad(out, xs + ws + bs, dy, retain_graph=True))
        return _ms(lambda: torch.autograd.grad(mmkernels.norm_concat(xs, ws, bs), xs + ws + bs, dy))


def nc_alignment() -> dict:
    return {f"{a}+{b}": _norm_concat_fwd_bwd_ms((a, b), 8192) for a, b in ((4096, 296), (4096, 300))}


def nc_bwd_blocks() -> dict:
    out = {}
    for blocks in ("2", "1"):
        env = dict(os.environ, MMKERNELS_NORM_CONCAT_BWD_BLOCKS=blocks)
        code = ("import sys; sys.path.insert(0, 'benchmarks'); from gpu_risks import _norm_concat_fwd_bwd_ms; "
                "print(_norm_concat_fwd_bwd_ms((768, 1024, 512), 32768, bwd_only=True))")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        out[f"{blocks}_blocks_per_sm_bwd_ms"] = (float(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                                                 else f"failed: {proc.stderr[-300:]}")
    return out


def graph_capture() -> dict:
    import mmkernels
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    xs = [rnd(512, 768), rnd(512, 1024)]
    x, q = rnd(64, 300, 512), rnd(1, 1, 8, 64)
    lengths = torch.randint(0, 301, (64,), device="cuda", generator=g)
    w, b = rnd(256, 1792) * 0.03, rnd(256)
    h_pre, z = rnd(4096, 3, 256), rnd(4096, 3, 256)
    # latent_pool: a SigLIP-base head (196 tokens of width 768, 12 queries); TFN and LMF: three modalities
    tokens, latents = rnd(64, 196, 768), rnd(12, 768)
    token_lengths = torch.randint(0, 197, (64,), device="cuda", generator=g)
    ms = [rnd(512, 64), rnd(512, 16), rnd(512, 16)]
    tw, tb = rnd(64, 65 * 17 * 17) * 0.005, rnd(64)
    fs, rw = [rnd(4, m.shape[1] + 1, 64) * 0.1 for m in ms], rnd(4)
    calls = {
        "norm_concat": lambda: mmkernels.norm_concat(xs),
        "attention_pool": lambda: mmkernels.attention_pool(x, q, lengths),
        "concat_linear": lambda: mmkernels.concat_linear(xs, w, b, "gelu"),
        "gated_sum": lambda: mmkernels.gated_sum(h_pre, z),
        "latent_pool": lambda: mmkernels.latent_pool(tokens, latents, token_lengths),
        "tensor_fusion": lambda: mmkernels.tensor_fusion(ms, tw, tb),
        "low_rank_fusion": lambda: mmkernels.low_rank_fusion(ms, fs, rw, tb),
    }
    result = {}
    with mmkernels.use_backend("triton"):
        for name, fn in calls.items():
            try:
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    with torch.cuda.graph(graph, stream=stream):
                        out = fn()           # first call of this shape: inside the capture
                graph.replay()
                torch.cuda.synchronize()
                ref = fn()
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
                result[name] = f"ok (max rel err vs eager {err:.2e})"
            except Exception as exc:  # reported, not raised: every op gets its line
                result[name] = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
    return result


def ragged_tuning() -> dict:
    import mmkernels
    from mmkernels.ops.attention_pool import triton as tri
    lengths = torch.Generator().manual_seed(0)
    ls = torch.randint(40, 1500, (24,), generator=lengths).tolist()
    q = torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    before = len(tri._attn_pool_fwd_tuned.cache)
    t0 = time.perf_counter()
    with mmkernels.use_backend("triton"):
        for L in ls:
            mmkernels.attention_pool(torch.randn(32, L, 1024, device="cuda", dtype=torch.bfloat16), q)
    torch.cuda.synchronize()
    return {"lengths": len(ls), "new_autotune_keys": len(tri._attn_pool_fwd_tuned.cache) - before,
            "seconds": round(time.perf_counter() - t0, 2)}


def gated_sum_rows() -> dict:
    import mmkernels
    from mmkernels.ops.gated_sum import triton as tri
    out = {}
    with mmkernels.use_backend("triton"):
        for rows in (16, 65536):
            h = torch.randn(rows, 3, 512, device="cuda", dtype=torch.bfloat16)
            mmkernels.gated_sum(h, torch.randn_like(h))
            out[f"rows{rows}"] = str(tri._gated_sum_fwd_tuned.best_config)
            out[f"rows{rows}_ms"] = _ms(lambda: mmkernels.gated_sum(h, h))
    return out


QUESTIONS = {"graph_capture": graph_capture, "nc_alignment": nc_alignment, "nc_bwd_blocks": nc_bwd_blocks,
             "ragged_tuning": ragged_tuning, "gated_sum_rows": gated_sum_rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/risks.json")
    ap.add_argument("--only", action="append", choices=sorted(QUESTIONS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_risks: needs a CUDA GPU")
        return 2
    results, failed = {}, False
    for name in args.only or QUESTIONS:
        try:
            results[name] = QUESTIONS[name]()
        except Exception as exc:
            results[name] = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
        failed = failed or "FAILED" in json.dumps(results[name])
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
