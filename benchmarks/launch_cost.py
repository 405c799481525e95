"""Host time of one Triton launch on the Python side, without a GPU: Triton's ``JITFunction.run``
against a prepared launch (:mod:`mmkernels.runtime`), both ending in a launcher that does nothing —
so the figures are what each path costs before the driver is reached (the driver's own part, the
same for both, is left out).

    python benchmarks/launch_cost.py            # gated_sum's forward kernel (24 arguments) and a 3-argument one

The GPU stand-ins are those of ``benchmarks/gpu_standins.py``: ``JITFunction.run`` takes its
cache-hit path exactly as on a GPU. Run without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("launch_cost.py: run without TRITON_INTERPRET (it times plain @triton.jit kernels)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_standins  # noqa: E402

from mmkernels import runtime  # noqa: E402
from mmkernels.ops.gated_sum import triton as gs  # noqa: E402


@triton.jit
def _small_kernel(X, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, 1.0, mask=i < n)


def _per_call_us(f, n=20000) -> float:
    for _ in range(200):
        f()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    gpu_standins.install()

    rows, m, h = 64, 3, 128
    hp, z = torch.randn(rows, m, h), torch.randn(rows, m, h)
    out = torch.empty(rows, h)
    _, _, _, _, gargs, consts, _ = gs._common(hp, z, None)
    gargs = (*gargs, out, out.stride(0), rows, h, 128, 1024)
    gmeta = dict(consts, M=m, OFF64=False, ROWS=4, BLOCK_H=128, num_warps=4)
    ggrid = (16, 1)
    cases = {
        "gated_sum fwd kernel (24 arguments)": (gs._gated_sum_fwd_kernel, ggrid, gargs, gmeta),
        "3-argument kernel": (_small_kernel, (1,), (out, 64), dict(BLOCK=64)),
    }
    print(f"{'kernel':40s} {'JITFunction.run':>16s} {'prepared':>10s}   µs per launch, Python side")
    for label, (fn, grid, args, meta) in cases.items():
        fn[grid](*args, **meta)                          # compiles (a no-op kernel) into Triton's own cache
        jit = _per_call_us(lambda: fn[grid](*args, **meta))
        runtime.set_launch_mode("prepared")
        runtime.reset_plans()
        runtime.launch(fn, grid, *args, **meta)          # the first launch makes the plan
        prepared = _per_call_us(lambda: runtime.launch(fn, grid, *args, **meta))
        assert runtime.stats.get("prepared") == 1, runtime.stats
        print(f"{label:40s} {jit:16.2f} {prepared:10.2f}")


if __name__ == "__main__":
    main()
