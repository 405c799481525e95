"""Helpers shared by the tests and the benchmark harness: per-dtype tolerances, comparison against
a float64 reference, and the sm_90 ahead-of-time compile of every Triton kernel of the package."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Dict, List

import torch


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float


# Kernel output vs the float64 reference rounded once to the dtype: a few ulps of the dtype.
TOLERANCES: Dict[torch.dtype, Tol] = {
    torch.float64: Tol(1e-10, 1e-10),
    torch.float32: Tol(2e-5, 2e-5),
    torch.float16: Tol(4e-3, 4e-3),
    torch.bfloat16: Tol(3e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: bool = False):
    """``actual`` vs ``expected`` (a float64 reference) with the tolerance of ``dtype``. ``scale``:
    the tolerance grows with the largest magnitude of ``expected`` (sums over many rows)."""
    tol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    mag = max(1.0, expected.abs().max().item()) if (scale and expected.numel()) else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol.atol * mag, rtol=tol.rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


# --- sm_90 ahead-of-time compile ------------------------------------------------------------------

VECTOR_LOAD = re.compile(r"ld\.global(\.\w+)*\.v[24]\.b(32|64)")


def ptxas_report(ptx: str, arch: int = 90) -> dict:
    """Registers and spill bytes of one kernel, from Triton's bundled ``ptxas -v``."""
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    return dict(n_regs=int(regs.group(1)) if regs else None, spill_bytes=sum(int(x) for x in spill))


def _jit_fn(kernel):
    fn = kernel
    while hasattr(fn, "fn") and not hasattr(fn, "signature"):
        fn = fn.fn
    return fn.fn if hasattr(fn, "fn") else fn


def _configs_of(kernel, args, meta):
    """``(label, meta, pre_hook)`` per configuration to compile: the launch's own meta-parameters,
    or for an autotuned kernel every configuration its pruning keeps for these arguments (with the
    pre-hook that adapts the arguments to it, e.g. TMA block shapes)."""
    configs = getattr(kernel, "configs", None)
    if not configs:
        return [("", meta, None)]
    prune = getattr(kernel, "early_config_prune", None)
    if prune:
        configs = prune(configs, dict(zip(kernel.arg_names, args)), **meta)
    out = []
    for c in configs:
        extra = {k: v for k, v in c.all_kwargs().items() if v is not None}
        out.append((", ".join(f"{k}={v}" for k, v in sorted(extra.items())), {**meta, **extra}, c.pre_hook))
    return out


def _spec_key(args, meta) -> str:
    """What Triton specialises on, roughly: tensor dtypes and 16-byte alignment, ints (== 1, % 16),
    constexprs. Used only to skip compiling the same thing twice."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return f"{a.dtype}:{a.data_ptr() % 16 == 0}"
        if isinstance(a, tuple):
            return "(" + ",".join(one(x) for x in a) + ")"
        if hasattr(a, "block_shape"):  # a TMA descriptor
            return f"desc:{a.base.dtype}:{list(a.block_shape)}"
        if isinstance(a, int) and not isinstance(a, bool):
            return "1" if a == 1 else ("16" if a % 16 == 0 else "i")
        return repr(a)
    return ";".join(one(a) for a in args) + "|" + repr(sorted(meta.items()))


def aot_compile_all(arch: int = 90) -> List[dict]:
    """Capture every Triton launch of every op's AOT examples and compile it for ``sm_{arch}``.
    Raises if a kernel defined in an op's triton module is never compiled (add an example)."""
    from . import runtime
    from .ops import OPS

    results, compiled, seen = [], set(), set()
    for op_name, op in OPS.items():
        for label, run in op.aot_examples():
            with runtime.capture_launches() as launches:
                run()
            if not launches:
                raise AssertionError(f"{op_name}/{label}: the example launched no Triton kernel")
            for kernel, args, meta in launches:
                name = _jit_fn(kernel).__name__
                for config, full_meta, pre_hook in _configs_of(kernel, args, meta):
                    if pre_hook is not None:
                        pre_hook({**dict(zip(kernel.arg_names, args)), **full_meta})
                    if (name, config, _spec_key(args, full_meta)) in seen:
                        continue  # the same specialisation was compiled for an earlier example
                    seen.add((name, config, _spec_key(args, full_meta)))
                    c = runtime.aot_compile(kernel, args, full_meta, arch)
                    ptx = c.asm["ptx"]
                    compiled.add((op_name, name))
                    results.append(dict(op=op_name, example=label, kernel=name, config=config, ptx_bytes=len(ptx),
                                        **ptxas_report(ptx, arch),
                                        vector_loads=bool(VECTOR_LOAD.search(ptx)),
                                        wgmma="wgmma" in ptx, tensor_cores=("wgmma" in ptx or "mma.sync" in ptx),
                                        tma="cp.async.bulk.tensor" in ptx,
                                        target=f"sm_{arch}"))
        defined = {k.fn.__name__ for k in runtime.kernels_of(op.triton_impl)}
        missing = defined - {k for o, k in compiled if o == op_name}
        if missing:
            raise AssertionError(f"{op_name}: kernels with no AOT example: {sorted(missing)}")
    return results


def aot_main() -> None:  # pragma: no cover - run in a subprocess by tests/test_aot_sm90.py
    json.dump(aot_compile_all(), sys.stdout)
