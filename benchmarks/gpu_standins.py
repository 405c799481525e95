"""Stand-ins for a GPU, so that the Triton backend's GPU call path runs on a CPU up to the launcher
(benchmarks/host_path.py, benchmarks/launch_cost.py): CPU tensors take the GPU route
(``runtime._device_type``), a driver object answers Triton's device, stream and target questions
(sm_90), and a compile returns a kernel whose launcher does nothing (``JITFunction._do_compile``
replaced), so ``JITFunction.run``, the autotuner's choice and the prepared launches run as they
would on a GPU until the driver is reached. Import before anything runs a kernel; run without
``TRITON_INTERPRET``."""
from __future__ import annotations

import contextlib
import importlib

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit as tjit

TARGET = GPUTarget("cuda", 90, 32)


class Driver:
    """Answers what ``JITFunction.run`` asks the active driver."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return TARGET


class Compiled:
    """A compiled kernel whose launcher does nothing."""
    packed_metadata = None

    def __init__(self, signature=None):
        self.function = 1
        self.src = type("Src", (), {"signature": dict(signature or {})})

    def run(self, *args):
        return None

    def launch_metadata(self, grid, stream, *args):
        return None


def install() -> None:
    """Route CPU tensors down the GPU path of the Triton backend, launches ending in no-ops."""
    from mmkernels import runtime
    from mmkernels.ops import OPS
    triton.runtime.driver.set_active(Driver())

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = self.device_caches[device][0][key] = Compiled(signature)
        return kernel
    tjit.JITFunction._do_compile = fake_compile
    runtime._device_type = lambda dev: "cuda"
    runtime._target = lambda index: TARGET
    runtime._current_device = lambda: 0
    runtime._current_stream = lambda index: 0
    runtime._gpu_identity = lambda index: ("CPU standing in for a GPU", (9, 0))
    runtime._on_device = lambda args: contextlib.nullcontext()
    for name in OPS:   # the Triton backend takes CPU tensors here as it takes GPU tensors
        try:
            mod = importlib.import_module(f"mmkernels.ops.{name}.triton")
        except ImportError:
            continue
        if hasattr(mod, "triton_why_not"):
            mod.triton_why_not = lambda tensors, explicit: None
