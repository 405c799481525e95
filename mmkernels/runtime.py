"""Facts about this process that every backend needs: is Triton importable, is it interpreting,
and one launch helper through which every Triton kernel of the package is started (so the
sm_90 ahead-of-time test can capture each launch and compile it for Hopper)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, List, Optional, Tuple

import torch

try:  # Triton is a Linux-only dependency; the reference backend works without it.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the platform
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Triton decides at decoration time whether @triton.jit kernels are interpreted, from this variable.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# MMKERNELS_AUTOTUNE=0: every kernel uses its heuristic launch configuration instead of an autotuned
# search (fast start, e.g. test runs on a GPU); read at import. The interpreter never autotunes.
AUTOTUNE = os.environ.get("MMKERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no")

_capture: Optional[List[Tuple[object, tuple, dict]]] = None


def triton_why_not(tensors, explicit: bool, dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> Optional[str]:
    """Common part of every Triton backend's ``why_not``: availability, device, dtype."""
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    t0 = tensors[0]
    if t0.dtype not in dtypes:
        return f"dtype {t0.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    if t0.device.type == "cuda":
        if TRITON_INTERPRET:
            return "TRITON_INTERPRET=1 was set before import: kernels are interpreted, CUDA tensors are not served"
        return None
    if t0.device.type == "cpu":
        if not TRITON_INTERPRET:
            return "CPU tensors need TRITON_INTERPRET=1 set before import (the Triton interpreter)"
        if not explicit:
            return "CPU tensors run under the Triton interpreter only when 'triton' is requested by name"
        return None
    return f"device type {t0.device.type!r} is not supported"


def launch(kernel, grid, *args, **meta) -> None:
    """Start ``kernel[grid](*args, **meta)``, or record it while :func:`capture_launches` is active."""
    if _capture is not None:
        _capture.append((kernel, args, meta))
        return
    kernel[grid](*args, **meta)


def launch_tuned(tuned, grid, args: tuple, consts: dict, fallback=None) -> None:
    """Launch a ``triton.autotune`` kernel. On a GPU with autotuning on: through the autotuner
    (which times its pruned configurations once per key). Otherwise — the interpreter, or
    ``MMKERNELS_AUTOTUNE=0`` — with no timing: the ``fallback`` configuration when given, else the
    first one the autotuner's pruning keeps for these arguments; its pre-hook applied, launched on
    the plain kernel. The one place where "autotuning off" is decided, for every op."""
    if AUTOTUNE and not TRITON_INTERPRET:
        launch(tuned, grid, *args, **consts)
        return
    named = dict(zip(tuned.arg_names, args))
    if fallback is None:
        prune = tuned.early_config_prune
        fallback = (prune(tuned.configs, named, **consts) if prune else tuned.configs)[0]
    meta = {k: v for k, v in fallback.all_kwargs().items() if v is not None}
    if fallback.pre_hook is not None:
        fallback.pre_hook({**named, **consts, **meta})
    launch(tuned.fn, grid, *args, **consts, **meta)


@contextlib.contextmanager
def capture_launches() -> Iterator[List[Tuple[object, tuple, dict]]]:
    """Record instead of run every :func:`launch` in the block (used by the sm_90 AOT compile)."""
    global _capture
    previous, _capture = _capture, []
    try:
        yield _capture
    finally:
        _capture = previous


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter / AOT capture: a handful of programs exercises the persistent loop


def aot_compile(kernel, args: tuple, meta: dict, arch: int = 90):
    """Compile one captured launch for ``sm_{arch}`` without a GPU, specialising exactly as the JIT
    would on a device (Triton's own binder decides types, constexprs and 16-byte alignment)."""
    import triton
    from triton._utils import find_paths_if, get_iterable_path
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = kernel
    while not isinstance(fn, JITFunction):  # unwrap autotuners / heuristics
        fn = fn.fn
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **meta)
    sigvals = [s[0] for s in specialization]
    signature = dict(zip([p.name for p in fn.params], sigvals))
    cpaths = find_paths_if(sigvals, lambda _, v: v == "constexpr")
    constexprs = {p: get_iterable_path(list(bound.values()), p) for p in cpaths}
    attrvals = [s[1] for s in specialization]
    apaths = find_paths_if(attrvals, lambda _, v: isinstance(v, str))
    attrs = {p: backend.parse_attr(get_iterable_path(attrvals, p)) for p in apaths}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def kernels_of(module) -> List[Callable]:
    """Every @triton.jit kernel defined in ``module`` (for the generic AOT test's coverage check).
    Convention: launched kernels are named ``*_kernel``; other jit functions are device helpers."""
    if not HAS_TRITON:
        return []
    from triton.runtime.jit import JITFunction
    from triton.runtime.interpreter import InterpretedFunction
    return [v for v in vars(module).values()
            if isinstance(v, (JITFunction, InterpretedFunction)) and v.fn.__module__ == module.__name__
            and v.fn.__name__.endswith("_kernel")]
