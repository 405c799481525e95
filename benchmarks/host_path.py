"""The Triton backend's GPU call path, timed on a CPU: host µs per call of each op's tiny case with
every Triton launch ending in a launcher that does nothing — what the Python around the kernels
costs (checks, dispatch, autograd, output allocation, launches up to the driver), beside the plain
PyTorch composition on the same CPU tensors. The driver's own part of a launch (a few µs on a GPU)
and the device kernels' launches of torch ops are not in these figures; on a GPU each torch op
around the kernels costs a launch more.

    python benchmarks/host_path.py [op ...]      # every op by default; run without TRITON_INTERPRET

The GPU stand-ins (all in this file): CPU tensors take the GPU route (``runtime._device_type``), a
driver object answers Triton's device, stream and target questions (sm_90), and a compile returns a
kernel whose launcher does nothing (``JITFunction._do_compile`` replaced): ``JITFunction.run``,
the autotuner's choice and the prepared launches run as they would on a GPU up to the launcher.
Autotuning is off (``MMKERNELS_AUTOTUNE=0``: the heuristic configuration, as the GPU check's
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
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as tjit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return TARGET


class _Compiled:
    """A compiled kernel whose launcher does nothing."""
    packed_metadata = None

    def __init__(self, signature):
        self.function = 1
        self.src = type("Src", (), {"signature": signature})

    def run(self, *args):
        return None

    def launch_metadata(self, grid, stream, *args):
        return None


def install() -> None:
    """Route CPU tensors down the GPU path of the Triton backend, launches ending in no-ops."""
    from mmkernels import runtime
    triton.runtime.driver.set_active(_Driver())

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = self.device_caches[device][0][key] = _Compiled(signature)
        return kernel
    tjit.JITFunction._do_compile = fake_compile
    runtime._device_type = lambda dev: "cuda"
    runtime._target = lambda index: TARGET
    runtime._current_device = lambda: 0
    runtime._current_stream = lambda index: 0
    runtime._on_device = lambda args: __import__("contextlib").nullcontext()
    import importlib

    from mmkernels.ops import OPS
    for name in OPS:   # the Triton backend takes CPU tensors here as it takes GPU tensors
        try:
            mod = importlib.import_module(f"mmkernels.ops.{name}.triton")
        except ImportError:
            continue
        if hasattr(mod, "triton_why_not"):
            mod.triton_why_not = lambda tensors, explicit: None


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ops", nargs="*")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    install()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import per_call
    providers = ["triton@jit", "triton@prepared"]
    print(f"{'op':16s} {'case':32s} {'mode':8s} {'plain':>12s} {'triton, jit':>12s} {'prepared':>10s} {'x plain':>8s}"
          "   µs per call, launches ending in no-ops")
    for name, case, r in per_call.tables(a.ops, "overhead", (), providers, "cpu", a.rounds, skip_failing=True):
        for mode, t in r.items():
            plain = min((p for p in t if p in per_call.PLAIN), key=t.get)
            cells = [f"{t[p] * 1e3:12.1f}" if p in t else f"{'n/a':>12s}" for p in providers]
            ratio = t["triton@prepared"] / t[plain] if "triton@prepared" in t else float("nan")
            print(f"{name:16s} {case:32s} {mode:8s} {t[plain] * 1e3:12.1f} {cells[0]} {cells[1]:>10s} {ratio:8.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
