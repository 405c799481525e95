"""Run cases x modes x dtypes x providers and collect one row each."""
from __future__ import annotations

import datetime
import itertools
import math
import os
import platform
import shlex
import subprocess
import sys
from typing import Dict, Iterable, List, Optional

import torch

from .spec import SAVE_INPUTS, BenchSpec, Inputs
from .timing import (bandwidths, host_bound, kernel_ms, loop_ms, matmul_rate, memory_seconds, peak_memory_mb,
                     small_work, threads, time_rounds, why)

# the providers that run what a user gets: ``auto`` (the op with backend="auto"), and latent_pool's
# ``patched`` (the model after mmkernels.patch, on the process-wide backend: auto by default)
AUTO = ("auto", "patched")

ROTATE_MIN_BYTES = 256 << 20  # rotate among input sets until they span this much, and at least 5x the L2
                              # (H100/H200: 50 MB), so each call reads its inputs from HBM


def _rotate_bytes(device: torch.device) -> int:
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    return max(ROTATE_MIN_BYTES, 5 * l2)


def _sets(spec: BenchSpec, case, dtype, device, mode) -> List[Inputs]:
    one = spec.make_inputs(case, dtype, device)
    size = spec.traffic(case, dtype)["fwd"].total
    k = 1 if device.type != "cuda" else max(1, min(8, math.ceil(_rotate_bytes(device) / max(size, 1))))
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


_SDPA_BACKENDS = {"_scaled_dot_product_flash_attention_for_cpu": "cpu flash",
                  "_scaled_dot_product_flash_attention": "flash",
                  "_scaled_dot_product_efficient_attention": "efficient",
                  "_scaled_dot_product_cudnn_attention": "cudnn",
                  "_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)"}
_SHORT = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def describe(provider, args: tuple, grad: bool) -> Dict:
    """How a plain-PyTorch provider computes, from one untimed call: ``math_dtypes``, the floating
    dtypes of every aten op's outputs (e.g. ``["bf16", "fp32"]`` when it upcasts), and, when it calls
    ``F.scaled_dot_product_attention``, ``sdpa_backend``: the SDPA kernel that ran (flash, efficient,
    cudnn, cpu flash; math when none of the fused kernels was dispatched)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    seen, ops, sdpa = [], set(), []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ops.add(func.overloadpacket.__name__)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in seen:
                    seen.append(t.dtype)
            return out

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) == "scaled_dot_product_attention":
                sdpa.append(True)
            return func(*args, **(kwargs or {}))

    fn = getattr(provider, "fn", provider)   # a compiled baseline: the function it compiles
    with torch.set_grad_enabled(grad), Calls(), Ops():
        fn(*args)
    info = dict(math_dtypes=[_SHORT.get(d, str(d)[6:]) for d in seen])
    if sdpa:
        used = [_SDPA_BACKENDS[o] for o in _SDPA_BACKENDS if o in ops]
        info["sdpa_backend"] = used[0] if used else ("cpu math" if args[0].device.type == "cpu" else "math")
    return info


def chosen_backends(provider, args: tuple, grad: bool) -> str:
    """The backend(s) ``auto`` ran in one untimed call of ``provider``: what
    :func:`mmkernels.backend.select` returned, or ``torch`` where the op took its plain formulation
    directly (the CPU path, or a GPU whose dispatch-table verdict is torch). One name when every op
    the call ran chose the same (e.g. ``torch``), else ``op backend`` pairs; "" when no mmkernels
    op ran."""
    from .. import backend as _backend
    from ..ops import _register
    seen: List[tuple] = []   # (op, backend, definite): cpu_path's yes may still fall through to select
    select, plain, cpu_path = _backend.select, _register.Op._plain, _register.Op.cpu_path

    def spy_select(op, impls, requested, **inputs):
        name, impl = select(op, impls, requested, **inputs)
        seen.append((op, name, True))
        return name, impl

    def spy_plain(self, *a, **k):
        out = plain(self, *a, **k)
        if out is not None:
            seen.append((self.name, "torch", True))
        return out

    def spy_cpu_path(self, *a, **k):
        ok = cpu_path(self, *a, **k)
        if ok:
            seen.append((self.name, "torch", False))
        return ok
    _backend.select, _register.Op._plain, _register.Op.cpu_path = spy_select, spy_plain, spy_cpu_path
    try:
        with torch.set_grad_enabled(grad):
            provider(*args)
    finally:
        _backend.select, _register.Op._plain, _register.Op.cpu_path = select, plain, cpu_path
    per_op: Dict[str, List[str]] = {}
    for op in dict.fromkeys(o for o, _, _ in seen):
        definite = [b for o, b, d in seen if o == op and d] or [b for o, b, _ in seen if o == op]
        per_op[op] = list(dict.fromkeys(definite))
    names = {b for bs in per_op.values() for b in bs}
    if len(names) <= 1:
        return next(iter(names), "")
    return ", ".join(f"{op} {'+'.join(bs)}" for op, bs in per_op.items())


def _git(*args) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi(fields: str) -> Optional[Dict[str, str]]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return dict(zip(fields.split(","), (v.strip() for v in out.stdout.strip().splitlines()[0].split(","))))


def provenance(device: torch.device, argv: Optional[List[str]] = None) -> Dict:
    """What a reader needs to reproduce or doubt a result: date, commit (and whether the tree had
    changes), command line, versions, GPU, driver and clocks where available, and the settings that
    change what is timed (``MMKERNELS_AUTOTUNE``, ``MMKERNELS_BACKEND``, TF32)."""
    from .. import runtime
    argv = sys.argv if argv is None else argv
    p = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             commit=_git("rev-parse", "HEAD"),
             dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
             command=shlex.join(argv), python=platform.python_version(), host=platform.node(),
             torch=torch.__version__, cuda=torch.version.cuda, device=str(device),
             autotune=dict(MMKERNELS_AUTOTUNE=os.environ.get("MMKERNELS_AUTOTUNE"), on=runtime.AUTOTUNE),
             backend_env=os.environ.get("MMKERNELS_BACKEND"),
             allow_tf32=torch.backends.cuda.matmul.allow_tf32, threads=torch.get_num_threads())
    try:
        import triton
        p["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        p["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        p.update(gpu=props.name, sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                 l2_bytes=props.L2_cache_size, memory_bytes=props.total_memory)
        smi = _nvidia_smi("driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit")
        smi = smi or _nvidia_smi("driver_version")
        if smi:
            p["driver"] = smi.pop("driver_version", None)
            p["clocks_mhz"] = smi
    return p


def run(specs: Iterable[BenchSpec], case_filter, providers, modes, dtypes, device: torch.device, progress=None,
        on_rows=None, argv: Optional[List[str]] = None) -> Dict:
    """Returns ``{"provenance": {...}, "machine": {...}, "ops": {...}, "complete": bool, "rows": [...]}``.

    The providers of one (case, mode, dtype) are timed together in interleaved rounds
    (:func:`.timing.time_rounds`); on a CPU a small case (:func:`.timing.small_work`) runs in one
    thread, and a row whose rounds disagree (``unstable``, see :func:`.timing.assess`) is measured
    again, with the other unstable rows of its case; if it still disagrees its row keeps the reason
    in ``unstable`` (every report marks it) and ``result["unstable"]`` counts such rows.
    ``progress(total)`` returns ``step(done, current)``, called as each (case, mode, dtype) starts
    (a rich progress bar in the CLI); ``on_rows(result so far)`` is called before each (case, mode,
    dtype) (``in_progress`` names it) and after the last, so a run cut off keeps every row it
    measured and says where it stopped; ``complete`` is True only in the final result."""
    specs = list(specs)
    work = [(spec, case, mode, dtype, [p for p in spec.providers if p in providers])
            for spec in specs for case in spec.cases if case_filter(case)
            for mode in modes for dtype in dtypes]
    work = [w for w in work if w[4]]
    prov = provenance(device, argv)
    copy_bw, read_bw = bandwidths(device)
    rates = {dt: matmul_rate(device, dt) for dt in dtypes}
    machine = dict(device=str(device), name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   hbm_bytes_per_s=copy_bw, hbm_read_bytes_per_s=read_bw,
                   matmul_flop_per_s={str(k): v for k, v in rates.items()}, torch=torch.__version__,
                   triton=prov["triton"])
    step = progress(len(work)) if progress else (lambda done, current: None)
    rows: List[dict] = []
    ops = {s.op: dict(baselines=list(s.baselines), bounds=list(s.bounds), providers=list(s.providers)) for s in specs}
    result = dict(provenance=prov, machine=machine, ops=ops, complete=False, in_progress=None, unstable=0, rows=rows)

    def floor(t, flops, dtype):
        if device.type != "cuda":
            return float("nan")
        return max(memory_seconds(t.read, t.written, copy_bw, read_bw), flops / rates[dtype]) * 1e3

    for done, (spec, case, mode, dtype, names) in enumerate(work):
        desc = f"{spec.op} {case.name} {mode} {str(dtype)[6:]}"
        step(done, desc)
        if on_rows is not None:
            result["in_progress"] = desc
            _derive(result, specs)
            on_rows(result)
        base = dict(op=spec.op, case=case.name, mode=mode, dtype=str(dtype)[6:])
        try:
            tr = spec.traffic(case, dtype)
        except Exception as exc:  # e.g. a case built from a library this machine lacks: its rows say so
            rows.extend(dict(base, provider=p, bytes=0, bytes_read=0, flops=0, floor_ms=float("nan"),
                             ms=float("nan"), error=why(exc)) for p in names)
            continue
        t, flops = tr[mode], spec.flops(case, mode)
        base.update(bytes=t.total, bytes_read=t.read, flops=flops, floor_ms=floor(t, flops, dtype), ms=float("nan"),
                    error=None)
        if mode == "fwd+bwd":
            s = tr[SAVE_INPUTS]
            base.update(bytes_save_inputs=s.total, floor_save_inputs_ms=floor(s, flops, dtype))
        one_thread = device.type != "cuda" and small_work(tr["fwd"].total, spec.flops(case, "fwd"))
        with threads(1 if one_thread else None) as n_threads:
            base["threads"] = n_threads if device.type != "cuda" else None
            rows.extend(_measure(spec, case, mode, dtype, device, names, base))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step(len(work), "done")
    _derive(result, specs)
    result.update(complete=True, in_progress=None)
    if on_rows is not None:
        on_rows(result)
    return result


def _measure(spec: BenchSpec, case, mode: str, dtype, device: torch.device, names: List[str], base: Dict) -> List[Dict]:
    """The rows of one (case, mode, dtype): each provider's first call (a provider that cannot run
    here keeps the reason in ``error``), what the plain baselines compute in (:func:`describe`) and
    which backend ``auto`` ran (:func:`chosen_backends`), then the providers that run timed together
    (:func:`.timing.time_rounds`); the rows still unstable are timed again together, once."""
    rows = {p: dict(base, provider=p) for p in names}
    fns = {}
    try:
        sets = _sets(spec, case, dtype, device, mode)
    except Exception as exc:
        for r in rows.values():
            r["error"] = why(exc)
        return list(rows.values())
    for pname in names:
        provider, row = spec.providers[pname], rows[pname]
        try:
            if hasattr(provider, "fresh"):
                provider.fresh()          # a compiled baseline: a new static graph for this case
            fn = _callable(provider, sets, mode)
            fn()                          # the first call: compiles, or says why it cannot run here
            if pname in spec.baselines:
                try:
                    row.update(describe(provider, sets[0].args, grad=mode != "fwd"))
                except Exception as exc:  # the description is extra: never lose the timing to it
                    row["math_dtypes"] = f"not recorded ({type(exc).__name__})"
            if pname in AUTO:
                try:
                    row["backend"] = chosen_backends(provider, sets[0].args, grad=mode != "fwd")
                except Exception as exc:
                    row["backend"] = f"not recorded ({type(exc).__name__})"
            fns[pname] = fn
        except Exception as exc:  # the provider cannot run here: keep the reason
            row["error"] = why(exc)
    timings = time_rounds(fns, device) if fns else {}
    again = {p: fns[p] for p, tm in timings.items() if tm.unstable}
    if again:
        timings.update(time_rounds(again, device))
    for pname, tm in timings.items():
        row = rows[pname]
        if tm.error:                  # it raised while timed (e.g. a compiled baseline that recompiled)
            row["error"] = tm.error
            continue
        row.update(ms=tm.ms, p20_ms=tm.p20, p80_ms=tm.p80, rounds_ms=tm.rounds, round_spread=tm.spread,
                   cpu_ms=tm.cpu_ms, calls=tm.calls or None, remeasured=pname in again, unstable=tm.unstable)
        fn = fns[pname]
        try:
            row["kernel_ms"], row["kernel_timer"] = kernel_ms(fn, device)
            row["loop_ms"] = loop_ms(fn, device)
            row["host_bound"] = host_bound(row["loop_ms"], row["kernel_ms"])
            row["peak_mb"] = peak_memory_mb(fn, device)
        except Exception as exc:
            row["error"] = why(exc)
    return list(rows.values())


def _ratio(a, b) -> float:
    ok = lambda v: isinstance(v, (int, float)) and v == v
    return a / b if ok(a) and ok(b) and b else float("nan")


def _derive(result: Dict, specs: List[BenchSpec]) -> None:
    """GB/s, TFLOP/s, x-floor (and x the save-inputs floor), speedups against each of the spec's
    baselines and against the fastest of those that compute the op (``vs_best``; bounds excluded),
    per (case, mode, dtype); ``result["unstable"]``: how many rows are marked unstable."""
    rows = result["rows"]
    result["unstable"] = sum(bool(r.get("unstable")) for r in rows)
    baselines = {spec.op: spec.baselines for spec in specs}
    bounds = {spec.op: spec.bounds for spec in specs}
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["case"], r["mode"], r["dtype"]), {})[r["provider"]] = r
    for r in rows:
        ms = r["ms"]
        r["gb_s"] = _ratio(r["bytes"], ms * 1e6)
        r["tflop_s"] = _ratio(r["flops"], ms * 1e9) if r["flops"] else float("nan")
        r["x_floor"] = _ratio(ms, r["floor_ms"])
        if "floor_save_inputs_ms" in r:
            r["x_floor_save_inputs"] = _ratio(ms, r["floor_save_inputs_ms"])
        peers = by_key[(r["op"], r["case"], r["mode"], r["dtype"])]
        best = float("nan")
        for base in baselines[r["op"]]:
            b = peers.get(base)
            r[f"vs_{base}"] = _ratio(b["ms"], ms) if b else float("nan")
            if b and b["ms"] == b["ms"] and not b["ms"] >= best and base not in bounds[r["op"]]:
                best = b["ms"]  # the best way to compute the op today (a bound is not one)
        r["vs_best"] = _ratio(best, ms)
