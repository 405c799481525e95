"""The one dispatch mechanism shared by every op.

Backends, one call path each (:mod:`mmkernels.ops._register`):

* ``torch``: the op's fastest plain-PyTorch formulation, differentiated by PyTorch's autograd
  (under ``torch.compile``: plain operations that inductor fuses);
* ``triton``, ``cuda`` (csrc): the kernels, under one ``torch.autograd.Function`` eagerly and the
  registered custom op when traced;
* ``reference``: the spec the tests compare against (explicit forward and backward).

``auto`` tries, per op: on CPU tensors ``torch`` first; on a GPU the fastest measured there first
(from the table read by :func:`mmkernels.cuda.preferred`: cuda, triton, torch where the plain
formulation beat the kernels, or reference; ``triton`` where nothing was measured), then the
others in the order triton, cuda, reference.
Each op folder gives, for every backend, a module with ``forward``/``backward``, its declared
:class:`Capabilities` (``CAPABILITIES``: input dtypes, device types, size limits) and
``why_not(explicit, **inputs)`` for what cannot be declared (is Triton importable, is the CUDA
library built, does a block's shared memory fit this GPU): ``None``, one reason or a list.
:func:`select` collects every reason of every backend it tries, and either returns the chosen
module or raises one :class:`BackendError` listing them all.

The requested backend comes from, innermost first: the call's ``backend=`` argument,
:func:`use_backend` (context manager), :func:`set_backend`, the ``MMKERNELS_BACKEND`` environment
variable read at import, ``"auto"``. The state is process-global (like ``torch.backends`` flags),
not per thread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterator, List, Mapping, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "reference", "triton", "cuda")
AUTO_ORDER = ("triton", "cuda", "reference")  # on a GPU, after the measured-fastest
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


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Limit:
    """A size a backend takes up to ``maximum``: ``value(**inputs)`` measures it, ``what`` names it
    (e.g. "queries per head") and ``why`` says where the limit comes from."""
    what: str
    value: Callable[..., int]
    maximum: int
    why: str = ""

    def reason(self, inputs: Mapping[str, object]) -> Optional[str]:
        v = self.value(**inputs)
        if v <= self.maximum:
            return None
        return f"{v} {self.what} > {self.maximum}" + (f" ({self.why})" if self.why else "")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend declares it takes: the dtypes and device types of its inputs (the first
    tensor argument stands for all: the ops' checks make the others agree) and size limits."""
    dtypes: Tuple[torch.dtype, ...] = _ALL_FLOATS
    devices: Tuple[str, ...] = ("cpu", "cuda")
    limits: Tuple[Limit, ...] = ()

    def reasons(self, inputs: Mapping[str, object]) -> List[str]:
        t = first_tensor(inputs.values())
        if ((t is None or (t.dtype in self.dtypes and t.device.type in self.devices))
                and all(lim.value(**inputs) <= lim.maximum for lim in self.limits)):
            return []                                   # the common case, on every call
        out = []
        if t is not None and t.dtype not in self.dtypes:
            out.append(f"dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in self.dtypes)})")
        if t is not None and t.device.type not in self.devices:
            out.append(f"device type {t.device.type!r} is not supported (supported: {', '.join(self.devices)})")
        out.extend(r for r in (lim.reason(inputs) for lim in self.limits) if r is not None)
        return out


# what the Triton and CUDA C++ kernels take unless a backend says otherwise
KERNEL_CAPABILITIES = Capabilities(dtypes=_KERNEL_DTYPES)


def reasons(impl, explicit: bool, inputs: Mapping[str, object]) -> List[str]:
    """Every reason ``impl`` cannot take ``inputs``: its declared capabilities, then its
    ``why_not``; an empty list when it can. Identical reasons are listed once."""
    if impl is None:
        return ["not implemented for this op"]
    caps = getattr(impl, "CAPABILITIES", None)
    out = caps.reasons(inputs) if caps is not None else []
    extra = impl.why_not(explicit=explicit, **inputs)
    if not (out or extra):
        return out                                      # the common case, on every call
    out.extend([extra] if isinstance(extra, str) else list(extra or ()))
    return list(dict.fromkeys(out))


def first_tensor(values):
    """The first tensor among ``values`` (entries may be tensors, lists of tensors or None)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            v = next((t for t in v if t is not None), None)
        if v is not None and hasattr(v, "device"):
            return v
    return None


_FIRST: dict = {}


@torch.compiler.assume_constant_result
def auto_first(op: str, device: torch.device) -> str:
    """The backend ``auto`` tries first for ``op`` on a GPU ``device`` (cuda, triton, torch or
    reference: :func:`mmkernels.cuda.preferred`, from the dispatch table, read once per process, and the
    GPU's name), kept per op and device: nothing on the call path asks the driver again. Under
    ``torch.compile`` a constant of the trace (dynamo calls this instead of tracing it)."""
    key = (op, device)
    got = _FIRST.get(key)
    if got is None:
        from .cuda import preferred
        got = _FIRST[key] = preferred(op, _On(device))
    return got


class _On:
    """What :func:`mmkernels.cuda.preferred` reads of a tensor: its device."""
    __slots__ = ("device",)

    def __init__(self, device):
        self.device = device


def auto_order(op: str, inputs: Mapping[str, object]):
    """The order ``auto`` tries backends for ``op`` on these inputs: ``torch`` first on CPU
    tensors; on a GPU the measured-fastest there first (:func:`auto_first`: cuda, triton, torch
    where the plain formulation beat the kernels, or reference), then the others in
    :data:`AUTO_ORDER`."""
    t = first_tensor(inputs.values())
    device = getattr(t, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        first = auto_first(op, device)
    elif isinstance(device, torch.device):              # CPU tensors: the plain formulation
        first = "torch"
    else:                                               # no tensor: no measurement applies
        from .cuda import preferred
        first = preferred(op, t)
    return AUTO_ORDER if first == "triton" else (first,) + tuple(b for b in AUTO_ORDER if b != first)


def select(op: str, impls: Mapping[str, object], requested: str, **inputs):
    """Return ``(name, module)`` of the backend that runs ``op`` on ``inputs``.

    ``impls`` maps backend name to a backend module (its ``CAPABILITIES`` and
    ``why_not(explicit: bool, **inputs)`` are asked, see :func:`reasons`).
    ``explicit`` tells a backend whether the user named it (the Triton interpreter path for
    CPU tensors is taken only when asked for by name; ``auto`` never picks it).
    """
    _validate(requested, "backend")
    if requested != "auto":
        impl = impls.get(requested)
        why = reasons(impl, True, inputs)
        if not why:
            return requested, impl
        raise BackendError(f"mmkernels.{op}: backend {requested!r} cannot run these inputs: " + "; ".join(why))
    lines = []
    for name in auto_order(op, inputs):
        impl = impls.get(name)
        why = reasons(impl, False, inputs)
        if not why:
            return name, impl
        lines.append(f"  {name}: " + "; ".join(why))
    raise BackendError(f"mmkernels.{op}: no backend can run these inputs:\n" + "\n".join(lines))
