"""The CUDA C++ extension (``csrc/``): :mod:`.builder` builds and loads it (JIT, ahead of time,
prebuilt folders, the CPU emulator; paths and the hashes that tell a stale library),
:mod:`.dispatch` decides when the ``cuda`` backend can run and whether ``auto`` tries it first.

Every name other modules use is re-exported here (``mmkernels.cuda.load``, ``.why_not``,
``.preferred``, ...). Module state lives in its own module: patch ``builder._status`` or
``dispatch.TABLE``, not this package's copies.
"""
from . import builder, dispatch  # noqa: F401
from .builder import (AOT_KEY, CSRC_CANDIDATES, CXX_FLAGS, DEFAULT_ARCHS, DEFAULT_PREBUILT, EMULATE_VAR,  # noqa: F401
                      HEADERS, NVCC_FLAGS, PACKAGE, PREBUILT_LIBRARY, PREBUILT_MANIFEST, PREBUILT_VAR, SOURCES,
                      BuildError, _aot_library, aot_key, arch_list, arch_targets, build, build_dir, build_emulator,
                      build_key, cache_root, csrc_dir, cuobjdump, emulating, include_dirs, library_dirs,
                      library_info, library_targets, load, loaded, ops, prebuilt_dir, prebuilt_library,
                      registered_ops, sources_hash)
from .dispatch import (TABLE, extension_why_not, gpu_class, make_table, measured_classes, preferred,  # noqa: F401
                       shared_memory_per_block, why_not)
