"""Per-call cost on a CPU: every op's tiny case (tagged ``overhead``), ``auto`` (what users get: the
CPU path, arguments checked) against the plain composition (``eager``; SDPA for attention_pool),
forward without grad and forward+backward, fp32, one thread. µs per call, the best of 7 rounds of
interleaved calls (the best round is the least disturbed by the rest of the machine).

    python benchmarks/per_call.py [op ...]
"""
from __future__ import annotations

import sys
import time

import torch


def _best_us(f, n: int, rounds: int = 7) -> float:
    for _ in range(20):
        f()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def measure(spec, case, provider: str):
    inp = spec.make_inputs(case, torch.float32, "cpu")
    f = spec.providers[provider]
    for leaf in inp.leaves:
        leaf.requires_grad_(False)
    fwd = _best_us(lambda: f(*inp.args), 300)
    for leaf in inp.leaves:
        leaf.requires_grad_(True)

    def fwd_bwd():
        out = f(*inp.args)
        (out[0] if isinstance(out, tuple) else out).backward(inp.grad_out)
    return fwd, _best_us(fwd_bwd, 100)


def main(argv=None) -> int:
    from mmkernels.ops import bench_specs
    torch.set_num_threads(1)
    specs = bench_specs()
    names = (argv if argv is not None else sys.argv[1:]) or list(specs)
    print(f"{'op':16s} {'case':30s} {'base':6s} {'fwd base':>9s} {'fwd auto':>9s} {'+':>6s} "
          f"{'f+b base':>9s} {'f+b auto':>9s} {'+':>6s}")
    for name in names:
        spec = specs[name]
        base = "sdpa" if "sdpa" in spec.providers else "eager"
        for case in spec.cases:
            if "overhead" not in case.tags:
                continue
            (bf, bb), (af, ab) = measure(spec, case, base), measure(spec, case, "auto")
            print(f"{name:16s} {case.name:30s} {base:6s} {bf:9.1f} {af:9.1f} {af - bf:+6.1f} "
                  f"{bb:9.1f} {ab:9.1f} {ab - bb:+6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
