"""Packaging (metadata in pyproject.toml). The CUDA C++ extension is optional:

* ``pip install .`` / ``pip install -e .`` (any machine, no nvcc needed): pure Python; the
  extension is built on first use of the ``cuda`` backend (see mmkernels/cuda).
* ``MMKERNELS_BUILD_CUDA=1 python -m build --wheel --no-isolation`` (or ``pip wheel
  --no-build-isolation .``, ``pip install --no-build-isolation -e .``): compiles csrc/ ahead of time
  into ``mmkernels/_C*.so`` (nvcc and a CUDA build of torch in the build environment; no build
  isolation, since the build imports that torch). Targets: ``TORCH_CUDA_ARCH_LIST``, default
  ``mmkernels.cuda.DEFAULT_ARCHS``. The compile goes through mmkernels.cuda's builder (same flags
  and cache as a build on first use); the wheel then carries the library and ``mmkernels/_C.sources``
  (the sources' hash and the torch it was built for), and installs where there is no compiler.

Wheels carry a copy of csrc/ inside the package (``mmkernels/csrc``) so the on-demand build
works from a non-editable install too.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package (mmkernels/csrc) for the on-demand build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "mmkernels" / "csrc"
        if (ROOT / "csrc").is_dir():
            shutil.copytree(ROOT / "csrc", target, dirs_exist_ok=True)


class BuildCudaLibrary(build_ext):
    """Compile csrc/ with mmkernels.cuda's builder and place the library as ``mmkernels/_C*.so``,
    with its key (``_C.sources``) beside it."""

    def build_extension(self, ext):
        sys.path.insert(0, str(ROOT))
        from mmkernels.cuda import builder

        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", builder.DEFAULT_ARCHS)
        print(f"building mmkernels/_C for TORCH_CUDA_ARCH_LIST={builder.arch_list()} in {builder.build_dir()}",
              flush=True)
        lib = builder.build(verbose=bool(self.verbose))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib, target)
        (target.parent / builder.AOT_KEY.name).write_text(builder.aot_key(builder.csrc_dir()))

    def run(self):
        super().run()
        if self.inplace and self.extensions:  # --inplace or editable: the checkout's mmkernels/_C*.so is loaded
            from mmkernels.cuda import builder
            builder.AOT_KEY.write_text(builder.aot_key(builder.csrc_dir()))


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("MMKERNELS_BUILD_CUDA", "0").strip().lower() not in ("", "0", "false", "no"):
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise SystemExit("MMKERNELS_BUILD_CUDA=1 compiles against the installed torch, which this build "
                         "environment lacks: build without isolation (pip --no-build-isolation, "
                         "python -m build --no-isolation) where torch is installed") from exc
    ext_modules.append(Extension("mmkernels._C", sources=[]))
    cmdclass["build_ext"] = BuildCudaLibrary

setup(ext_modules=ext_modules, cmdclass=cmdclass)
