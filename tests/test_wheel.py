"""The wheel a user installs: built with ``MMKERNELS_BUILD_CUDA=1`` it carries the compiled CUDA C++
library for every target, and installed into a fresh venv whose PATH has no nvcc, mmkernels loads
that library and registers the ``cuda_*`` ops without building anything.

The wheel's compile goes through the builder's cache, the same build that tests/test_cuda.py's
target checks inspect (same xdist group: one worker, one nvcc build)."""
import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import mmkernels.cuda as ext

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cuda_build")]

# the child: a build of any kind (the builder, cpp_extension, the emulator) fails the test
CHILD = """
import json, shutil, sys
from torch.utils import cpp_extension


def refuse(*args, **kwargs):
    raise AssertionError("a build of the CUDA extension was attempted")


cpp_extension.load = refuse
import mmkernels
import mmkernels.cuda as ext
ext.builder.build = ext.builder.build_emulator = refuse
reason = ext.load()
print(json.dumps(dict(file=mmkernels.__file__, reason=reason, info=ext.library_info(), loaded=ext.loaded(),
                      ops=ext.registered_ops(), nvcc=shutil.which("nvcc"))))
"""


def _schemas():
    """The op names csrc/ defines (``m.def("cuda_...(``)."""
    text = "".join((ROOT / "csrc" / name).read_text() for name in ext.SOURCES)
    return sorted(set(re.findall(r'm\.def\("(cuda_\w+)\(', text)))


def _fresh_venv(where: Path) -> Path:
    """A venv without mmkernels whose interpreter sees this environment's packages (torch,
    triton, numpy: no download) through a .pth file listing a folder of links to them, the
    installed mmkernels (an editable install here) left out."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where / "venv")], check=True, timeout=300)
    python = where / "venv" / "bin" / "python"
    deps = where / "deps"
    deps.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if not entry.name.startswith(("mmkernels", "__editable__", "_mmkernels")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=300).stdout.strip()
    Path(purelib, "environment.pth").write_text(f"{deps}\n")
    return python


def test_wheel_carries_the_library_and_installs_without_a_compiler(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "PYTHONPATH", ext.EMULATE_VAR, "MMKERNELS_CUDA_SOURCES")}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                            "-w", str(tmp_path / "dist"), str(ROOT)], env={**env, "MMKERNELS_BUILD_CUDA": "1"},
                           capture_output=True, text=True, timeout=3000)
    assert build.returncode == 0, (build.stdout[-3000:], build.stderr[-3000:])
    (wheel,) = (tmp_path / "dist").glob("mmkernels-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), f"{wheel.name}: a wheel with a compiled library is platform-specific"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (lib,) = [n for n in names if re.fullmatch(r"mmkernels/_C[^/]*\.so", n)]
        assert z.read("mmkernels/_C.sources").decode() == ext.aot_key(ROOT / "csrc")
        assert {f"mmkernels/csrc/{s}" for s in ext.SOURCES + ext.HEADERS} <= set(names)
        z.extract(lib, tmp_path / "unpacked")
    assert ext.library_targets(tmp_path / "unpacked" / lib) == ext.arch_targets(ext.DEFAULT_ARCHS)

    python = _fresh_venv(tmp_path)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                              str(wheel)], env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, (install.stdout[-3000:], install.stderr[-3000:])

    # no nvcc on PATH, no CUDA_HOME, an empty build cache that must stay empty
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not Path(d, "nvcc").exists()]
    child_env = {k: v for k, v in env.items() if k not in ("CUDA_HOME", "CUDA_PATH", "MMKERNELS_CUDA")}
    cache = tmp_path / "cache"
    child_env.update(PATH=os.pathsep.join([str(python.parent)] + path), MMKERNELS_CUDA_CACHE=str(cache),
                     MMKERNELS_CUDA_PREBUILT=str(tmp_path / "no-prebuilt"), VIRTUAL_ENV=str(python.parent.parent))
    child = subprocess.run([str(python), "-c", CHILD], cwd=tmp_path, env=child_env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["nvcc"] is None
    assert Path(got["file"]).is_relative_to(tmp_path / "venv"), got["file"]
    assert got["reason"] is None and got["loaded"], got
    assert got["info"]["source"] == "ahead-of-time" and Path(got["info"]["path"]).is_relative_to(tmp_path / "venv")
    assert got["ops"] == _schemas() and len(got["ops"]) >= 7, got["ops"]
    assert not cache.exists() or not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())
