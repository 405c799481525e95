"""Helpers shared by the tests and the benchmark harness: per-dtype tolerances, comparison against
a float64 reference, and the ahead-of-time compile of every Triton kernel of the package for each
GPU target."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Dict, List

import torch


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# Kernel output vs the float64 reference rounded once to the dtype: a few ulps of the dtype.
TOLERANCES: Dict[torch.dtype, Tol] = {
    torch.float64: Tol(1e-10, 1e-10),
    torch.float32: Tol(2e-5, 2e-5),
    torch.float16: Tol(4e-3, 4e-3),
    torch.bfloat16: Tol(3e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: bool = False):
    """``actual`` vs ``expected`` (a float64 reference) with the tolerance of ``dtype``. ``scale``:
    the tolerance grows with the largest magnitude of ``expected`` (sums over many rows)."""
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    mag = max(1.0, expected.abs().max().item()) if (scale and expected.numel()) else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol.atol * mag, rtol=tol.rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


# --- ahead-of-time compile, per GPU target -------------------------------------------------------

VECTOR_LOAD = re.compile(r"ld\.global(\.\w+)*\.v[24]\.b(32|64)")
FMA_F32 = re.compile(r"\bfma\.rn\.f32\b")
DOT_OPERAND = re.compile(r"tt\.dot [^\n]*?: tensor<[0-9x]*x(\w+)>")   # a tl.dot's first operand's element type


def _ptxas_numbers(text: str) -> dict:
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    return dict(n_regs=int(regs.group(1)) if regs else None, spill_bytes=sum(int(x) for x in spill))


def ptxas_report(ptx: str, arch: int = 90) -> dict:
    """Registers and spill bytes of one kernel, from Triton's bundled ``ptxas -v``."""
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    return _ptxas_numbers(out.stderr + out.stdout)


def compile_with_report(kernel, args, meta, arch: int):
    """:func:`mmkernels.runtime.aot_compile` (``return_bound``), plus the kernel's
    :func:`ptxas_report`: read from the ``ptxas -v`` that Triton's own compile runs, kept beside
    the kernel in Triton's cache (a cached kernel is not assembled again; ptxas runs here only
    where the cache has a kernel but no report)."""
    import contextlib
    import io

    from triton import knobs
    from triton.runtime.cache import get_cache_manager

    from . import runtime
    log, before = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True      # Triton prints its ptxas log (a knob, not in the cache key)
    try:
        with contextlib.redirect_stdout(log):
            c, bound = runtime.aot_compile(kernel, args, meta, arch, return_bound=True)
    finally:
        knobs.nvidia.dump_ptxas_log = before
    cache = get_cache_manager(c.hash)
    name = f"mmkernels-ptxas-sm{arch}.json"
    report = _ptxas_numbers(log.getvalue())
    if report["n_regs"] is None:
        path = cache.get_file(name)
        if path is not None:
            with open(path) as f:
                return c, bound, json.load(f)
        report = ptxas_report(c.asm["ptx"], arch)
    cache.put(json.dumps(report), name, binary=False)
    return c, bound, report


def _jit_fn(kernel):
    fn = kernel
    while hasattr(fn, "fn") and not hasattr(fn, "signature"):
        fn = fn.fn
    return fn.fn if hasattr(fn, "fn") else fn


def _configs_of(kernel, args, meta):
    """``(label, meta, pre_hook)`` per configuration to compile: the launch's own meta-parameters,
    or for an autotuned kernel every configuration its pruning keeps for these arguments (with the
    pre-hook that adapts the arguments to it, e.g. TMA block shapes)."""
    configs = getattr(kernel, "configs", None)
    if not configs:
        return [("", meta, None)]
    prune = getattr(kernel, "early_config_prune", None)
    if prune:
        configs = prune(configs, dict(zip(kernel.arg_names, args)), **meta)
    out = []
    for c in configs:
        extra = {k: v for k, v in c.all_kwargs().items() if v is not None}
        out.append((", ".join(f"{k}={v}" for k, v in sorted(extra.items())), {**meta, **extra}, c.pre_hook))
    return out


def _spec_key(args, meta) -> str:
    """What Triton specialises on, roughly: tensor dtypes and 16-byte alignment, ints (== 1, % 16),
    constexprs. Used only to skip compiling the same thing twice."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return f"{a.dtype}:{a.data_ptr() % 16 == 0}"
        if isinstance(a, tuple):
            return "(" + ",".join(one(x) for x in a) + ")"
        if hasattr(a, "block_shape"):  # a TMA descriptor
            return f"desc:{a.base.dtype}:{list(a.block_shape)}"
        if isinstance(a, int) and not isinstance(a, bool):
            return "1" if a == 1 else ("16" if a % 16 == 0 else "i")
        return repr(a)
    return ";".join(one(a) for a in args) + "|" + repr(sorted(meta.items()))


class _TensorMap:
    """Stands in for the CUtensorMap that Triton's driver fills from a host descriptor (no GPU)."""

    def __init__(self, *fields):
        self.fields = fields


class _HostlessDriver:
    """Just enough of Triton's active driver for its descriptor packing to run without a GPU."""

    class utils:  # noqa: N801 - mirrors the driver attribute
        fill_tma_descriptor = _TensorMap
        fill_tma_descriptor_tiled = fill_tma_descriptor_im2col = _TensorMap   # Triton 3.9's names


def _nested_check(fmt: str, values, kinds, pos: int, where: str) -> int:
    """``values`` against one level of a ``PyArg_ParseTuple`` format; ``kinds[i]`` is the flat
    argument i's role in the launcher ('ptr', 'tma' or 'value'). Returns the next flat index."""
    i = 0
    j = 0
    while j < len(fmt):
        ch = fmt[j]
        if i >= len(values):
            raise AssertionError(f"{where}: the launcher expects more arguments than the {len(values)} given")
        v = values[i]
        if ch == "(":
            depth, end = 1, j + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(fmt[end], 0)
                end += 1
            if not isinstance(v, tuple):
                raise AssertionError(f"{where}: argument {pos} should be a tuple, got {type(v).__name__}")
            pos = _nested_check(fmt[j + 1:end - 1], v, kinds, pos, where)
            j = end
        else:
            kind = kinds[pos]
            if kind == "tma" and not isinstance(v, _TensorMap):
                raise AssertionError(f"{where}: argument {pos} should be a TMA descriptor, got {type(v).__name__}")
            if kind == "ptr" and not (v is None or isinstance(v, int) or hasattr(v, "data_ptr")):
                raise AssertionError(f"{where}: argument {pos} should be a pointer, got {type(v).__name__}")
            if ch in "bhiLBHIK" and not isinstance(v, int):
                raise AssertionError(f"{where}: argument {pos} should be an integer, got {type(v).__name__}")
            if ch == "d" and not isinstance(v, (int, float)):
                raise AssertionError(f"{where}: argument {pos} should be a number, got {type(v).__name__}")
            pos += 1
            j += 1
        i += 1
    if i != len(values):
        raise AssertionError(f"{where}: {len(values)} arguments given, the launcher takes {i}")
    return pos


def check_launcher(compiled, bound_args, where: str = "") -> str:
    """What a kernel's first launch on a GPU does before it reaches the driver, done here without
    one: build Triton's NVIDIA launcher for the compiled kernel (``make_launcher`` with the compiled
    descriptor metadata), pack the launch's arguments through its descriptor wrapper
    (``wrap_handle_tensordesc``; host descriptors become CUtensorMaps) and check the packed values
    against the launcher's own argument format. Raises ``AssertionError`` where Triton's launcher
    would. Returns the launcher's C source (for :func:`compile_launcher_source`)."""
    from triton.backends.nvidia import driver as nv
    if not hasattr(nv, "make_launcher"):   # Triton 3.9: one generic launcher, no C source per kernel
        return _check_generic_launcher(compiled, bound_args, where)
    src = compiled.src
    constants = {(src.fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in src.constants.items()}
    signature = dict(src.signature)
    meta = getattr(compiled.metadata, "tensordesc_meta", None)
    try:
        c_src = nv.make_launcher(constants, signature, meta)
    except AssertionError as exc:  # Triton's own check: descriptors it cannot expand (e.g. in a tuple)
        raise AssertionError(f"{where}: Triton's launcher cannot take this signature ({len(meta or [])} "
                             f"descriptors compiled; only top-level descriptor arguments are packed)") from exc
    fmt = re.search(r'PyArg_ParseTuple\(args, "([^"]*)"', c_src).group(1)
    base = nv._BASE_ARGS_FORMAT
    assert fmt.startswith(base), fmt
    n_flat = len(fmt[len(base):].replace("(", "").replace(")", ""))
    kinds = ["ptr" if f"getPointer(_arg{i}," in c_src else "tma" if f"getTmaDesc(_arg{i})" in c_src else "value"
             for i in range(n_flat)]
    packed = _pack_hostless(signature, meta, where, (1, 1, 1, 0, 0, False, False, None, None, None, None, None, None,
                                                     *bound_args))
    _nested_check(fmt[len(base):], tuple(packed[len(base):]), kinds, 0, where)
    return c_src


def _pack_hostless(signature, meta, where: str, args: tuple) -> tuple:
    """What Triton's descriptor wrapper (``wrap_handle_tensordesc``) hands the raw launcher for a
    launch with ``args``, host descriptors filled by :class:`_HostlessDriver` (no GPU)."""
    import triton
    from triton.backends.nvidia import driver as nv
    calls = []
    try:
        pack = nv.wrap_handle_tensordesc(lambda *a: calls.append(a), signature, meta)
    except AssertionError as exc:
        raise AssertionError(f"{where}: Triton's descriptor wrapper rejects this signature") from exc
    previous = triton.runtime.driver._active
    triton.runtime.driver.set_active(_HostlessDriver())
    try:
        pack(*args)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{where}: Triton's launcher cannot take these arguments: {exc}") from exc
    finally:
        triton.runtime.driver._active = previous
    return calls[0]


def _check_generic_launcher(compiled, bound_args, where: str) -> str:
    """:func:`check_launcher` where Triton launches every kernel through one compiled launcher
    (``driver.c``'s ``launch``, Triton 3.9): the kernel's signature expanded as ``CudaLauncher``
    expands it (descriptors into CUtensorMap, shape, strides), the launch's arguments packed through
    the descriptor wrapper, each packed value checked against its expanded type (tuples nested,
    constexprs passed and skipped). Returns ``driver.c``'s source (the same for every kernel)."""
    import os

    from triton.backends.driver import expand_signature
    from triton.backends.nvidia import driver as nv
    signature = dict(compiled.src.signature)
    meta = getattr(compiled.metadata, "tensordesc_meta", None)
    expanded = expand_signature(signature.values(), meta, "nvTmaDesc")
    # CudaLauncher.__call__'s call: 15 launch arguments, then the kernel's as one tuple
    packed = _pack_hostless(signature, meta, where, (1, 1, 1, 0, 0, False, False, None, None, None, None, None, None,
                                                     None, None, tuple(bound_args)))
    _expanded_check(expanded, packed[-1], where)
    with open(os.path.join(os.path.dirname(nv.__file__), "driver.c")) as f:
        return f.read()


def _expanded_check(types, values, where: str, path: str = "") -> None:
    """``values`` against an expanded kernel signature (``expand_signature``), as the generic
    launcher reads them: a tuple per tuple, constexprs skipped, pointers, CUtensorMaps, numbers."""
    if len(types) != len(values):
        raise AssertionError(f"{where}: {len(values)} arguments given{path}, the launcher takes {len(types)}")
    for i, (ty, v) in enumerate(zip(types, values)):
        at = f"argument {path}{i}"
        if isinstance(ty, tuple):
            if not isinstance(v, tuple):
                raise AssertionError(f"{where}: {at} should be a tuple, got {type(v).__name__}")
            _expanded_check(ty, v, where, f"{path}{i}.")
        elif ty == "constexpr":
            continue
        elif ty == "nvTmaDesc":
            if not isinstance(v, _TensorMap):
                raise AssertionError(f"{where}: {at} should be a TMA descriptor, got {type(v).__name__}")
        elif ty.startswith("*"):
            if not (v is None or isinstance(v, int) or hasattr(v, "data_ptr")):
                raise AssertionError(f"{where}: {at} should be a pointer, got {type(v).__name__}")
        elif ty[0] in "iu":
            if not isinstance(v, int):
                raise AssertionError(f"{where}: {at} should be an integer, got {type(v).__name__}")
        elif not isinstance(v, (int, float)):
            raise AssertionError(f"{where}: {at} should be a number, got {type(v).__name__}")


def check_plan(kernel, args, meta, compiled, bound_args, arch: int, where: str = ""):
    """A prepared launch of this call (:mod:`mmkernels.runtime`) hands the launcher the arguments
    Triton's own launch hands it (``bound_args``, from the same binder ``aot_compile`` ran), and
    torch's static launcher, where it takes the kernel, the non-constexpr ones with matching kinds.
    Returns whether the static launcher takes it (a reason string where it refuses)."""
    from triton.backends.compiler import GPUTarget

    from . import runtime
    fn = _jit_fn_object(kernel)
    saved = runtime._target
    runtime._target = lambda index: GPUTarget("cuda", arch, 32)
    try:
        table = runtime._plans_for(fn, -1 - arch)     # a table of its own: no real GPU index
    finally:
        runtime._target = saved
        runtime._tables.pop((fn, -1 - arch), None)
    assert table is not None, f"{where}: no plans ({runtime.launch_protocol_reason()})"
    bound, spec, options = table.binder(*args, **meta)
    values = tuple(bound.values())
    if len(values) != len(bound_args) or any(a is not b and a != b for a, b in zip(values, bound_args)):
        raise AssertionError(f"{where}: the plan's arguments differ from Triton's launch")
    hash(runtime._spec_key(spec, options, args, meta, table.constexprs))   # a plan key exists for it
    keep = runtime.static_arguments(spec)
    if keep is None:
        return "refused: a tuple or TMA descriptor argument"
    try:
        static = runtime.static_kernel(compiled)
    except Exception as exc:
        return f"refused: {type(exc).__name__}: {exc}"[:200]
    tys = static.arg_tys
    if len(tys) != len(keep):
        raise AssertionError(f"{where}: the static launcher takes {len(tys)} arguments, the plan passes {len(keep)}")
    for ty, i in zip(tys, keep):
        if (ty == "O") != spec[i][0].startswith("*"):
            raise AssertionError(f"{where}: argument {i} ({spec[i][0]}) packed as {ty!r} by the static launcher")
    return True


def _jit_fn_object(kernel):
    """The ``JITFunction`` under autotuners and heuristics."""
    from triton.runtime.jit import JITFunction
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def compile_launcher_source(c_src: str) -> None:
    """Compile a generated launcher's C source for the host (syntax and types only: linking it
    needs libcuda), as Triton does on a GPU machine at the first launch. A source that compiled
    once is remembered in Triton's cache (the same launcher serves every GPU target)."""
    import hashlib
    import os
    import subprocess
    import sysconfig
    import tempfile

    from triton.backends.nvidia import driver as nv
    from triton.runtime.cache import get_cache_manager
    cache = get_cache_manager(hashlib.sha256(c_src.encode()).hexdigest())
    if cache.get_file("mmkernels-launcher-compiles") is not None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "launcher.c")
        with open(path, "w") as f:
            f.write(c_src)
        cmd = ["cc", "-fsyntax-only", "-w", path,
               *[f"-I{p}" for p in nv.include_dirs], f"-I{sysconfig.get_paths()['include']}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"the launcher does not compile: {proc.stderr[-2000:]}")
    cache.put("", "mmkernels-launcher-compiles", binary=False)


def aot_compile_all(arch: int = 90, ops=None, keep_going: bool = False) -> List[dict]:
    """Capture every Triton launch of every op's AOT examples (or those of ``ops``), the
    configurations chosen for ``sm_{arch}`` (:func:`mmkernels.runtime.compile_target`), and
    compile each for ``sm_{arch}``, then build Triton's launcher for it and pack the launch's
    arguments (:func:`check_launcher`). Raises if a kernel defined in an op's triton module is
    never compiled (add an example). ``keep_going``: a configuration that fails to compile or
    launch becomes a row with its ``error`` instead of raising."""
    from . import runtime
    from .ops import OPS

    results, compiled, seen, launchers = [], set(), set(), set()
    with runtime.compile_target(arch):
        for op_name, op in OPS.items():
            if ops is not None and op_name not in ops:
                continue
            for label, run in op.aot_examples():
                with runtime.capture_launches() as launches:
                    run()
                if not launches:
                    raise AssertionError(f"{op_name}/{label}: the example launched no Triton kernel")
                for kernel, args, meta in launches:
                    name = _jit_fn(kernel).__name__
                    for config, full_meta, pre_hook in _configs_of(kernel, args, meta):
                        if pre_hook is not None:
                            pre_hook({**dict(zip(kernel.arg_names, args)), **full_meta})
                        if (name, config, _spec_key(args, full_meta)) in seen:
                            continue  # the same specialisation was compiled for an earlier example
                        seen.add((name, config, _spec_key(args, full_meta)))
                        compiled.add((op_name, name))
                        row = dict(op=op_name, example=label, kernel=name, config=config, target=f"sm_{arch}")
                        try:
                            row.update(_aot_one(kernel, args, full_meta, arch, f"{op_name}/{label}: {name} [{config}]",
                                                launchers))
                        except Exception as exc:
                            if not keep_going:
                                raise
                            row["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
                        results.append(row)
            defined = {k.fn.__name__ for k in runtime.kernels_of(op.triton_impl)}
            missing = defined - {k for o, k in compiled if o == op_name}
            if missing:
                raise AssertionError(f"{op_name}: kernels with no AOT example: {sorted(missing)}")
    return results


def _aot_one(kernel, args, meta, arch: int, where: str, launchers: set) -> dict:
    """One configuration of one launch compiled for ``sm_{arch}``, its launcher checked (a launcher
    source compiled once per distinct source): what the AOT test asserts about it."""
    c, bound, report = compile_with_report(kernel, args, meta, arch)
    launcher = check_launcher(c, bound, where)
    static = check_plan(kernel, args, meta, c, bound, arch, where)
    if launcher not in launchers:
        compile_launcher_source(launcher)
        launchers.add(launcher)
    ptx = c.asm["ptx"]
    return dict(ptx_bytes=len(ptx), launcher_args=len(bound), static_launcher=static,
                dot_dtypes=sorted(set(DOT_OPERAND.findall(c.asm["ttir"]))),
                shared=int(c.metadata.shared), num_warps=int(c.metadata.num_warps),
                **report,
                vector_loads=bool(VECTOR_LOAD.search(ptx)),
                wgmma="wgmma" in ptx, mma="mma.sync" in ptx, tcgen05="tcgen05.mma" in ptx,
                tensor_cores=any(k in ptx for k in ("wgmma", "mma.sync", "tcgen05.mma")),
                fma_f32=len(FMA_F32.findall(ptx)), tma="cp.async.bulk.tensor" in ptx)


def aot_main() -> None:  # pragma: no cover - run in a subprocess by tests/test_aot.py
    """``python -c "from mmkernels.testing import aot_main; aot_main()" [ARCH]``: every
    configuration compiled for ``sm_ARCH`` (default 90), as JSON rows on stdout; a failing
    configuration is a row with its ``error``."""
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    json.dump(aot_compile_all(arch, keep_going=True), sys.stdout)


# --- launch counts --------------------------------------------------------------------------------

# aten ops that start no device kernel (besides views, which ``func.is_view`` names): allocation
# without a fill, and metadata-only changes whose schema does not mark them as views
_NO_KERNEL = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view",
                        "resize_", "set_", "lift_fresh"})


@dataclasses.dataclass
class Launches:
    """What a call would start on a GPU: ``triton``, the Triton kernels' names in launch order;
    ``torch``, the aten ops (``name`` or ``name.overload``) that each start a device kernel (or,
    ``_local_scalar_dense``, a device-to-host copy that syncs). ``result``: what the call returned."""
    triton: List[str]
    torch: List[str]
    result: object = dataclasses.field(default=None, repr=False, compare=False)


def _kernel_name(kernel) -> str:
    while hasattr(kernel, "fn"):          # autotuner -> JITFunction -> the Python function
        kernel = kernel.fn
    return kernel.__name__


def count_launches(fn) -> Launches:
    """Run ``fn()`` and record what it would start on a GPU. Triton launches are captured by
    :func:`mmkernels.runtime.capture_launches` and not run (their outputs stay uninitialised): an
    autotuned launch is recorded twice there (the tuned kernel, then its untuned configuration as a
    ``SimpleNamespace`` with the same ``fn``) and counts once. Torch ops are recorded by a
    ``TorchDispatchMode``, views, :data:`_NO_KERNEL` and ops that touch no tensor left out; copies
    and casts count. A dispatch mode would send the ops through their registered custom ops (see
    ``_register._tracing``): here they keep their eager path, the one a GPU call takes (an
    ``mmkernels::`` op seen raises)."""
    import types

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from . import runtime
    from .ops import _register
    ops: List[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            ns = func.namespace
            if ns == "mmkernels":
                raise AssertionError(f"count_launches: {func} ran as a registered op, not on the eager path")
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if not (func.is_view or name in _NO_KERNEL
                    or not any(isinstance(t, torch.Tensor) for t in tree_leaves((args, kwargs, out)))):
                overload = func._overloadname
                ops.append((name if ns == "aten" else f"{ns}.{name}")
                           + ("" if overload == "default" else f".{overload}"))
            return out

    saved = _register._dispatch_modes
    _register._dispatch_modes = lambda: 0      # the eager path, though a dispatch mode is on
    try:
        with runtime.capture_launches() as captured, Record():
            result = fn()
    finally:
        _register._dispatch_modes = saved
    names: List[str] = []
    for i, (kernel, args, _) in enumerate(captured):
        if isinstance(kernel, types.SimpleNamespace) and i:   # the untuned half of an autotuned launch?
            tuned, tuned_args, _ = captured[i - 1]
            if (not isinstance(tuned, types.SimpleNamespace) and getattr(tuned, "fn", None) is kernel.fn
                    and len(args) == len(tuned_args) and all(a is b for a, b in zip(args, tuned_args))):
                continue
        names.append(_kernel_name(kernel))
    return Launches(names, ops, result)


# --- memory traffic under the interpreter -----------------------------------------------------------

@dataclasses.dataclass
class Moved:
    """Bytes the Triton kernels moved to and from one tensor's memory, lanes masked off counting
    nothing: ``read``, every load; ``fetched``, each program's distinct bytes (what reaches the
    program from memory if its own re-reads hit its cache, and no program shares another's);
    ``written``, stores and atomics. Ratios to the tensor's own size (1.0: each byte once):
    ``reads``, ``fetches``, ``writes``."""
    size: int
    read: int = 0
    fetched: int = 0
    written: int = 0

    @property
    def reads(self) -> float:
        return self.read / self.size if self.size else 0.0

    @property
    def fetches(self) -> float:
        return self.fetched / self.size if self.size else 0.0

    @property
    def writes(self) -> float:
        return self.written / self.size if self.size else 0.0


def _extent(t: torch.Tensor):
    """The byte range ``[lo, hi)`` a tensor's elements span."""
    lo = t.data_ptr()
    if t.numel() == 0:
        return lo, lo
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return lo, lo + (last + 1) * t.element_size()


def count_traffic(fn, tensors: Dict[str, torch.Tensor]) -> Dict[str, Moved]:
    """Run ``fn()`` (Triton kernels under the interpreter, on CPU tensors) and count, per named
    tensor, the bytes its kernels loaded from and stored to that tensor's memory (see
    :class:`Moved`). Loads through pointers, block pointers and tensor descriptors all reach the
    interpreter's ``create_masked_load``; stores ``create_masked_store``. The tensors given must
    not overlap; memory of no named tensor is not counted."""
    import numpy as np
    from triton.runtime import interpreter as interp

    spans = {name: _extent(t) for name, t in tensors.items()}
    moved = {name: Moved(size=hi - lo) for name, (lo, hi) in spans.items()}
    launch = [0]
    fetched: Dict[tuple, list] = {}          # (launch, program, tensor) -> addresses loaded

    def account(builder, ptrs, mask, kind):
        addr = np.asarray(ptrs.data)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
        width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        for name, (lo, hi) in spans.items():
            mine = addr[(addr >= lo) & (addr < hi)]
            if kind == "read":
                moved[name].read += mine.size * width
                fetched.setdefault((launch[0], builder.grid_idx, name, width), []).append(mine)
            else:
                moved[name].written += mine.size * width

    builder = interp.InterpreterBuilder
    load, store, rmw = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw
    run = interp.GridExecutor.__call__

    def counted_load(self, ptrs, mask, *args, **kwargs):
        account(self, ptrs, mask, "read")
        return load(self, ptrs, mask, *args, **kwargs)

    def counted_store(self, ptrs, value, mask, *args, **kwargs):
        account(self, ptrs, mask, "written")
        return store(self, ptrs, value, mask, *args, **kwargs)

    def counted_rmw(self, op, ptr, val, mask, *args, **kwargs):
        account(self, ptr, mask, "written")
        return rmw(self, op, ptr, val, mask, *args, **kwargs)

    def counted_run(self, *args, **kwargs):
        launch[0] += 1
        return run(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    builder.create_atomic_rmw, interp.GridExecutor.__call__ = counted_rmw, counted_run
    try:
        fn()
    finally:
        builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw = load, store, rmw
        interp.GridExecutor.__call__ = run
    for (_, _, name, width), parts in fetched.items():
        moved[name].fetched += np.unique(np.concatenate(parts)).size * width
    return moved
