"""Building and loading the CUDA C++ extension (``csrc/``): JIT, ahead-of-time, prebuilt and
CPU-emulator builds, their paths and the hashes that tell a stale library.

Where the compiled library comes from, first match wins:

1. a **prebuilt folder** written by ``python -m mmkernels.cuda build --out DIR`` (``library.so`` +
   ``manifest.json``): ``$MMKERNELS_CUDA_PREBUILT``, else ``prebuilt/cuda`` of the checkout when it
   exists. Used only when its manifest names the sources' hash at hand, this torch, and (on a GPU)
   an architecture of this GPU; otherwise, or when it refuses to load, the reason is kept
   (:func:`library_info`) and the next source is tried;
2. ``mmkernels/_C*.so``, built ahead of time by ``MMKERNELS_BUILD_CUDA=1 pip install
   --no-build-isolation -e .`` (see setup.py), when built from the sources at hand;
3. a build on first use with ``torch.utils.cpp_extension.load`` (ninja), cached in
   ``$MMKERNELS_CUDA_CACHE`` (default ``~/.cache/mmkernels/cuda``) under a key made of the torch
   and CUDA versions, the target architectures and the sources' hash. Builds into one folder take
   turns (an ``flock`` on ``build.flock``, released by the kernel when its process dies), so
   processes starting together build once; a ``lock`` file that ``cpp_extension`` left behind
   when its process was killed mid-build is removed first (it would block every later build).

``python -m mmkernels.cuda build`` runs step 3 now (no GPU needed) and exits non-zero with the
compiler's message on failure. Architectures (:func:`arch_list`): ``TORCH_CUDA_ARCH_LIST`` when
set; else, for a build on first use on a machine with a GPU, that GPU's; else :data:`DEFAULT_ARCHS`
(A100, RTX 30/40 and L4, H100/H200, B200, RTX 50, and PTX for newer chips), which is also what
the wheel (setup.py) is built for. ``9.0`` for ``build --out``. ``MMKERNELS_CUDA=0`` turns the
backend off. Importing mmkernels never builds or loads anything.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

PACKAGE = Path(__file__).resolve().parent.parent
ROOT = PACKAGE.parent           # the checkout, for an editable install
# csrc/ of a source checkout (editable install), or the copy a wheel carries (setup.py build_py)
CSRC_CANDIDATES = (PACKAGE.parent / "csrc", PACKAGE / "csrc")
# per op family, its kernels (<op>.cu: no torch headers, compiled once per target by nvcc) and its
# torch glue (<op>_ops.cpp: checks, outputs, the op's registration, compiled once by the host
# compiler); each glue file registers its own ops (TORCH_LIBRARY_FRAGMENT)
OP_FAMILIES = ("norm_concat", "attention_pool", "gated_sum")
SOURCES = tuple(f"{op}{ext}" for op in OP_FAMILIES for ext in (".cu", "_ops.cpp"))
HEADERS = ("launch.h", "device.cuh", "host.h") + tuple(f"{op}.h" for op in OP_FAMILIES)
# sm_80 (A100), sm_86 / sm_89 (RTX 30 / RTX 40, L4), sm_90 (H100/H200), sm_100 (B200), sm_120
# (RTX 50), and sm_120's PTX, which the driver compiles for chips newer than all of these
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# no --use_fast_math: it turns fp32 tanhf into tanh.approx (fp32 outputs must stay within fp32
# tolerances; the kernels use tanh.approx for 16-bit outputs only). Division and square root may be
# the 2-ulp versions: fewer registers (less spill in norm_concat's backward), far inside tolerances.
# C++20: torch >= 2.14's headers refuse anything older (torch 2.11's accept it too)
NVCC_FLAGS = ["-O3", "-prec-div=false", "-prec-sqrt=false", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr"]
CXX_FLAGS = ["-O3", "-std=c++20"]
EMULATE_VAR = "MMKERNELS_CUDA_EMULATE"  # tests: build csrc/ for the CPU emulator (csrc/emu/simt.h)
PREBUILT_VAR = "MMKERNELS_CUDA_PREBUILT"  # a folder written by build(out=...)
DEFAULT_PREBUILT = ROOT / "prebuilt" / "cuda"
PREBUILT_LIBRARY, PREBUILT_MANIFEST = "library.so", "manifest.json"

_lock = threading.Lock()
_status: Optional[str] = None      # None: not tried; "": loaded; otherwise why it is unavailable
_info: Dict[str, Optional[str]] = {}   # where the loaded library came from, and why a prebuilt one was passed over


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
    """The architectures a build targets: ``TORCH_CUDA_ARCH_LIST``; else the visible GPUs' (a
    build on first use serves this machine: one target compiles fastest); else
    :data:`DEFAULT_ARCHS`."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCHS


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


@functools.lru_cache(maxsize=None)
def _nvcc_include(home: Optional[str]) -> Optional[Path]:
    """The folder of nvcc's own CUDA headers (``cuda_runtime.h``), as nvcc reports it: CUDA_HOME
    may be ``/usr/local`` when nvcc is found on PATH through a wrapper script."""
    if not home:
        return None
    if (Path(home) / "include" / "cuda_runtime.h").is_file():
        return Path(home) / "include"
    try:
        proc = subprocess.run([str(Path(home) / "bin" / "nvcc"), "-dryrun", "-E", "-x", "cu", os.devnull],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    for inc in re.findall(r'INCLUDES="-I([^"]+)"', proc.stdout + proc.stderr):
        if (Path(inc) / "cuda_runtime.h").is_file():
            return Path(inc).resolve()
    return None


def toolkit_include_dirs() -> List[str]:
    """nvcc's own header folder where the host compiler would not find it (CUDA_HOME is
    ``/usr/local`` when nvcc is found on PATH through a wrapper): the glue files include ATen's
    CUDA headers, which include the CUDA runtime's, and the host compiler builds them."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    toolkit = _nvcc_include(home)
    if toolkit is None or (Path(home) / "include" / "cuda_runtime.h").is_file():
        return []
    return [str(toolkit)]


def include_dirs() -> List[str]:
    """Header folders beyond CUDA_HOME's: with a pip-installed CUDA (the ``nvidia-*`` wheels torch
    depends on) cuSPARSE / cuBLAS headers that ATen's CUDA headers include live under
    ``site-packages/nvidia/*/include``, not next to nvcc. Where nvcc has its own headers, only
    those it lacks are taken from there (linked into one folder under :func:`cache_root`): the
    pip folder also holds a CUDA runtime and libcu++ of the wheels' version, which would shadow
    nvcc's own and fail the build when the versions differ."""
    from torch.utils import cpp_extension

    toolkit = _nvcc_include(cpp_extension.CUDA_HOME)
    if toolkit is not None and (toolkit / "cusparse.h").is_file():
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        for inc in sorted(Path(root).glob("*/include")):
            if (inc / "cusparse.h").is_file() or (inc / "cublas_v2.h").is_file():
                found.append(inc)
    if toolkit is None or not found:
        return [str(d) for d in found]
    key = hashlib.sha256("\n".join(map(str, [toolkit.resolve()] + found)).encode()).hexdigest()[:16]
    shim = cache_root() / f"cuda-include-{key}"
    shim.mkdir(parents=True, exist_ok=True)
    for inc in found:
        for entry in inc.iterdir():
            link = shim / entry.name
            if (toolkit / entry.name).exists() or link.is_symlink():
                continue
            with contextlib.suppress(FileExistsError):  # another process linked it first
                link.symlink_to(entry)
    return [str(shim)]


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


AOT_KEY = PACKAGE / "_C.sources"   # what the ahead-of-time library was built from: aot_key()


def aot_key(src: Path) -> str:
    """The text of :data:`AOT_KEY` for a library built now from ``src``: the sources' hash and
    this torch's version (the library links against torch's C++ ABI)."""
    return f"{sources_hash(src)}\ntorch {torch.__version__}\n"


def _aot_library() -> Optional[str]:
    """``mmkernels/_C*.so`` when it was built from the sources at hand for this torch (a stale
    one, built before csrc/ changed or for another torch, is ignored: the on-demand build takes
    over)."""
    hits = sorted(glob.glob(str(PACKAGE / "_C*.so")))
    if not hits:
        return None
    src = csrc_dir()
    key = AOT_KEY.read_text().split("\n") if AOT_KEY.is_file() else [""]
    why = None
    if src is not None and key[0].strip() != sources_hash(src):
        why = f"built from other sources than {src}"
    elif len(key) > 1 and key[1].strip() and key[1].strip() != f"torch {torch.__version__}":
        why = f"built for {key[1].strip()}, this is torch {torch.__version__}"
    if why:
        warnings.warn(f"mmkernels: ignoring {hits[0]}: {why}; install a wheel built for these, or rebuild "
                      "with MMKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .", stacklevel=4)
        return None
    return hits[0]


@contextlib.contextmanager
def _build_turn(folder: Path):
    """Hold the folder's build turn. Whoever holds it is the only builder there, so a
    ``cpp_extension`` ``lock`` file found then was left by a builder that died: remove it."""
    with open(folder / "build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(verbose: bool = False, out: Optional[os.PathLike] = None) -> Path:
    """Compile the extension from csrc/ into the cache (or reuse the cached build) and load it
    into this process. Returns the library's path; raises :class:`BuildError` with the compiler's
    output (also written to ``build.log`` in the build folder).

    ``out``: also copy the library into that folder as a prebuilt one (``library.so`` and
    ``manifest.json``: the sources' hash, build key, torch and CUDA versions, architectures), which
    :func:`load` takes before anything else when it matches; returns the copy's path then."""
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        raise BuildError(f"the CUDA sources are not here (looked for {', '.join(SOURCES)} in "
                         f"{', '.join(str(c) for c in CSRC_CANDIDATES)})")
    if cpp_extension.CUDA_HOME is None:
        raise BuildError("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"mmkernels_cuda_{build_key(src)}"
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
    log = folder / "build.log"
    try:
        with _build_turn(folder):
            cpp_extension.load(name=name, sources=[str(src / s) for s in SOURCES], build_directory=str(folder),
                               extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS,
                               extra_include_paths=[str(src)] + toolkit_include_dirs() + include_dirs(),
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
    lib = folder / f"{name}.so"
    if out is None:
        return lib
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PREBUILT_LIBRARY}.tmp"
    shutil.copyfile(lib, tmp)
    os.replace(tmp, out / PREBUILT_LIBRARY)
    manifest = dict(sources_hash=sources_hash(src), build_key=build_key(src), torch=torch.__version__,
                    cuda=torch.version.cuda, archs=arch_list(), nvcc_flags=NVCC_FLAGS, cxx_flags=CXX_FLAGS,
                    built=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    (out / PREBUILT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out / PREBUILT_LIBRARY


def prebuilt_dir() -> Path:
    """The prebuilt folder :func:`load` looks at: ``$MMKERNELS_CUDA_PREBUILT``, else ``prebuilt/cuda``
    of the checkout."""
    env = os.environ.get(PREBUILT_VAR, "").strip()
    return Path(env) if env else DEFAULT_PREBUILT


def prebuilt_library(folder: Optional[os.PathLike] = None) -> Tuple[Optional[Path], str]:
    """``(library, "")`` when the prebuilt ``folder`` (default :func:`prebuilt_dir`) holds a library
    built from the sources at hand for this torch (and, on a GPU, for its architecture); else
    ``(None, why not)``. Reads only the manifest: a stale library is never loaded."""
    folder = Path(folder) if folder is not None else prebuilt_dir()
    lib, man = folder / PREBUILT_LIBRARY, folder / PREBUILT_MANIFEST
    if not lib.is_file() or not man.is_file():
        return None, f"no prebuilt library in {folder} ('python -m mmkernels.cuda build --out {folder}' makes one)"
    try:
        manifest = json.loads(man.read_text())
    except ValueError as exc:
        return None, f"{man} is not valid JSON ({exc})"
    src = csrc_dir()
    if src is None:
        return None, "the CUDA sources are not here, so the prebuilt library cannot be checked against them"
    if manifest.get("sources_hash") != sources_hash(src):
        return None, (f"{lib} is stale: built from other sources (hash {str(manifest.get('sources_hash'))[:12]}, "
                      f"csrc/ now {sources_hash(src)[:12]})")
    if manifest.get("torch") != torch.__version__:
        return None, f"{lib} was built for torch {manifest.get('torch')}, this is torch {torch.__version__}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = {a.strip().replace("+PTX", "") for a in str(manifest.get("archs", "")).split(";")}
        if f"{major}.{minor}" not in archs:
            return None, f"{lib} was built for {manifest.get('archs')}, this GPU is sm_{major}{minor}"
    return lib, ""


def library_info() -> Dict[str, Optional[str]]:
    """Where the loaded library came from (``source``: prebuilt, ahead-of-time, cache, fresh
    build, emulator), its ``path``, and ``prebuilt``: why the prebuilt folder was passed over
    (``None`` when it was used). Empty before :func:`load`."""
    return dict(_info)


def _load_prebuilt() -> Optional[Path]:
    lib, why = prebuilt_library()
    if lib is None:
        _info["prebuilt"] = why
        return None
    try:
        torch.ops.load_library(str(lib))
    except Exception as exc:  # e.g. a library built against other system libraries
        _info["prebuilt"] = f"{lib} refused to load: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None
    _info["prebuilt"] = None
    return lib


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
    # the wrappers below name csrc/ by its path, so two checkouts of the same sources get two
    # build folders (one would rewrite the wrappers, and rebuild, while the other loads the library)
    key = hashlib.sha256((build_key(src) + (src / "emu" / "simt.h").read_text() + " ".join(flags)
                          + str(src.resolve())).encode()).hexdigest()[:16]
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
        with _build_turn(out):
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
                _info.update(source="emulator", path=str(build_emulator()))
            elif (lib := _load_prebuilt()) is not None:
                _info.update(source="prebuilt", path=str(lib))
            elif (lib := _aot_library()) is not None:
                torch.ops.load_library(lib)
                _info.update(source="ahead-of-time", path=lib)
            else:
                src, out = csrc_dir(), build_dir()
                cached = src is not None and (out / f"mmkernels_cuda_{build_key(src)}.so").exists()
                if not cached:
                    warnings.warn(f"mmkernels: building the CUDA extension into {out} on first use (minutes; "
                                  "'python -m mmkernels.cuda build' does it ahead of time)", stacklevel=3)
                _info.update(source="cache" if cached else "fresh build", path=str(build()))
            _status = ""
        except Exception as exc:
            _status = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _status or None


def cuobjdump() -> str:
    """A ``cuobjdump``: next to nvcc, on PATH, or the one the triton wheel carries."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    for c in ([str(Path(home) / "bin" / "cuobjdump")] if home else []) + [shutil.which("cuobjdump") or ""]:
        if c and os.access(c, os.X_OK):
            return c
    try:
        import triton
    except ImportError as exc:
        raise BuildError("cuobjdump was not found (no CUDA toolkit, no triton)") from exc
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def arch_targets(archs: str) -> Dict[str, List[str]]:
    """What :func:`library_targets` finds in a library built for ``archs`` (a
    ``TORCH_CUDA_ARCH_LIST``): machine code for each, PTX for those marked ``+PTX``."""
    nums = [(a.split("+")[0].replace(".", ""), a.endswith("+PTX")) for a in archs.replace(" ", ";").split(";") if a]
    order = lambda names: sorted(set(names), key=lambda a: int(a.split("_")[1]))  # noqa: E731
    return {"sass": order(f"sm_{n}" for n, _ in nums), "ptx": order(f"compute_{n}" for n, ptx in nums if ptx)}


def library_targets(lib: os.PathLike) -> Dict[str, List[str]]:
    """What a compiled library carries: ``sass``, the machine code's architectures (``sm_90``,
    ...), and ``ptx``, the PTX's (``compute_120``), each sorted by number."""
    def listed(kind: str, suffix: str) -> List[str]:
        proc = subprocess.run([cuobjdump(), f"--list-{kind}", str(lib)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 and "does not contain" not in proc.stderr:
            raise BuildError(f"cuobjdump --list-{kind} {lib} failed: {proc.stderr.strip()[-500:]}")
        return sorted(set(re.findall(rf"\.sm_(\d+a?)\.{suffix}\b", proc.stdout)), key=lambda a: int(a.rstrip("a")))
    return {"sass": [f"sm_{a}" for a in listed("elf", "cubin")], "ptx": [f"compute_{a}" for a in listed("ptx", "ptx")]}


def registered_ops() -> List[str]:
    """The ``cuda_*`` ops registered in this process's op namespace (:func:`ops`)."""
    import torch._C
    ns = "mmkernels_emu" if emulating() else "mmkernels"
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith(f"{ns}::cuda_"))


def loaded() -> bool:
    """The real (not emulated) ops are registered in this process (no build attempted)."""
    return _status == "" and not emulating() and hasattr(torch.ops.mmkernels, "cuda_norm_concat_fwd")


