"""Where Triton's internals differ between the releases the package supports (3.6 to 3.9), the
version-tolerant path: shims that keep to what the older release did, so they change nothing there."""
from __future__ import annotations

from typing import Optional

_patched: list = []


def interpreter_mask_dtypes() -> Optional[str]:
    """Let the interpreter's masked loads and stores take integer masks again (once per process).

    Triton's interpreter stores some ``int1`` values in integer arrays: a scalar comparison
    (``n > start``, ``E > 1`` on a runtime integer) splatted against a block mask gives ``int32``
    data. Up to 3.6 its C++ ``load``/``store`` read any integer mask as nonzero = true; 3.9's
    reject it ("mask has unsupported dtype"). Compiled kernels are unaffected (the mask is an
    ``i1`` there). The interpreter's masked load and store get such a mask as ``bool`` first:
    what 3.6 did inside, so a no-op there. (Not probed by calling the C++ load with an integer
    mask: the exception it throws aborts a process with AddressSanitizer preloaded, as the CUDA
    emulator's sanitizer test runs.) Returns what was done."""
    if _patched:
        return _patched[0]
    _patched.append(None)
    import numpy as np
    try:
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
        load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
    except (ImportError, AttributeError):   # pragma: no cover - another interpreter: leave it alone
        return None

    def as_bool(mask):
        data = getattr(mask, "data", None)
        if isinstance(data, np.ndarray) and data.dtype != np.bool_:
            return TensorHandle(data.astype(np.bool_), mask.dtype)
        return mask

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        return load(self, ptrs, as_bool(mask), *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        return store(self, ptrs, value, as_bool(mask), *args, **kwargs)

    InterpreterBuilder.create_masked_load = create_masked_load
    InterpreterBuilder.create_masked_store = create_masked_store
    _patched[0] = "interpreter masked load/store: integer masks converted to bool"
    return _patched[0]
