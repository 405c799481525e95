from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


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


@dataclasses.dataclass
class BenchSpec:
    """What an op folder tells the harness. ``providers`` map a name to ``f(*inputs.args)``; a
    provider that cannot run raises (the reason is shown in its row). ``bytes``/``flops`` give the
    least traffic / arithmetic of a mode, from which the floor is computed."""
    op: str
    cases: Sequence[Case]
    make_inputs: Callable[[Case, torch.dtype, torch.device], Inputs]
    providers: Dict[str, Callable]
    bytes: Callable[[Case, torch.dtype, str], int]
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
    """A provider that runs ``fn`` (a public mmkernels op) under one backend."""
    import mmkernels

    def run(*args, **kwargs):
        with mmkernels.use_backend(backend):
            return fn(*args, **kwargs)
    return run


def compiled_provider(fn: Callable) -> Callable:
    """``torch.compile`` of a plain-PyTorch reference (the "compile" baseline)."""
    compiled: Optional[Callable] = None

    def run(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)
    return run
