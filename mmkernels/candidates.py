"""Design candidates of the Triton kernels, settled per GPU by the GPU check's tournament.

Where the fastest design of a kernel cannot be settled without a GPU (a padded or an unrolled
modality loop, rows per program, a persistent grid), its op ships two or three candidates behind
one *slot*, ``"op.pass"`` (e.g. ``"gated_sum.bwd"``), each verified on CPU like every kernel: the
interpreter against the float64 reference, the sm_90 ahead-of-time compile and Triton's launcher.
A kernel asks :func:`choice` which candidate to launch:

1. a forced choice, for tests and the tournament: :func:`force` / :func:`use`, or the
   environment variable ``MMKERNELS_CANDIDATES="gated_sum.bwd=unrolled,..."`` (read at import);
2. the winner the tournament measured on this GPU's model, else on its chip class
   (:data:`TABLE`, written by ``python -m mmkernels.gpucheck record`` from the ``tournament``
   step: every candidate checked against the reference and timed at the headline, a small and a
   ragged shape; one that fails the check never wins);
3. the slot's default: its first candidate.

The choice is looked up once per GPU, so it costs a dictionary lookup per call.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "candidates.json")
ENV = "MMKERNELS_CANDIDATES"

SLOTS: Dict[str, Tuple[str, ...]] = {}          # slot -> candidate names, the default first
_forced: Dict[str, str] = {}
_per_gpu: Dict[int, Dict[str, str]] = {}        # GPU index -> slot -> the table's winner


def _parse(text: str) -> Dict[str, str]:
    chosen = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        slot, sep, name = item.partition("=")
        if not sep or not slot.strip() or not name.strip():
            raise ValueError(f"environment variable {ENV}: expected 'op.pass=candidate[,...]', got {item!r}")
        chosen[slot.strip()] = name.strip()
    return chosen


_forced.update(_parse(os.environ.get(ENV, "")))


def declare(slot: str, names: Sequence[str]) -> str:
    """Register ``slot``'s candidates (the first is the default) and return ``slot``."""
    names = tuple(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"candidates of {slot!r}: expected distinct names, got {names!r}")
    SLOTS[slot] = names
    if slot in _forced and _forced[slot] not in names:
        raise ValueError(f"environment variable {ENV}: {slot!r} has no candidate {_forced[slot]!r} "
                         f"(candidates: {', '.join(names)})")
    return slot


def check_forced() -> None:
    """Raise if a forced choice names a slot no op declared (called once every op is imported)."""
    unknown = sorted(set(_forced) - set(SLOTS))
    if unknown:
        raise ValueError(f"environment variable {ENV}: no such slot {', '.join(map(repr, unknown))} "
                         f"(slots: {', '.join(sorted(SLOTS)) or 'none'})")


def _check(slot: str, name: Optional[str]) -> None:
    if slot not in SLOTS:
        raise ValueError(f"candidate slot: expected one of {', '.join(sorted(SLOTS))}, got {slot!r}")
    if name is not None and name not in SLOTS[slot]:
        raise ValueError(f"candidate of {slot!r}: expected one of {', '.join(SLOTS[slot])}, got {name!r}")


def force(slot: str, name: Optional[str]) -> None:
    """Launch candidate ``name`` for ``slot`` from now on, on every device (None: undo)."""
    _check(slot, name)
    if name is None:
        _forced.pop(slot, None)
    else:
        _forced[slot] = name


@contextlib.contextmanager
def use(slot: str, name: str) -> Iterator[None]:
    """``with candidates.use("gated_sum.bwd", "unrolled"): ...`` — that candidate inside the block
    (every launch made in it, backward passes included if they run in it)."""
    _check(slot, name)
    previous = _forced.get(slot)
    _forced[slot] = name
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(slot, None)
        else:
            _forced[slot] = previous


def measured(index: int) -> Dict[str, str]:
    """The tournament's winners for GPU ``index``: its chip class's, overridden by its model's
    (:data:`TABLE`); only names the slots still declare."""
    from .runtime import gpu_keys, read_table
    winners = read_table(TABLE, "winners")
    name, chip_class = gpu_keys(index)
    got = dict(winners.get(chip_class, {}))
    got.update(winners.get(name, {}))
    return {slot: c for slot, c in got.items() if c in SLOTS.get(slot, ())}


def choice(slot: str, device: torch.device) -> str:
    """The candidate of ``slot`` to launch for tensors on ``device``."""
    forced = _forced.get(slot)
    if forced is not None:
        return forced
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        table = _per_gpu.get(index)
        if table is None:
            table = _per_gpu[index] = measured(index)
        won = table.get(slot)
        if won is not None:
            return won
    return SLOTS[slot][0]


def reset() -> None:
    """Forget the winners looked up per GPU (after the table changed), and the call plans made
    with them."""
    from . import plans
    _per_gpu.clear()
    plans.forget()
