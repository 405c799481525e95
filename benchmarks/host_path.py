"""The Triton backend's GPU call path, timed on a CPU: host µs per call of each op's tiny case with
every Triton launch ending in a launcher that does nothing — what the Python around the kernels
costs (checks, dispatch, autograd, output allocation, launches up to the driver), beside the plain
PyTorch composition on the same CPU tensors. The driver's own part of a launch (a few µs on a GPU)
and the device kernels' launches of torch ops are not in these figures; on a GPU each torch op
around the kernels costs a launch more.

    python benchmarks/host_path.py [op ...]      # every op by default; run without TRITON_INTERPRET

The GPU stand-ins are those of ``benchmarks/gpu_standins.py``. Autotuning is off (``MMKERNELS_AUTOTUNE=0``: the heuristic configuration, as the GPU check's
``per_call`` step runs).
"""
from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("host_path.py: run without TRITON_INTERPRET (it times the GPU route of the kernels)")
os.environ["MMKERNELS_AUTOTUNE"] = "0"
os.environ.setdefault("MMKERNELS_CUDA_EMULATE", "0")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_standins  # noqa: E402


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ops", nargs="*")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    gpu_standins.install()
    import per_call
    providers = ["triton@jit", "triton@unplanned", "triton@prepared"]
    print(f"{'op':16s} {'case':32s} {'mode':8s} {'plain':>12s} {'triton, jit':>12s} {'unplanned':>10s} {'planned':>10s} "
          f"{'x plain':>8s}   µs per call, launches ending in no-ops; planned: prepared launches and call plans")
    for name, case, r in per_call.tables(a.ops, "overhead", (), providers, "cpu", a.rounds, skip_failing=True):
        for mode, t in r.items():
            plain = min((p for p in t if p in per_call.PLAIN), key=t.get)
            cells = [f"{t[p] * 1e3:10.1f}" if p in t else f"{'n/a':>10s}" for p in providers]
            ratio = t["triton@prepared"] / t[plain] if "triton@prepared" in t else float("nan")
            print(f"{name:16s} {case:32s} {mode:8s} {t[plain] * 1e3:12.1f} {cells[0]} {cells[1]:>10s} {cells[2]:>10s} "
                  f"{ratio:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
