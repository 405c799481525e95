"""Building and loading the CUDA C++ extension (``csrc/``) and choosing it in ``auto``.

Where the compiled library comes from, first match wins:

1. ``mmkernels/_C*.so``, built ahead of time by ``MMKERNELS_BUILD_CUDA=1 pip install
   --no-build-isolation -e .`` (see setup.py);
2. a build on first use with ``torch.utils.cpp_extension.load`` (ninja), cached in
   ``$MMKERNELS_CUDA_CACHE`` (default ``~/.cache/mmkernels/cuda``) under a key made of the torch
   and CUDA versions, the target architectures and the sources' hash. ``cpp_extension`` holds a
   lock file in that folder while it builds, so processes starting together build once.

``python -m mmkernels.cuda build`` runs step 2 now (no GPU needed) and exits non-zero with the
compiler's message on failure. Architectures: ``TORCH_CUDA_ARCH_LIST`` when set, else
``8.0;9.0`` (sm_80 and sm_90). ``MMKERNELS_CUDA=0`` turns the backend off.

When the library can't be had (no nvcc, a compiler error): an explicit ``backend="cuda"`` raises
with the reason; ``auto`` warns once (with the build log's path) and runs Triton. Importing
mmkernels never builds or loads anything.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

PACKAGE = Path(__file__).resolve().parent.parent
# csrc/ of a source checkout (editable install), or the copy a wheel carries (setup.py build_py)
CSRC_CANDIDATES = (PACKAGE.parent / "csrc", PACKAGE / "csrc")
SOURCES = ("ops.cpp", "norm_concat.cu", "attention_pool.cu", "gated_sum.cu")
HEADERS = ("common.cuh",)
DEFAULT_ARCHS = "8.0;9.0"
# no --use_fast_math: it turns fp32 tanhf into tanh.approx (fp32 outputs must stay within fp32
# tolerances; the kernels use tanh.approx for 16-bit outputs only). Division and square root may be
# the 2-ulp versions: fewer registers (less spill in norm_concat's backward), far inside tolerances.
NVCC_FLAGS = ["-O3", "-prec-div=false", "-prec-sqrt=false", "-lineinfo", "-std=c++17", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3", "-std=c++17"]
TABLE = Path(__file__).resolve().parent / "dispatch_table.json"

EMULATE_VAR = "MMKERNELS_CUDA_EMULATE"  # tests: build csrc/ for the CPU emulator (csrc/emu/simt.h)

_lock = threading.Lock()
_status: Optional[str] = None      # None: not tried; "": loaded; otherwise why it is unavailable
_warned = False


class BuildError(RuntimeError):
    """The extension failed to build; the message holds the compiler's output."""


def csrc_dir() -> Optional[Path]:
    """The sources: ``$MMKERNELS_CUDA_SOURCES`` when set (tests build broken copies from there),
    else csrc/ of the checkout, else the copy inside the installed package."""
    override = os.environ.get("MMKERNELS_CUDA_SOURCES")
    for c in ((Path(override),) if override else CSRC_CANDIDATES):
        if all((c / s).is_file() for s in SOURCES):
            return c
    return None


def emulating() -> bool:
    """``MMKERNELS_CUDA_EMULATE=1``: the ``cuda`` backend runs the csrc/ kernels compiled by the
    host compiler against csrc/emu/simt.h (every CUDA thread a host thread), on CPU tensors, as
    ``torch.ops.mmkernels_emu.cuda_*``. For testing the kernels on machines without a GPU; slow.
    ``MMKERNELS_CUDA_EMULATE=asan`` builds them with AddressSanitizer (the process must start
    with libasan preloaded; tests/test_cuda.py does that in a subprocess)."""
    return os.environ.get(EMULATE_VAR, "0").strip().lower() in ("1", "asan")


def _asan() -> bool:
    return os.environ.get(EMULATE_VAR, "0").strip().lower() == "asan"


def ops():
    """The op namespace of the ``cuda_*`` kernels: ``torch.ops.mmkernels`` (or the emulator's)."""
    return torch.ops.mmkernels_emu if emulating() else torch.ops.mmkernels


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS


def sources_hash(src: Path) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    return h.hexdigest()


def build_key(src: Path) -> str:
    h = hashlib.sha256(sources_hash(src).encode())
    h.update(" ".join([torch.__version__, str(torch.version.cuda), arch_list()] + NVCC_FLAGS + CXX_FLAGS).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    root = os.environ.get("MMKERNELS_CUDA_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmkernels" / "cuda"


def build_dir() -> Optional[Path]:
    src = csrc_dir()
    return None if src is None else cache_root() / f"torch{torch.__version__}-cu{torch.version.cuda}-{build_key(src)}"


def include_dirs() -> List[str]:
    """Header folders beyond CUDA_HOME's: with a pip-installed CUDA (the ``nvidia-*`` wheels torch
    depends on) cuSPARSE / cuBLAS headers that ATen's CUDA headers include live under
    ``site-packages/nvidia/*/include``, not next to nvcc."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cusparse.h").is_file():
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for inc in sorted(Path(root).glob("*/include")):
            if (inc / "cusparse.h").is_file() or (inc / "cublas_v2.h").is_file():
                found.append(str(inc))
    return found


def library_dirs() -> List[str]:
    """A folder holding ``libcudart.so`` for the linker when CUDA_HOME has none (nvcc found on
    PATH at /usr/local/bin, the toolkit's libraries under /usr/local/cuda/lib)."""
    from torch.utils import cpp_extension

    home = Path(cpp_extension.CUDA_HOME or "/usr/local/cuda")
    for d in (home / "lib64", home / "lib", home / "cuda" / "lib64", home / "cuda" / "lib",
              Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/lib")):
        if (d / "libcudart.so").exists():
            return [str(d)]
    return []


AOT_KEY = PACKAGE / "_C.sources"   # sources_hash of what the ahead-of-time library was built from


def _aot_library() -> Optional[str]:
    """``mmkernels/_C*.so`` when it was built from the sources at hand (a stale one, built before
    csrc/ changed, is ignored: the on-demand build takes over)."""
    hits = sorted(glob.glob(str(PACKAGE / "_C*.so")))
    if not hits:
        return None
    src = csrc_dir()
    if src is not None and (not AOT_KEY.is_file() or AOT_KEY.read_text().strip() != sources_hash(src)):
        warnings.warn(f"mmkernels: ignoring {hits[0]}: built from other sources than {src}; rebuild it with "
                      "MMKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .", stacklevel=4)
        return None
    return hits[0]


def build(verbose: bool = False) -> Path:
    """Compile the extension from csrc/ into the cache (or reuse the cached build) and load it
    into this process. Returns the library's path; raises :class:`BuildError` with the compiler's
    output (also written to ``build.log`` in the build folder)."""
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        raise BuildError(f"the CUDA sources are not here (looked for {', '.join(SOURCES)} in "
                         f"{', '.join(str(c) for c in CSRC_CANDIDATES)})")
    if cpp_extension.CUDA_HOME is None:
        raise BuildError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    name = f"mmkernels_cuda_{build_key(src)}"
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    log = out / "build.log"
    try:
        cpp_extension.load(name=name, sources=[str(src / s) for s in SOURCES], build_directory=str(out),
                           extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[str(src)] + include_dirs(),
                           extra_ldflags=[f"-L{d}" for d in library_dirs()], is_python_module=False, verbose=verbose)
    except Exception as exc:
        log.write_text(f"{type(exc).__name__}: {exc}\n")
        raise BuildError(f"building the CUDA extension failed (log: {log}):\n{exc}") from exc
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    log.write_text(f"built {name} for TORCH_CUDA_ARCH_LIST={arch_list()}\n")
    return out / f"{name}.so"


def build_emulator(verbose: bool = False) -> Path:
    """Compile csrc/ with the host compiler for the CPU emulator (``MMK_EMULATE``) and load it."""
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        raise BuildError("the CUDA sources are not here")
    flags = ["-O1", "-std=c++20", "-pthread", "-w"]
    ldflags = ["-pthread"]
    if _asan():
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=address"]
    key = hashlib.sha256((build_key(src) + (src / "emu" / "simt.h").read_text() + " ".join(flags)).encode()).hexdigest()[:16]
    out = cache_root() / f"emu-torch{torch.__version__}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for name in SOURCES:  # each source compiled as C++ with the emulator switched on
        w = out / f"emu_{Path(name).stem}.cpp"
        text = f'#define MMK_EMULATE 1\n#include "{src / name}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    home = cpp_extension.CUDA_HOME
    cuda_inc = [d for d in ([str(Path(home) / "include")] if home else []) + ["/usr/local/cuda/include"]
                if (Path(d) / "cuda_fp16.h").is_file()]
    name = f"mmkernels_emu_{key}"
    try:
        cpp_extension.load(name=name, sources=wrappers, build_directory=str(out),
                           extra_cflags=flags,
                           extra_include_paths=[str(src)] + cuda_inc[:1] + include_dirs(),
                           extra_ldflags=ldflags, is_python_module=False, verbose=verbose)
    except Exception as exc:
        (out / "build.log").write_text(f"{type(exc).__name__}: {exc}\n")
        raise BuildError(f"building the CPU emulation of the CUDA kernels failed (log: {out / 'build.log'}):\n{exc}") from exc
    return out / f"{name}.so"


def load() -> Optional[str]:
    """Make the ``torch.ops.mmkernels.cuda_*`` ops available (once per process). Returns None
    when they are, else the reason they are not (also on later calls, without retrying)."""
    global _status
    with _lock:
        if _status is not None:
            return _status or None
        if os.environ.get("MMKERNELS_CUDA", "1").strip().lower() in ("0", "false", "no"):
            _status = "turned off by MMKERNELS_CUDA=0"
            return _status
        try:
            if emulating():
                build_emulator()
            elif (lib := _aot_library()) is not None:
                torch.ops.load_library(lib)
            else:
                src, out = csrc_dir(), build_dir()
                if src is not None and not (out / f"mmkernels_cuda_{build_key(src)}.so").exists():
                    warnings.warn(f"mmkernels: building the CUDA extension into {out} on first use (minutes; "
                                  "'python -m mmkernels.cuda build' does it ahead of time)", stacklevel=3)
                build()
            _status = ""
        except Exception as exc:
            _status = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _status or None


def loaded() -> bool:
    """The real (not emulated) ops are registered in this process (no build attempted)."""
    return _status == "" and not emulating() and hasattr(torch.ops.mmkernels, "cuda_norm_concat_fwd")


def why_not(t: torch.Tensor, explicit: bool, dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> Optional[str]:
    """Common part of every op's ``cuda`` backend ``why_not``: device, dtype, then the library
    (built or loaded on the first call that gets this far)."""
    global _warned
    if t.device.type != "cuda" and not (emulating() and explicit and t.device.type == "cpu"):
        return f"needs CUDA tensors, got {t.device.type}"
    if t.dtype not in dtypes:
        return f"dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    reason = load()
    if reason is None:
        return None
    reason = f"the CUDA C++ extension is unavailable: {reason}"
    if not explicit and not _warned:
        _warned = True
        warnings.warn(f"mmkernels: {reason}; 'auto' uses the Triton kernels instead", stacklevel=4)
    return reason


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory a block may opt into on ``device`` (the emulator: an H100's)."""
    if device.type != "cuda":
        return 227 * 1024
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 * 1024)


# --- auto: the faster of cuda and triton, per op, from measurements ----------------------------

def _table() -> Dict:
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}


def preferred(op: str, t) -> str:
    """``"cuda"`` or ``"triton"``: the backend ``auto`` tries first for ``op`` on ``t``'s device,
    from the measured table (:data:`TABLE`). Without a measurement for this op and GPU: ``"triton"``."""
    if getattr(getattr(t, "device", None), "type", None) != "cuda":
        return "triton"
    entry = _table().get("ops", {}).get(op, {})
    name = torch.cuda.get_device_name(t.device)
    return entry.get(name, entry.get("*", "triton"))


def make_table(results: List[dict]) -> Dict:
    """From mmkernels-bench ``results.json`` contents: per op and GPU name, the provider (cuda or
    triton) with the lower geometric mean of ms over the (case, mode, dtype) rows both ran."""
    import math
    ops: Dict[str, Dict[str, str]] = {}
    evidence: Dict[str, Dict[str, dict]] = {}
    for res in results:
        name = res["machine"].get("name", "?")
        by = {}
        for r in res["rows"]:
            ms = r.get("ms")   # null in JSON where nothing was measured
            if r["provider"] in ("cuda", "triton") and isinstance(ms, (int, float)) and ms == ms and not r.get("error"):
                by.setdefault((r["op"], r["case"], r["mode"], r["dtype"]), {})[r["provider"]] = r["ms"]
        per_op: Dict[str, List[float]] = {}
        for (op, *_), pair in by.items():
            if len(pair) == 2:
                per_op.setdefault(op, []).append(math.log(pair["cuda"] / pair["triton"]))
        for op, logs in per_op.items():
            ratio = math.exp(sum(logs) / len(logs))  # cuda time / triton time
            ops.setdefault(op, {})[name] = "cuda" if ratio < 1 else "triton"
            evidence.setdefault(op, {})[name] = dict(cuda_over_triton=round(ratio, 4), rows=len(logs))
    return dict(ops=ops, evidence=evidence,
                note="generated by 'python -m mmkernels.cuda table <results.json>...' from mmkernels-bench runs "
                     "with both the cuda and triton providers")


def extension_why_not(tensors) -> Optional[str]:
    """``why_not`` of the ops that have no CUDA C++ kernels (concat_linear, fusion_projections)."""
    if tensors[0].device.type != "cuda":
        return f"needs CUDA tensors, got {tensors[0].device.type}"
    return "no CUDA C++ kernel for this op (csrc/ has norm_concat, attention_pool and gated_sum)"
