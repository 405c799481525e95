"""Facts about this process that every backend needs: is Triton importable, is it interpreting,
and one launch helper through which every Triton kernel of the package is started (so the
sm_90 ahead-of-time test can capture each launch and compile it for Hopper)."""
from __future__ import annotations

import contextlib
import os
import types
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


def triton_why_not(tensors, explicit: bool) -> Optional[str]:
    """What every Triton backend cannot declare (dtypes and devices are declared capabilities):
    is Triton importable, and does this process run kernels for these tensors' device."""
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    t0 = tensors[0]
    if t0.device.type == "cuda" and TRITON_INTERPRET:
        return "TRITON_INTERPRET=1 was set before import: kernels are interpreted, CUDA tensors are not served"
    if t0.device.type == "cpu":
        if not TRITON_INTERPRET:
            return "CPU tensors need TRITON_INTERPRET=1 set before import (the Triton interpreter)"
        if not explicit:
            return "CPU tensors run under the Triton interpreter only when 'triton' is requested by name"
    return None


def _device_of(args) -> Optional[torch.device]:
    """The device of the first tensor (or TMA descriptor's tensor) among a launch's arguments."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        base = getattr(a, "base", None)  # a host TensorDescriptor
        if isinstance(base, torch.Tensor):
            return base.device
        if isinstance(a, tuple):
            d = _device_of(a)
            if d is not None:
                return d
    return None


def _on_device(args):
    """A context that makes the arguments' GPU the current one: Triton launches (and autotunes,
    and fills TMA descriptors) on ``torch.cuda.current_device()`` and its current stream, not on
    the tensors' device. A no-op when that device is already current (the common case)."""
    dev = _device_of(args)
    if dev is None or dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def launch(kernel, grid, *args, **meta) -> None:
    """Start ``kernel[grid](*args, **meta)`` on the GPU that holds its tensors, or record it while
    :func:`capture_launches` is active."""
    if _capture is not None:
        _capture.append((kernel, args, meta))
        return
    with _on_device(args):
        kernel[grid](*args, **meta)


def tuning_key(tuned, args: tuple, consts: dict) -> tuple:
    """The key under which Triton's autotuner caches its choice for these arguments (its own rule:
    the named key arguments, then the dtypes of every argument that has one)."""
    named = {**dict(zip(tuned.arg_names, args)), **consts}
    named = {k: v for k, v in named.items() if k in tuned.arg_names}
    key = [named[k] for k in tuned.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def untuned_config(tuned, args: tuple, consts: dict, fallback=None):
    """The configuration launched without timing: ``fallback`` when given, else the first of the
    kernel's ``untuned_configs`` (default: its autotune configurations) that its pruning keeps,
    the pruning told ``UNTUNED=True``."""
    if fallback is not None:
        return fallback
    configs = getattr(tuned, "untuned_configs", tuned.configs)
    prune = tuned.early_config_prune
    return (prune(configs, dict(zip(tuned.arg_names, args)), UNTUNED=True, **consts) if prune else configs)[0]


def _capturing_graph() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launch_tuned(tuned, grid, args: tuple, consts: dict, fallback=None) -> None:
    """Launch a ``triton.autotune`` kernel: the one place where "autotuning off" is decided, for
    every op.

    * On a GPU with autotuning on: through the autotuner, which times its pruned configurations
      once per key — except under CUDA-graph capture, where timing would sync: there the cached
      choice for this key if there is one, else the untuned configuration.
    * The interpreter or ``MMKERNELS_AUTOTUNE=0``: the untuned configuration
      (:func:`untuned_config`), its pre-hook applied, launched on the plain kernel, no timing.

    While :func:`capture_launches` records (the sm_90 compile), the untuned launch is recorded
    beside the tuned one, so both paths' configurations are compiled."""
    tuning = AUTOTUNE and not TRITON_INTERPRET
    if tuning and _capture is None and _capturing_graph() and tuning_key(tuned, args, consts) not in tuned.cache:
        tuning = False
    if tuning:
        launch(tuned, grid, *args, **consts)
        if _capture is None:
            return
    config = untuned_config(tuned, args, consts, fallback)
    if _capture is not None:  # recorded as a one-configuration kernel: the compile applies its pre-hook
        _capture.append((types.SimpleNamespace(fn=tuned.fn, arg_names=tuned.arg_names, configs=[config],
                                               early_config_prune=None), args, consts))
        return
    meta = {k: v for k, v in config.all_kwargs().items() if v is not None}
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(tuned.arg_names, args)), **consts, **meta})
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


def tune_bucket(n: int, lo: int, hi: int) -> int:
    """An autotune-key bucket for a size that varies from call to call (sequence length, rows):
    the next power of 4, clamped to ``[lo, hi]``. Few buckets, so ragged batches do not re-tune
    (each new bucket times every configuration once, with device syncs)."""
    b = lo
    while b < min(int(n), hi):
        b *= 4
    return min(b, hi)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter / AOT capture: a handful of programs exercises the persistent loop


def aot_compile(kernel, args: tuple, meta: dict, arch: int = 90, return_bound: bool = False):
    """Compile one captured launch for ``sm_{arch}`` without a GPU, specialising exactly as the JIT
    would on a device (Triton's own binder decides types, constexprs and 16-byte alignment).
    ``return_bound``: also return the argument values the JIT would hand the launcher."""
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
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    return (compiled, tuple(bound.values())) if return_bound else compiled


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
