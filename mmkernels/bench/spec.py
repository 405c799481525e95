from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
SAVE_INPUTS = "fwd+bwd save-inputs"   # traffic key: a forward and a backward that each read what they need


@dataclasses.dataclass
class Case:
    """One named size, taken from a real model. ``tags``: "quick" (in --quick), "cpu" (small
    enough to time on a CPU)."""
    name: str
    params: dict
    tags: Tuple[str, ...] = ()


@dataclasses.dataclass
class Inputs:
    args: tuple                      # positional arguments of every provider
    leaves: List[torch.Tensor]       # tensors gradients are taken for (requires_grad set by the harness)
    grad_out: torch.Tensor           # upstream gradient for bwd modes (random, never zeros)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Least bytes a mode must read and write."""
    read: int
    written: int

    @property
    def total(self) -> int:
        return self.read + self.written


def traffic(sizes: Dict[str, int], fwd: Tuple[Iterable[str], Iterable[str]],
            bwd: Tuple[Iterable[str], Iterable[str]]) -> Dict[str, Traffic]:
    """The one floor definition every op uses. ``sizes``: bytes of each tensor by name; ``fwd`` and
    ``bwd``: the (read, written) tensor names of each pass. Each tensor that must move counts once:
    ``fwd`` and ``bwd`` are their own passes; ``fwd+bwd`` is the union of both passes (a tensor both
    read counts once; the forward's output counts as written once even if the backward reads it).
    :data:`SAVE_INPUTS` is the sum of the two passes: what a forward plus a backward that saves only
    the inputs (and re-reads them) must move."""
    (fr, fw), (br, bw) = [(set(r), set(w)) for r, w in (fwd, bwd)]
    size = lambda names: sum(sizes[n] for n in names)
    written = fw | bw
    return {"fwd": Traffic(size(fr), size(fw)), "bwd": Traffic(size(br), size(bw)),
            "fwd+bwd": Traffic(size((fr | br) - written), size(written)),
            SAVE_INPUTS: Traffic(size(fr) + size(br), size(fw) + size(bw))}


@dataclasses.dataclass
class BenchSpec:
    """What an op folder tells the harness. ``providers`` map a name to ``f(*inputs.args)``; a
    provider that cannot run raises (the reason is shown in its row). ``traffic(case, dtype)`` gives
    the least bytes of every mode (built with :func:`traffic`) and ``flops`` the arithmetic, from
    which the floor is computed."""
    op: str
    cases: Sequence[Case]
    make_inputs: Callable[[Case, torch.dtype, torch.device], Inputs]
    providers: Dict[str, Callable]
    traffic: Callable[[Case, torch.dtype], Dict[str, Traffic]]
    flops: Callable[[Case, str], int] = lambda case, mode: 0
    baselines: Tuple[str, ...] = ("eager", "compile")
    # providers that time a bound (e.g. cuBLAS on pre-made inputs) rather than compute the op
    bounds: Tuple[str, ...] = ()

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise ValueError(f"case: {self.op} has no case {name!r} (has {', '.join(c.name for c in self.cases)})")


def backend_provider(fn: Callable, backend: str) -> Callable:
    """A provider that runs ``fn`` (a public mmkernels op) on one backend, through its ``backend``
    keyword: what a user's call costs (a ``use_backend`` block around each call would add its own
    few microseconds to the per-call figures). A ``functools.partial``: no Python frame of its own,
    so a provider that wraps it costs what a plain provider's wrapper costs."""
    return functools.partial(fn, backend=backend)


class CompileError(RuntimeError):
    """The compiled baseline did not run as one static graph (it recompiled or fell back to eager)."""


class compiled_provider:
    """``torch.compile`` of a plain-PyTorch reference (the "compile" baseline): static shapes, one
    graph (``fullgraph=True``: a graph break raises). The runner calls :meth:`fresh` before every
    (case, mode, dtype), so each is timed through a graph compiled for its own shapes; a call that
    makes dynamo compile a second graph (a recompile), or a first call that compiled nothing, raises
    :class:`CompileError` instead of timing eager code under the compile label."""

    def __init__(self, fn: Callable, backend: str = "inductor"):
        self.fn, self.backend = fn, backend
        self.fresh()

    def fresh(self) -> None:
        from torch._dynamo.testing import CompileCounterWithBackend
        torch._dynamo.reset()
        self.counter = CompileCounterWithBackend(self.backend)
        self.compiled = torch.compile(self.fn, backend=self.counter, dynamic=False, fullgraph=True)

    @property
    def graphs(self) -> List[torch.fx.GraphModule]:
        """The graphs dynamo handed to the backend since the last :meth:`fresh`."""
        return self.counter.graphs

    def __call__(self, *args):
        out = self.compiled(*args)
        if self.counter.frame_count != 1:
            raise CompileError(f"torch.compile {'recompiled' if self.counter.frame_count else 'compiled nothing'}"
                               f" ({self.counter.frame_count} graphs): not one static graph")
        return out


def aligned(t: torch.Tensor, nbytes: int = 16) -> torch.Tensor:
    """A zero-padded copy of ``t`` whose last dimension (so each row) is a multiple of ``nbytes``:
    the problem cuBLAS sees when rows are 16-byte aligned (the padding adds zero products)."""
    per = max(1, nbytes // t.element_size())
    pad = -t.shape[-1] % per
    return torch.nn.functional.pad(t, (0, pad)).contiguous()
