"""Worker of tests/test_launch.py, run without ``TRITON_INTERPRET`` (plain ``@triton.jit`` kernels,
as on a GPU): drives :func:`mmkernels.runtime.launch` down its GPU route with CPU tensors. The
seams stand in for the GPU: the device type, Triton's compile target (sm_90), the current device and
stream, and ``JITFunction.run`` — a fake that "compiles" once per key of Triton's own cache
(``compute_cache_key`` over the real binder's specialization) and records each launch, as the real
one would. Prints one JSON object of observations."""
import json
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime import jit as tjit

from mmkernels import runtime


@triton.jit
def scale_kernel(X, Y, n, stride, s, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(X + i * stride, mask=i < n)
    if FLAG:
        v = v * s
    tl.store(Y + i, v, mask=i < n)


@triton.jit
def other_kernel(X, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, tl.load(X + i, mask=i < n) + 1, mask=i < n)


class FakeCompiled:
    """What a compiled kernel offers a plan: its launcher, function handle and packed metadata."""

    def __init__(self, name, key, signature, log):
        self.name, self.key, self.log = name, key, log
        self.function, self.packed_metadata = f"fn:{name}:{len(log['compiles'])}", ("meta", key)
        self.src = type("Src", (), {"signature": signature})()

    def run(self, *args):  # the launcher's protocol: grid, stream, function, metadata, hooks, arguments
        self.log["prepared"].append([self.name, self.key, list(args[:4]), repr(args[4:9]), _plain(args[9:])])


def _plain(values):
    return [f"tensor:{v.dtype}:{v.data_ptr() % 16 == 0}" if isinstance(v, torch.Tensor) else v for v in values]


BINDERS = {}


def triton_key(fn, args, meta):
    """The key of Triton's compile cache for this launch."""
    _, spec, options = BINDERS[fn](*args, **meta)
    return tjit.compute_cache_key({}, spec, options)


def install_fakes(log):
    """The GPU stand-ins: every CPU tensor takes the GPU route on a fake sm_90."""
    target = GPUTarget("cuda", 90, 32)
    runtime._device_type = lambda dev: "cuda"
    runtime._target = lambda index: target
    runtime._current_device = lambda: log["current"]
    runtime._current_stream = lambda index: 1000 + index
    runtime._gpu_identity = lambda index: ("Fake GPU", (9, 0))   # measured nowhere: "auto" is "prepared"
    runtime._on_device = lambda args: __import__("contextlib").nullcontext()
    backend = make_backend(target)
    for fn in (scale_kernel, other_kernel):
        binder = BINDERS[fn] = tjit.create_function_from_signature(fn.signature, fn.params, backend)
        cache = {}

        def fake_run(*args, grid, warmup, _fn=fn, _binder=binder, _cache=cache, **meta):
            bound, spec, options = _binder(*args, **meta)
            key = tjit.compute_cache_key({}, spec, options)       # Triton's own cache key
            if key not in _cache:
                log["compiles"].append([_fn.__name__, key])
                sig = {name: ty for name, (ty, _) in zip(bound, spec)}
                _cache[key] = FakeCompiled(_fn.__name__, key, sig, log)
            g = grid(bound) if callable(grid) else grid
            log["jit"].append([_fn.__name__, key, list(g), _plain(bound.values())])
            return _cache[key]
        fn.run = fake_run


def main():
    log = {"compiles": [], "jit": [], "prepared": [], "current": 0}
    install_fakes(log)
    x = torch.randn(64)
    y = torch.empty(64)
    grid = lambda meta: (triton.cdiv(64, meta["BLOCK"]),)  # noqa: E731
    out = {}

    def run(label, *args, kernel=scale_kernel, g=grid, **meta):
        before = {k: len(log[k]) for k in ("compiles", "jit", "prepared")}
        runtime.launch(kernel, g, *args, **meta)
        out[label] = {k: len(log[k]) - before[k] for k in before}
        out[label]["last_prepared"] = log["prepared"][-1] if out[label]["prepared"] else None
        out[label]["last_jit"] = log["jit"][-1] if out[label]["jit"] else None
        ran = (log["prepared"][-1] if out[label]["prepared"] else log["jit"][-1])[1]
        out[label]["ran_the_kernel_triton_would"] = ran == triton_key(kernel, args, meta)

    run("first", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    run("repeat", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    run("repeat, other float", x, y, 64, 3, 5.0, BLOCK=64, FLAG=True)
    run("repeat, other int of the same kind", x, y, 48, 5, 2.0, BLOCK=64, FLAG=True)
    run("dtype", x.half(), y.half(), 64, 3, 2.0, BLOCK=64, FLAG=True)
    run("alignment", x[1:], y, 63, 3, 2.0, BLOCK=64, FLAG=True)
    run("int equal to 1 (a stride of 1)", x, y, 64, 1, 2.0, BLOCK=64, FLAG=True)
    run("int divisible by 16", x, y, 64, 32, 2.0, BLOCK=64, FLAG=True)
    run("64-bit int", x, y, 64, 2 ** 33 + 3, 2.0, BLOCK=64, FLAG=True)
    run("constexpr", x, y, 64, 3, 2.0, BLOCK=32, FLAG=True)
    run("constexpr flag", x, y, 64, 3, 2.0, BLOCK=64, FLAG=False)
    run("constexpr of another type", x, y, 64, 3, 2.0, BLOCK=64, FLAG=1)      # equal to True, hashes alike
    run("launch option", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True, num_warps=8)
    run("launch option, repeat", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True, num_warps=8)
    run("other kernel, same arguments' kinds", x, 64, kernel=other_kernel, BLOCK=64)
    run("other kernel, repeat", x, 64, kernel=other_kernel, BLOCK=64)
    run("grid as a tuple", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True, g=(5, 2))

    real_device_of = runtime._device_of
    runtime._device_of = lambda args: torch.device("cuda", 1)
    log["current"] = 1
    run("another GPU", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    run("another GPU, repeat", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    out["another GPU, repeat"]["stream"] = log["prepared"][-1][2][3]
    runtime._device_of = real_device_of
    log["current"] = 0

    from triton import knobs
    knobs.runtime.launch_enter_hook.add(lambda metadata: None)
    run("launch hook installed", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    knobs.runtime.launch_enter_hook.calls.clear()
    run("hook removed", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)

    runtime.set_launch_mode("jit")
    run("jit mode", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    run("jit mode, repeat", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    runtime.set_launch_mode("prepared")
    run("prepared again", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    with runtime.use_launch_mode("jit"):
        run("jit mode for a block", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    run("after the block", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    out["plans"] = {f"{fn.__name__}@{index}": len(table) for (fn, index), table in runtime._tables.items()}
    runtime.reset_plans()
    run("after reset_plans", x, y, 64, 3, 2.0, BLOCK=64, FLAG=True)
    out["plans after reset"] = {f"{fn.__name__}@{index}": len(table) for (fn, index), table in runtime._tables.items()}
    out["stats"] = dict(runtime.stats)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
