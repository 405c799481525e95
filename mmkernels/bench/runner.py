"""Run cases x modes x dtypes x providers and collect one row each."""
from __future__ import annotations

import itertools
import math
from typing import Dict, Iterable, List

import torch

from .spec import BenchSpec, Inputs
from .timing import hbm_bandwidth, matmul_rate, peak_memory_mb, time_ms

L2_ROTATE_BYTES = 256 << 20  # rotate among input sets until they span this much (well past L2)


def _sets(spec: BenchSpec, case, dtype, device, mode) -> List[Inputs]:
    one = spec.make_inputs(case, dtype, device)
    size = spec.bytes(case, dtype, "fwd")
    k = 1 if device.type != "cuda" else max(1, min(8, math.ceil(L2_ROTATE_BYTES / max(size, 1))))
    return [one] + [spec.make_inputs(case, dtype, device) for _ in range(k - 1)]


def _grad_outs(out, s: Inputs):
    """Upstream gradient for one provider output: the case's ``grad_out``; for a bound that returns
    several tensors (e.g. a layer's GEMMs alone), random tensors of their shapes, made once per
    input set (the first call is a warm-up, outside the timing)."""
    if isinstance(out, torch.Tensor):
        return s.grad_out
    cache = s.__dict__.setdefault("_grad_outs", {})
    key = tuple(tuple(o.shape) for o in out)
    if key not in cache:
        cache[key] = tuple(torch.randn_like(o) for o in out)
    return cache[key]


def _callable(provider, sets: List[Inputs], mode: str):
    """A zero-argument function doing one ``mode`` step, rotating over the input sets."""
    counter = itertools.count()
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return provider(*sets[next(counter) % len(sets)].args)
        return fwd
    for s in sets:
        for t in s.leaves:
            t.requires_grad_(True)
    if mode == "bwd":
        outs = [provider(*s.args) for s in sets]

        def bwd():
            i = next(counter) % len(sets)
            return torch.autograd.grad(outs[i], sets[i].leaves, _grad_outs(outs[i], sets[i]), retain_graph=True,
                                       allow_unused=True)  # a provider may use a subset of the leaves
        return bwd

    def fwd_bwd():
        s = sets[next(counter) % len(sets)]
        out = provider(*s.args)
        return torch.autograd.grad(out, s.leaves, _grad_outs(out, s), allow_unused=True)
    return fwd_bwd


def run(specs: Iterable[BenchSpec], case_filter, providers, modes, dtypes, device: torch.device, progress=None,
        on_rows=None) -> Dict:
    """Returns ``{"machine": {...}, "rows": [...]}``; ``progress(total)`` returns a callable advanced
    after each measurement (a rich progress bar in the CLI); ``on_rows(result so far)`` is called
    after each (case, mode, dtype) group, so an interrupted run keeps what it measured."""
    specs = list(specs)
    work = [(spec, case, mode, dtype, p)
            for spec in specs for case in spec.cases if case_filter(case)
            for mode in modes for dtype in dtypes for p in spec.providers if p in providers]
    bw = hbm_bandwidth(device)
    rates = {dt: matmul_rate(device, dt) for dt in dtypes}
    machine = dict(device=str(device), name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   hbm_bytes_per_s=bw, matmul_flop_per_s={str(k): v for k, v in rates.items()},
                   torch=torch.__version__)
    try:
        import triton
        machine["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        pass
    step = progress(len(work)) if progress else (lambda desc: None)
    rows = []
    for (spec, case, mode, dtype), group in itertools.groupby(work, key=lambda w: w[:4]):
        sets = None
        for *_, pname in group:
            step(f"{spec.op} {case.name} {mode} {str(dtype)[6:]} {pname}")
            nbytes, flops = spec.bytes(case, dtype, mode), spec.flops(case, mode)
            floor_ms = max(nbytes / bw, flops / rates[dtype]) * 1e3 if device.type == "cuda" else float("nan")
            row = dict(op=spec.op, case=case.name, mode=mode, dtype=str(dtype)[6:], provider=pname, bytes=nbytes,
                       flops=flops, floor_ms=floor_ms, ms=float("nan"), error=None)
            try:
                if sets is None:
                    sets = _sets(spec, case, dtype, device, mode)
                fn = _callable(spec.providers[pname], sets, mode)
                row["ms"] = time_ms(fn, device)
                row["peak_mb"] = peak_memory_mb(fn, device)
            except Exception as exc:  # the provider cannot run here: keep the reason
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            rows.append(row)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_rows is not None:
            _derive(rows, specs)
            on_rows(dict(machine=machine, rows=rows))
    _derive(rows, specs)
    return dict(machine=machine, rows=rows)


def _derive(rows: List[dict], specs: List[BenchSpec]) -> None:
    """GB/s, TFLOP/s, x-floor, speedups against each of the spec's baselines and against the
    fastest of those that compute the op (``vs_best``; bounds excluded), per (case, mode, dtype)."""
    baselines = {spec.op: spec.baselines for spec in specs}
    bounds = {spec.op: spec.bounds for spec in specs}
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["case"], r["mode"], r["dtype"]), {})[r["provider"]] = r
    for r in rows:
        ms = r["ms"]
        r["gb_s"] = r["bytes"] / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
        r["tflop_s"] = r["flops"] / (ms * 1e-3) / 1e12 if (ms == ms and r["flops"]) else float("nan")
        r["x_floor"] = ms / r["floor_ms"] if (ms == ms and r["floor_ms"] == r["floor_ms"]) else float("nan")
        peers = by_key[(r["op"], r["case"], r["mode"], r["dtype"])]
        best = float("nan")
        for base in baselines[r["op"]]:
            b = peers.get(base)
            r[f"vs_{base}"] = b["ms"] / ms if (b and b["ms"] == b["ms"] and ms == ms) else float("nan")
            if b and b["ms"] == b["ms"] and not b["ms"] >= best and base not in bounds[r["op"]]:
                best = b["ms"]  # the best way to compute the op today (a bound is not one)
        r["vs_best"] = best / ms if (best == best and ms == ms) else float("nan")
