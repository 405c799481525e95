"""The one dispatch mechanism shared by every op.

Backends: ``cuda`` (csrc), ``triton``, ``reference``. ``auto`` tries, per op, the faster of
``cuda`` and ``triton`` on this GPU first (from the measured table read by
:func:`mmkernels.cuda.preferred`; ``triton`` where nothing was measured), then the other, then
``reference``.
Each op folder gives, for every backend, a module with ``why_not(**inputs) -> str | None``
(``None``: "I can take these inputs") plus ``forward``/``backward``.  :func:`select` asks them and
either returns the chosen module or raises one :class:`BackendError` listing every reason.

The requested backend comes from, innermost first: :func:`use_backend` (context manager),
:func:`set_backend`, the ``MMKERNELS_BACKEND`` environment variable read at import, ``"auto"``.
The state is process-global (like ``torch.backends`` flags), not per thread.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

BACKENDS = ("auto", "reference", "triton", "cuda")
AUTO_ORDER = ("triton", "cuda", "reference")  # without a measurement saying cuda is faster
ENV_VAR = "MMKERNELS_BACKEND"


class BackendError(ValueError):
    """The requested backend cannot take these inputs (the message says why)."""


def _validate(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


_requested: str = _validate(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto",
                            f"environment variable {ENV_VAR}")


def get_backend() -> str:
    """The backend name ops will request now (``"auto"`` unless set otherwise)."""
    return _requested


def set_backend(name: str) -> None:
    """Select the backend for every op from now on: one of ``BACKENDS``."""
    global _requested
    _requested = _validate(name, "set_backend(name)")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with mmkernels.use_backend("triton"): ...`` — select a backend inside the block only."""
    global _requested
    previous = _requested
    _requested = _validate(name, "use_backend(name)")
    try:
        yield
    finally:
        _requested = previous


def _first_tensor(inputs: Mapping[str, object]):
    for v in inputs.values():
        if isinstance(v, (list, tuple)):
            v = next((t for t in v if t is not None), None)
        if v is not None and hasattr(v, "device"):
            return v
    return None


def auto_order(op: str, inputs: Mapping[str, object]):
    """The order ``auto`` tries backends for ``op`` on these inputs: the measured-faster of cuda
    and triton on their GPU first (:func:`mmkernels.cuda.preferred`), then the other, then reference."""
    from .cuda import preferred
    first = preferred(op, _first_tensor(inputs))
    return AUTO_ORDER if first != "cuda" else ("cuda", "triton", "reference")


def select(op: str, impls: Mapping[str, object], requested: str, **inputs):
    """Return ``(name, module)`` of the backend that runs ``op`` on ``inputs``.

    ``impls`` maps backend name to a module exposing ``why_not(explicit: bool, **inputs)``.
    ``explicit`` tells a backend whether the user named it (the Triton interpreter path for
    CPU tensors is taken only when asked for by name; ``auto`` never picks it).
    """
    _validate(requested, "backend")
    if requested != "auto":
        impl = impls.get(requested)
        reason = "not implemented for this op" if impl is None else impl.why_not(explicit=True, **inputs)
        if reason is None:
            return requested, impl
        raise BackendError(f"mmkernels.{op}: backend {requested!r} cannot run these inputs: {reason}")
    reasons = []
    for name in auto_order(op, inputs):
        impl = impls.get(name)
        reason = "not implemented for this op" if impl is None else impl.why_not(explicit=False, **inputs)
        if reason is None:
            return name, impl
        reasons.append(f"  {name}: {reason}")
    raise BackendError(f"mmkernels.{op}: no backend can run these inputs:\n" + "\n".join(reasons))
