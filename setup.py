"""Packaging (metadata in pyproject.toml). The CUDA C++ extension is optional:

* ``pip install .`` / ``pip install -e .`` (any machine, no nvcc needed): pure Python; the
  extension is built on first use of the ``cuda`` backend (see mmkernels/cuda).
* ``MMKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .``: compiles csrc/ ahead of time
  into ``mmkernels/_C*.so`` (nvcc and a CUDA build of torch needed; ``TORCH_CUDA_ARCH_LIST``
  respected, default ``8.0;9.0``), which mmkernels loads in preference to a JIT build.

Wheels carry a copy of csrc/ inside the package (``mmkernels/csrc``) so the on-demand build
works from a non-editable install too.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package (mmkernels/csrc) for the on-demand build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "mmkernels" / "csrc"
        if (ROOT / "csrc").is_dir():
            shutil.copytree(ROOT / "csrc", target, dirs_exist_ok=True)
        key = ROOT / "mmkernels" / "_C.sources"
        if key.is_file():
            shutil.copy(key, Path(self.build_lib) / "mmkernels" / "_C.sources")


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("MMKERNELS_BUILD_CUDA", "0").strip().lower() not in ("", "0", "false", "no"):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import sys
    sys.path.insert(0, str(ROOT))
    from mmkernels.cuda import (AOT_KEY, CXX_FLAGS, NVCC_FLAGS, SOURCES, include_dirs, library_dirs,  # noqa: E402
                                sources_hash)

    AOT_KEY.write_text(sources_hash(ROOT / "csrc") + "\n")  # lets the loader tell a stale library

    ext_modules.append(CUDAExtension(
        name="mmkernels._C",
        sources=[f"csrc/{s}" for s in SOURCES],
        include_dirs=[str(ROOT / "csrc")] + include_dirs(),
        library_dirs=library_dirs(),
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    ))
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
