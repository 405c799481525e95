"""``auto`` (what users get on a CPU: the CPU path, arguments checked) against plain PyTorch, per
call, fp32, one thread: forward without grad and forward+backward, the best of 7 rounds in which
the providers take turns (the best round is the least disturbed by the rest of the machine).
The plain side is the fastest of the op's plain providers (``eager``, and ``sdpa`` where the op
has one).

    python benchmarks/per_call.py [op ...]                 # the tiny cases (tag ``overhead``): µs above plain
    python benchmarks/per_call.py --tag cpu [op ...]       # the CPU cases of mmkernels-bench: auto / plain
    python benchmarks/per_call.py --case lmf_mosi_b4096    # named cases
    python benchmarks/per_call.py concat_linear --provider reference   # another provider than auto
    python benchmarks/per_call.py --device cuda            # on a GPU: host-bound calls, synchronised per round

On a GPU each round ends with ``torch.cuda.synchronize()``, so a figure is the time per call of
a stream of calls: the host's cost where the kernels take less (the tiny cases), else the GPU's.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

PLAIN = ("eager", "sdpa")
ROUNDS = 7


def _calls(spec, case, providers, device="cpu"):
    """{provider: (fwd thunk, fwd+bwd thunk)} on one input set."""
    inp = spec.make_inputs(case, torch.float32, device)
    leaves = list(inp.leaves)

    def thunks(f):
        def fwd():
            with torch.no_grad():
                f(*inp.args)

        def fwd_bwd():
            for leaf in leaves:
                leaf.requires_grad_(True)
            out = f(*inp.args)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out, leaves, inp.grad_out, allow_unused=True)
        return fwd, fwd_bwd
    return {p: thunks(spec.providers[p]) for p in providers}


def _best_ms(thunks, rounds: int, sync=lambda: None):
    """{name: best ms per call}, the thunks taking turns round by round; each round runs a thunk
    for about 20 ms (at least 3 calls) and ends with ``sync()``."""
    n = {}
    for name, f in thunks.items():
        for _ in range(3):
            f()
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        n[name] = max(3, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    best = {name: float("inf") for name in thunks}
    for _ in range(rounds):
        for name, f in thunks.items():
            t0 = time.perf_counter()
            for _ in range(n[name]):
                f()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / n[name] * 1e3)
    return best


def measure(spec, case, provider="auto", device: str = "cpu", rounds: Optional[int] = None,
            skip_failing: bool = False):
    """{mode: {provider: ms}} for the op's plain providers and ``provider`` (a name, or several in a
    list; ``triton@MODE`` is the triton provider under launch mode MODE, see
    :mod:`mmkernels.runtime`) (``rounds``: default :data:`ROUNDS`). ``skip_failing``: a provider
    that raises on this case (a backend that cannot take it) is left out instead of failing."""
    wanted = [provider] if isinstance(provider, str) else list(provider)
    providers = [p for p in PLAIN if p in spec.providers] + [p for p in wanted if p not in PLAIN]
    calls = _calls(spec, case, list(dict.fromkeys(p.split("@")[0] for p in providers)), device)
    calls = {p: tuple(_in_mode(f, p) for f in calls[p.split("@")[0]]) for p in providers}
    if skip_failing:   # twice: a launch's second call of a specialization is the first through its plan
        for p in list(providers):
            try:
                calls[p][1]()
                calls[p][1]()
            except Exception as exc:
                print(f"# {spec.op} {case.name}: {p} left out ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
                providers.remove(p)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)   # the inputs' GPU
    return {mode: _best_ms({p: calls[p][i] for p in providers}, rounds or ROUNDS, sync)
            for i, mode in enumerate(("fwd", "fwd+bwd"))}


def _in_mode(f, provider: str):
    """``f`` under the launch mode ``provider`` names after '@' (each mode keeps its plans);
    ``unplanned``: prepared launches with call plans (:mod:`mmkernels.plans`) off."""
    if "@" not in provider:
        return f
    from mmkernels import plans, runtime
    mode = provider.split("@", 1)[1]
    planned = mode != "unplanned"
    mode = mode if planned else "prepared"

    def g():
        with runtime.use_launch_mode(mode):
            plans.set_enabled(planned)
            try:
                f()
            finally:
                plans.set_enabled(True)
    return g


def rows(ops=(), tag: str = "overhead", cases=(), provider="auto", device: str = "cpu",
         rounds: Optional[int] = None):
    """Per (op, case): the fastest plain provider and its ms, and ``provider``'s ms, per mode."""
    for name, case, r in tables(ops, tag, cases, [provider], device, rounds):
        cols = {}
        for mode, t in r.items():
            base = min((p for p in t if p != provider), key=t.get)
            cols[mode] = (base, t[base], t[provider])
        yield name, case, cols


def tables(ops=(), tag: str = "overhead", cases=(), providers=("auto",), device: str = "cpu",
           rounds: Optional[int] = None, skip_failing: bool = False):
    """Per (op, case): ``{mode: {provider: ms}}`` for the plain providers and those of ``providers``
    the op has (``triton@MODE``: where it has ``triton``)."""
    from mmkernels.ops import bench_specs
    specs = bench_specs()
    for name in ops or list(specs):
        spec = specs[name]
        have = [p for p in providers if p.split("@")[0] in spec.providers]
        if not have:   # latent_pool: its providers are the patched module's
            continue
        for case in spec.cases:
            if not (case.name in cases if cases else tag in case.tags):
                continue
            yield name, case.name, measure(spec, case, have, device, rounds, skip_failing=skip_failing)


def host_rows(device: str = "cuda", rounds: Optional[int] = None, ops=()):
    """The GPU check's per-call rows: each op's tiny cases, µs per call of ``auto``, every kernel
    backend (triton under each launch mode) and the plain providers, forward under ``no_grad`` and
    fwd+bwd; a backend that cannot run a case is left out of its row."""
    from mmkernels import runtime
    out = []
    providers = ["auto"] + [f"triton@{m}" for m in runtime.LAUNCH_MODES] + ["triton@unplanned", "cuda"]
    for name, case, r in tables(ops, "overhead", (), providers, device, rounds, skip_failing=True):
        for mode, t in r.items():
            plain = min((p for p in t if p in PLAIN), key=t.get)
            out.append(dict(op=name, case=case, mode=mode, plain=plain,
                            us={p: round(v * 1e3, 2) for p, v in t.items()}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ops", nargs="*", help="ops (default: all)")
    p.add_argument("--tag", default="overhead", help="the cases with this tag (default: overhead, the tiny ones)")
    p.add_argument("--case", action="append", default=[], help="named cases instead (repeatable)")
    p.add_argument("--provider", default="auto",
                   help="the provider set against plain (default: auto; e.g. reference, the direct path)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--backends", action="store_true",
                   help="the tiny cases with auto, triton under each launch mode and cuda beside plain, in us "
                        "(the GPU check's per_call step)")
    p.add_argument("--json", default=None, help="with --backends: also write the rows to this JSON file")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds of interleaved timing (default {ROUNDS})")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.backends:
        return _backends_main(a)
    us = not a.case and a.tag == "overhead"
    unit = "us" if us else "ms"
    k = 1e3 if us else 1.0
    print(f"{'op':16s} {'case':40s} {'plain':6s} {'fwd plain':>10s} {'fwd ' + a.provider[:6]:>10s} {'x':>5s} {'+' + unit:>7s} "
          f"{'f+b plain':>10s} {'f+b ' + a.provider[:6]:>10s} {'x':>5s} {'+' + unit:>7s}")
    for name, case, cols in rows(a.ops, a.tag, a.case, a.provider, a.device, a.rounds):
        line = f"{name:16s} {case:40s} {cols['fwd'][0]:6s} "
        line += " ".join(f"{b * k:10.3f} {x * k:10.3f} {x / b:5.2f} {(x - b) * k:+7.3f}" for _, b, x in cols.values())
        print(line, flush=True)
    return 0


def _backends_main(a) -> int:
    import json
    import os
    from mmkernels import plans, runtime
    out = []
    for r in host_rows(a.device, a.rounds, a.ops):
        out.append(r)
        base = r["us"][r["plain"]]
        print(f"{r['op']:16s} {r['case']:32s} {r['mode']:8s} {r['plain']} {base:.1f} us | " +
              "  ".join(f"{p} {v:.1f} ({v / base:.2f}x)" for p, v in r["us"].items() if p not in PLAIN), flush=True)
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(dict(rows=out, launch_stats=dict(runtime.stats), static_refusals=dict(runtime.refusals),
                               call_plans=dict(plans.stats), last_plan_refusal=plans.last_refusal[0],
                               launch_protocol=runtime.launch_protocol_reason() or "ok"), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
