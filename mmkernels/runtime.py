"""Facts about this process that every backend needs: is Triton importable, is it interpreting,
and one launch helper through which every Triton kernel of the package is started (so the
ahead-of-time test can capture each launch and compile it for every GPU target), and the
per-chip limits the kernels' configurations are chosen by."""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import types
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from . import plans as _plans

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
if HAS_TRITON and TRITON_INTERPRET:  # Triton 3.9's interpreter refuses integer masks (_compat_triton)
    from ._compat_triton import interpreter_mask_dtypes
    interpreter_mask_dtypes()

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


def _device_type(device: torch.device) -> str:
    """``device.type`` (a seam the tests use to take the GPU route with CPU tensors)."""
    return device.type


def _on_device(args):
    """A context that makes the arguments' GPU the current one: Triton launches (and autotunes,
    and fills TMA descriptors) on ``torch.cuda.current_device()`` and its current stream, not on
    the tensors' device. A no-op when that device is already current (the common case)."""
    dev = _device_of(args)
    if dev is None or dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


# --- prepared launches -----------------------------------------------------------------------------
#
# A launch through ``kernel[grid](...)`` runs Triton's ``JITFunction.run`` every time: device and
# stream lookups, the binder, a string cache key, launch metadata for the (empty) hook chain, the
# hooks. After the first launch of a specialization none of that can change the result, so
# :func:`launch` keeps, per kernel and device, a **plan** per specialization — the compiled kernel
# and its launcher, looked up by Triton's own specialization of the arguments (its binder: dtypes,
# 16-byte alignment of pointers, integers equal to 1 or divisible by 16, 32/64-bit integers,
# constexprs, launch options) — and starts it directly:
#
#   "prepared"  the compiled kernel's own launcher with no launch hooks (what ``JITFunction.run``
#               calls last); host TMA descriptors encoded once per (pointer, shape, strides, box);
#   "static"    torch inductor's static CUDA launcher where it takes the kernel (no TMA
#               descriptor, no scratch, one CTA), else "prepared";
#   "jit"       every launch through ``JITFunction.run`` (Triton's own path, no plans).
#
# ``MMKERNELS_LAUNCH`` (read at import) or :func:`set_launch_mode` chooses; the default, "auto",
# takes per GPU the mode the GPU check's ``per_call`` step measured fastest there (``record`` writes
# it to ``launch_table.json``, by GPU name and chip class), else "prepared". A call whose
# specialization has no plan yet, or made while launch hooks are installed (a profiler), goes
# through ``JITFunction.run``, which compiles if needed; the plan is made from the kernel it
# returns. Installed Triton versions whose launch protocol differs from the one plans call
# (:func:`launch_protocol_reason`) get "jit" everywhere.

LAUNCH_MODES = ("prepared", "static", "jit")
_JIT_MODE = "jit"
_AUTO_MODE = "auto"
LAUNCH_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_table.json")
_mode: str = os.environ.get("MMKERNELS_LAUNCH", _AUTO_MODE).strip().lower() or _AUTO_MODE
if _mode not in LAUNCH_MODES + (_AUTO_MODE,):
    raise ValueError(f"environment variable MMKERNELS_LAUNCH: expected one of auto, {', '.join(LAUNCH_MODES)}, "
                     f"got {_mode!r}")
_mode = sys.intern(_mode)
_device_modes: Dict[int, str] = {}   # GPU index -> the measured mode ("auto"), looked up once
_JITFunction = None
if HAS_TRITON and not TRITON_INTERPRET:
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction

# (kernel, device index) -> _Plans, one such dict per launch mode (plans differ between modes)
_by_mode: Dict[str, Dict[Tuple[object, int], "_Plans"]] = {m: {} for m in LAUNCH_MODES}
_tables = _by_mode.get(_mode, _by_mode["prepared"])
# how plans were made: counters for the GPU check and the tests
stats: Dict[str, int] = {}
refusals: Dict[str, str] = {}    # kernel name -> why the static launcher did not take it


def launch_mode() -> str:
    """How launches after the first of a specialization reach the driver: one of
    :data:`LAUNCH_MODES`, or ``"auto"`` (per GPU, the measured one: :func:`measured_launch_mode`)."""
    return _mode


def set_launch_mode(mode: str) -> None:
    """Choose the launch mode for every later launch (each mode keeps its own plans)."""
    global _mode, _tables
    if mode not in LAUNCH_MODES + (_AUTO_MODE,):
        raise ValueError(f"launch mode: expected one of auto, {', '.join(LAUNCH_MODES)}, got {mode!r}")
    _mode = sys.intern(mode)
    _tables = _by_mode.get(_mode, _by_mode["prepared"])


def _gpu_identity(index: int):
    """``(name, (major, minor))`` of GPU ``index`` (a seam the tests replace)."""
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def gpu_keys(index: int) -> Tuple[str, str]:
    """The keys under which the measured per-GPU tables (launch modes, kernel candidates) file GPU
    ``index``: its model's name and ``"class:<chip class>"``."""
    from .cuda.dispatch import gpu_class
    name, capability = _gpu_identity(index)
    return name, f"class:{gpu_class(*capability)}"


def read_table(path: str, section: str) -> Dict:
    """``section`` of the JSON table at ``path``; empty when the file is missing or unreadable."""
    import json
    try:
        with open(path) as f:
            return json.load(f).get(section, {})
    except (OSError, ValueError):
        return {}


def measured_launch_mode(index: int) -> str:
    """The launch mode the GPU check measured fastest on GPU ``index``'s model (else on its chip
    class), from :data:`LAUNCH_TABLE`; ``"prepared"`` where nothing was measured."""
    modes = read_table(LAUNCH_TABLE, "modes")
    name, chip_class = gpu_keys(index)
    got = modes.get(name) or modes.get(chip_class) or "prepared"
    return got if got in LAUNCH_MODES else "prepared"


def _mode_for(index: int) -> str:
    mode = _device_modes.get(index)
    if mode is None:
        mode = _device_modes[index] = sys.intern(measured_launch_mode(index))
    return mode


@contextlib.contextmanager
def use_launch_mode(mode: str) -> Iterator[None]:
    """``with runtime.use_launch_mode("jit"): ...`` — another launch mode inside the block only."""
    previous = _mode
    set_launch_mode(mode)
    try:
        yield
    finally:
        set_launch_mode(previous)


def reset_plans() -> None:
    """Forget every plan of every mode and the measured modes looked up (the next launch of each
    specialization goes through ``JITFunction.run``)."""
    for tables in _by_mode.values():
        tables.clear()
    _plans.forget()
    _device_modes.clear()
    stats.clear()
    refusals.clear()


_PROTOCOL = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
             "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())")
_protocol_checked: List[Optional[str]] = []


def launch_protocol_reason() -> Optional[str]:
    """``None`` where the installed Triton launches a compiled kernel the way a plan does (checked
    once, in the source of ``JITFunction.run``: the launcher's argument list, the binder's), else
    why plans are not made (every launch then goes through ``JITFunction.run``)."""
    if not _protocol_checked:
        reason = None
        try:
            import inspect

            from triton.runtime import jit
            src = " ".join(inspect.getsource(jit.JITFunction.run).split())
            if _PROTOCOL not in src:
                reason = "JITFunction.run calls the compiled kernel with another argument list"
            elif "bound_args, specialization, options = binder(*args, **kwargs)" not in src:
                reason = "JITFunction.run binds its arguments another way"
            elif not hasattr(jit, "create_function_from_signature"):
                reason = "triton.runtime.jit has no create_function_from_signature"
        except Exception as exc:  # pragma: no cover - depends on the installed Triton
            reason = f"{type(exc).__name__}: {exc}"
        _protocol_checked.append(reason)
    return _protocol_checked[0]


def _target(index: int):
    """Triton's compile target for GPU ``index`` (a seam the tests replace)."""
    import triton
    with torch.cuda.device(index):
        return triton.runtime.driver.active.get_current_target()


class _Plans(dict):
    """The plans of one kernel on one GPU, by specialization key; ``binder`` is Triton's binder for
    the kernel on that GPU's target (``create_function_from_signature``, as ``JITFunction`` builds
    it); ``constexprs``: the positions of its constexpr parameters."""
    __slots__ = ("binder", "constexprs")


def _plans_for(fn, index: int, tables=None) -> Optional[_Plans]:
    tables = _tables if tables is None else tables
    table = tables.get((fn, index))
    if table is None:
        if launch_protocol_reason() is not None:
            return None
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        table = _Plans()
        table.binder = create_function_from_signature(fn.signature, fn.params, make_backend(_target(index)))
        table.constexprs = tuple(p.num for p in fn.params if p.is_constexpr)
        tables[(fn, index)] = table
    return table


def launch_knobs() -> tuple:
    """What decides, besides a launch's key, whether a launch takes its plan and which kernel it
    is: installed launch hooks (a profiler's), and Triton's debug and instrumentation knobs (in
    Triton's cache key). Call plans (:mod:`mmkernels.plans`) key on it."""
    if _JITFunction is None:
        return ()
    return (_hooks_installed(), _knobs.runtime.debug, _knobs.compilation.instrumentation_mode)


def _hooks_installed() -> bool:
    rt = _knobs.runtime
    return bool(getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)
                or getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook))


def _spec_key(spec, options, args=(), meta=None, positional_constexprs=()) -> tuple:
    """What Triton's cache key is made of (``compute_cache_key``: the specialization and the
    options), plus the debug and instrumentation knobs ``JITFunction.run`` adds to the options, and
    the types of the constexpr values (by keyword, and at ``positional_constexprs``): equal values
    of other types (``True``, ``1``, ``1.0``) compile different kernels and hash alike. (Other
    arguments' types are in the specialization already.)"""
    types = tuple(map(type, meta.values())) if meta else ()
    n = len(args)
    if positional_constexprs and positional_constexprs[0] < n:    # usually they come last, by keyword
        types += tuple(type(args[i]) for i in positional_constexprs if i < n)
    return (tuple(spec), tuple(options.items()), _knobs.runtime.debug, _knobs.compilation.instrumentation_mode, types)


def _launch_prepared(fn, dev: torch.device, grid, args: tuple, meta: dict) -> None:
    """:func:`launch` for a plain ``@triton.jit`` kernel whose tensors live on GPU ``dev``."""
    index = dev.index if dev.index is not None else _current_device()
    mode = _mode if _mode is not _AUTO_MODE else (_device_modes.get(index) or _mode_for(index))
    tables = _by_mode.get(mode)
    table = None if tables is None else tables.get((fn, index))
    if table is None and mode is not _JIT_MODE:
        table = _plans_for(fn, index, tables)
    if table is None:
        _refuse_plan("a launch through JITFunction.run (the jit launch mode)")
        with _on_device(args):
            fn[grid](*args, **meta)
        return
    bound, spec, options = table.binder(*args, **meta)
    try:
        key = _spec_key(spec, options, args, meta, table.constexprs)
        plan = table.get(key)
    except TypeError:          # an unhashable constexpr: no plan, Triton's own path
        key = plan = None
    if plan is None or _hooks_installed() or fn.pre_run_hooks:
        _refuse_plan("a launch without its plan (a first compile, a launch hook)")
        with _on_device(args):
            compiled = fn.run(*args, grid=grid, warmup=False, **meta)
        if hasattr(compiled, "result"):    # an asynchronous compile's future
            compiled = compiled.result()
        if key is not None and compiled is not None and not fn.pre_run_hooks:
            table[key] = _make_plan(fn, compiled, index, spec, mode)
        return
    if callable(grid):
        grid = grid(bound)
    n = len(grid)
    gx, gy, gz = grid[0], (grid[1] if n > 1 else 1), (grid[2] if n > 2 else 1)
    rec = _plans.recording.recorder
    if rec is not None:
        rec.launch(plan, (gx, gy, gz), index, bound)
    if index == _current_device():
        plan(gx, gy, gz, _current_stream(index), bound)
    else:
        with torch.cuda.device(index):
            plan(gx, gy, gz, _current_stream(index), bound)


def _current_device() -> int:
    return torch._C._cuda_getDevice()


def _current_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def _make_plan(fn, compiled, index: int, spec, mode: str) -> Callable:
    """The launch of ``compiled`` as a function of ``(gx, gy, gz, stream, bound)`` (``bound``: the
    binder's argument dict, every parameter in order, constexprs included)."""
    if mode == "static":
        plan = _static_plan(fn, compiled, index, spec)
        if plan is not None:
            stats["static"] = stats.get("static", 0) + 1
            return plan
    stats["prepared"] = stats.get("prepared", 0) + 1
    runner = _cached_descriptors(compiled.run, compiled.src.signature)
    function, packed = compiled.function, compiled.packed_metadata

    def plan(gx, gy, gz, stream, bound):
        runner(gx, gy, gz, stream, function, packed, None, None, None, *bound.values())
    return plan


def static_arguments(spec) -> Optional[Tuple[int, ...]]:
    """Positions of the arguments torch's static launcher takes for a kernel of this
    specialization (every one that is not a constexpr), or None where it takes none of this kind
    (a tuple argument, a TMA descriptor)."""
    keep = []
    for i, (ty, _) in enumerate(spec):
        if not isinstance(ty, str) or ty.startswith("tensordesc"):
            return None
        if ty != "constexpr":
            keep.append(i)
    return tuple(keep)


def _static_plan(fn, compiled, index: int, spec) -> Optional[Callable]:
    keep = static_arguments(spec)
    name = fn.__name__
    if keep is None:
        refusals[name] = "a tuple or TMA descriptor argument"
        return None
    try:
        kernel = static_kernel(compiled)
        if len(kernel.arg_tys) != len(keep):
            refusals[name] = f"static launcher takes {len(kernel.arg_tys)} arguments, the plan {len(keep)}"
            return None
        kernel.load_kernel(index)
    except Exception as exc:           # a private API: any refusal means "prepared"
        refusals[name] = f"{type(exc).__name__}: {exc}"[:200]
        return None
    run = kernel.run

    def plan(gx, gy, gz, stream, bound):
        values = tuple(bound.values())
        run(gx, gy, gz, stream, *[values[i] for i in keep])
    return plan


def static_kernel(compiled):
    """torch inductor's ``StaticallyLaunchedCudaKernel`` for a compiled kernel (its cubin written
    to a file it loads once). Raises where torch has none or it refuses the kernel."""
    import tempfile

    from torch._inductor.runtime.static_triton_launcher import StaticallyLaunchedCudaKernel
    if getattr(compiled, "_cubin_path", None) is None:
        compiled._cubin_path = None
    kernel = StaticallyLaunchedCudaKernel(compiled)
    path = os.path.join(tempfile.gettempdir(), f"mmkernels-cubin-{os.getuid()}", f"{compiled.hash}.cubin")
    kernel.reload_cubin_from_raw(path)
    return kernel


def _cached_descriptors(runner, signature):
    """``runner`` (a compiled kernel's launcher), with its host TMA descriptor arguments encoded
    once per (pointer, shape, strides, box, padding) instead of on every launch. Where the
    installed Triton's launcher is not the known wrapper around a raw launch, ``runner`` itself."""
    if not any(isinstance(t, str) and t.startswith("tensordesc") for t in signature.values()):
        return runner
    inner = getattr(runner, "launch", None)
    code = getattr(inner, "__code__", None)
    if code is None or inner.__closure__ is None:
        return runner
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in inner.__closure__)))
    raw, positions, metas = cells.get("launcher"), cells.get("tensordesc_indices"), cells.get("tensordesc_meta")
    from triton.backends.nvidia import driver as nv
    n_base = getattr(nv, "_BASE_ARGS_FORMAT_LEN", None)       # Triton 3.6: kernel arguments flat after these
    paths = cells.get("relevant_paths")                        # Triton 3.9: descriptor paths; arguments one tuple
    if positions is None and isinstance(paths, dict) and not any(paths.values()):
        positions, n_base = sorted(paths), None                # top-level descriptors only (nested: not cached)
    if raw is None or positions is None or metas is None or len(metas) != len(positions) or None in metas:
        return runner    # below sm_90 descriptors are plain loads: their expansion holds the tensor itself
    launcher = copy.copy(runner)
    launcher.launch = encode_once(raw, positions, metas, nv.make_tensordesc_arg, n_base)
    stats["descriptor caches"] = stats.get("descriptor caches", 0) + 1
    return launcher


def encode_once(raw, positions, metas, encode, n_base: Optional[int], limit: int = 256):
    """A launch function with Triton's descriptor-wrapper protocol that expands each descriptor
    (the kernel arguments at ``positions``) through ``encode`` once per (pointer, shape, strides,
    box, padding) and calls ``raw``. Triton 3.6's protocol (``n_base`` an int): ``n_base`` launch
    arguments, then the kernel's, flat; ``encode(desc, meta)``. Triton 3.9's (``n_base`` None):
    the launch arguments, then the kernel's as one sequence (a list after expansion, as Triton's
    wrapper hands its generic launcher); ``encode(desc, meta, launch_args)``
    (NVIDIA's ignores the launch arguments, so they are no part of the key). A descriptor holds an
    address, not a tensor: a new tensor at the same address with the same geometry is described by
    the same bytes. At most ``limit`` encodings are kept."""
    positions = frozenset(positions)
    slots = {p: j for j, p in enumerate(sorted(positions))}
    cache: Dict[tuple, list] = {}

    def launch(*args):
        base, kernel_args = (args[:-1], args[-1]) if n_base is None else (args[:n_base], args[n_base:])
        extra = (base,) if n_base is None else ()
        final = []
        for i, a in enumerate(kernel_args):
            if i in positions:
                key = (i, a.base.data_ptr(), tuple(a.shape), tuple(a.strides), tuple(a.block_shape), a.padding)
                enc = cache.get(key)
                if enc is None:
                    if len(cache) >= limit:
                        cache.clear()
                    enc = cache[key] = encode(a, metas[slots[i]], *extra)
                final.extend(enc)
            else:
                final.append(a)
        return raw(*base, final) if n_base is None else raw(*base, *final)
    return launch


def launch(kernel, grid, *args, **meta) -> None:
    """Start ``kernel[grid](*args, **meta)`` on the GPU that holds its tensors, or record it while
    :func:`capture_launches` is active. A plain ``@triton.jit`` kernel on a GPU takes a prepared
    launch (:func:`_launch_prepared`) unless the launch mode is ``"jit"``."""
    if _capture is not None:
        _refuse_plan("a launch captured, not run (the ahead-of-time compile)")
        _capture.append((kernel, args, meta))
        return
    if _mode is not _JIT_MODE and type(kernel) is _JITFunction:
        dev = _device_of(args)
        if dev is not None and _device_type(dev) == "cuda":
            _launch_prepared(kernel, dev, grid, args, meta)
            return
    _refuse_plan("a launch through Triton's own path (an autotuner, the interpreter, the jit mode)")
    with _on_device(args):
        kernel[grid](*args, **meta)


def _refuse_plan(why: str) -> None:
    """A call being recorded as a call plan (:mod:`mmkernels.plans`) cannot be replayed."""
    rec = _plans.recording.recorder
    if rec is not None:
        rec.refuse(why)


def tuning_key(tuned, args: tuple, consts: dict) -> tuple:
    """The key under which Triton's autotuner caches its choice for these arguments (its own rule:
    the named key arguments, then the dtypes of every argument that has one)."""
    names = tuned.arg_names
    named = dict(zip(names, args))
    for k, v in consts.items():
        if k in names:
            named[k] = v
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

    * On a GPU with autotuning on: the configuration the autotuner chose for this key, launched
      on the plain kernel (a prepared launch, see :func:`launch`); the first call of a key goes
      through the autotuner, which times its pruned configurations once — except under CUDA-graph
      capture, where timing would sync: there the untuned configuration.
    * The interpreter or ``MMKERNELS_AUTOTUNE=0``: the untuned configuration
      (:func:`untuned_config`), its pre-hook applied, launched on the plain kernel, no timing.

    While :func:`capture_launches` records (the ahead-of-time compile), the untuned launch is recorded
    beside the tuned one, so both paths' configurations are compiled."""
    tuning = AUTOTUNE and not TRITON_INTERPRET
    if tuning and _capture is None:
        configs = tuned.configs
        config = configs[0] if len(configs) == 1 else tuned.cache.get(tuning_key(tuned, args, consts))
        if config is None and not _capturing_graph():
            launch(tuned, grid, *args, **consts)       # the autotuner times this key's configurations
            return
        if config is not None:
            tuned.best_config = config                  # as the autotuner's own launch records it
            _launch_config(tuned, grid, args, consts, config)
            return
        tuning = False                                  # capturing a graph: no timing
    if tuning:
        launch(tuned, grid, *args, **consts)
    config = untuned_config(tuned, args, consts, fallback)
    if _capture is not None:  # recorded as a one-configuration kernel: the compile applies its pre-hook
        _refuse_plan("a launch captured, not run (the ahead-of-time compile)")
        _capture.append((types.SimpleNamespace(fn=tuned.fn, arg_names=tuned.arg_names, configs=[config],
                                               early_config_prune=None), args, consts))
        return
    _launch_config(tuned, grid, args, consts, config)


def _launch_config(tuned, grid, args: tuple, consts: dict, config) -> None:
    """One configuration of an autotuned kernel on its plain kernel, the pre-hook applied first."""
    meta = config.all_kwargs()        # the meta-parameters and launch options that are set
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(tuned.arg_names, args)), **consts, **meta})
    launch(tuned.fn, grid, *args, **consts, **meta)


@contextlib.contextmanager
def capture_launches() -> Iterator[List[Tuple[object, tuple, dict]]]:
    """Record instead of run every :func:`launch` in the block (used by the ahead-of-time compile)."""
    global _capture
    previous, _capture = _capture, []
    try:
        yield _capture
    finally:
        _capture = previous


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host integers (``triton.cdiv`` is a JIT function: costly on the host)."""
    return -(-a // b)


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


_CAPABILITY: Dict[int, Tuple[int, int]] = {}


def compute_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of a GPU ``device`` (asked once per GPU), None for other devices."""
    if _device_type(device) != "cuda":
        return None
    index = device.index if device.index is not None else _current_device()
    cc = _CAPABILITY.get(index)
    if cc is None:
        cc = _CAPABILITY[index] = tuple(_gpu_identity(index)[1])
    return cc


def unbuilt_on(device: torch.device, archs: Mapping[int, str]) -> Optional[str]:
    """The reason a backend refuses ``device`` where its kernels do not compile for that chip
    (``archs``: compute capability major -> what fails there), else None."""
    cc = compute_capability(device)
    if cc is not None and cc[0] in archs:
        return f"not built for sm_{cc[0]}{cc[1]}: {archs[cc[0]]}"
    return None


# The shared memory one block may use on each chip class the kernels are built for (the opt-in
# maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes, by target (major * 10 + minor):
# A100 (sm_80), RTX 30 / A10 (sm_86), RTX 40 / L4 (sm_89), H100 / H200 (sm_90), B200 (sm_100),
# RTX 50 (sm_120). The ahead-of-time compile covers exactly these targets.
SHARED_MEMORY_PER_BLOCK: Dict[int, int] = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
AOT_TARGETS: Tuple[int, ...] = tuple(SHARED_MEMORY_PER_BLOCK)

_compile_target: Optional[int] = None


@contextlib.contextmanager
def compile_target(arch: int) -> Iterator[None]:
    """Choose configurations for ``sm_{arch}`` inside the block, whatever the tensors' device (the
    ahead-of-time compile: its launches are captured from CPU tensors)."""
    global _compile_target
    previous, _compile_target = _compile_target, int(arch)
    try:
        yield
    finally:
        _compile_target = previous


def target_arch(device: Optional[torch.device]) -> Optional[int]:
    """The target the kernels for ``device`` are chosen for (``major * 10 + minor``): the
    ahead-of-time compile's while one runs (:func:`compile_target`), else the GPU's; None for
    other devices (the interpreter)."""
    if _compile_target is not None:
        return _compile_target
    cc = compute_capability(device) if isinstance(device, torch.device) else None
    return None if cc is None else cc[0] * 10 + cc[1]


def shared_memory_limit(device: Optional[torch.device]) -> Optional[int]:
    """Bytes of shared memory one block may use on the chip the kernels for ``device`` are chosen
    for (:data:`SHARED_MEMORY_PER_BLOCK`; a GPU of another class is asked); None where no chip is
    involved (the interpreter), so nothing is pruned for it."""
    arch = target_arch(device)
    if arch is None:
        return None
    if arch in SHARED_MEMORY_PER_BLOCK:
        return SHARED_MEMORY_PER_BLOCK[arch]
    if not isinstance(device, torch.device) or _device_type(device) != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


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
