"""Where the host time of a GPU call goes: for each (op, case, provider), bf16 on CUDA, the host CPU
time of one forward+backward (``time.thread_time`` over a loop of calls that never waits for the
GPU), the wall time of the same loop, the CUDA syncs it makes (``torch.cuda.set_sync_debug_mode``),
and the functions that take that host time (``cProfile``, by own time). Then the bare cost of a
Triton launch by argument count, and the facts behind Triton's on-disk cache key (so a cache filled
elsewhere can be compared with this machine's).

    python benchmarks/host_profile.py [op:case[:provider,...]] ... [--calls 40] [--top 12]
    python benchmarks/host_profile.py --cache-key        # the cache-key facts only (no GPU needed)

Prints a table last; ``--out FILE`` also writes everything to FILE.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import warnings

import torch

DEFAULT = [
    "gated_sum:b8192_m2_h512_feature:triton,cuda,eager",
    "concat_linear:b65536_3x768_n10:triton,eager",
    "concat_linear:b8192_4096+300_n512_tanh:triton",
    "norm_concat:b32768_768+1024+512:triton,cuda",
    "attention_pool:b4096_l64_d768_h12:triton,sdpa",
    "gated_fusion:b8192_4096+300_h512_feature:triton",
    "latent_pool:siglip_base_b1024_n196:triton",
    "low_rank_fusion:lmf_mosi_b4096:triton",
]


def cache_key_facts() -> dict:
    """What Triton's on-disk cache key is made of, besides the kernel and its specialisation."""
    import hashlib

    import triton
    from triton.runtime.cache import triton_key

    from mmkernels.gpucheck import libtriton_sha256
    facts = {"triton": triton.__version__, "python": sys.version.split()[0],
             "triton_key_sha": hashlib.sha256(triton_key().encode()).hexdigest()[:16],
             "libtriton_sha": libtriton_sha256()[:16]}
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        facts["ptxas"] = get_ptxas_version()
    except Exception as exc:  # noqa: BLE001
        facts["ptxas"] = f"? ({type(exc).__name__})"
    try:
        from triton import knobs
        facts["ptxas_path"] = str(knobs.nvidia.ptxas.path)
    except Exception as exc:  # noqa: BLE001
        facts["ptxas_path"] = f"? ({type(exc).__name__})"
    facts["env"] = {k: v for k, v in os.environ.items() if k.startswith(("TRITON", "MLIR", "LLVM"))}
    return facts


def _fwd_bwd(provider, inp):
    leaves = list(inp.leaves)
    for t in leaves:
        t.requires_grad_(True)

    def run():
        out = provider(*inp.args)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, leaves, inp.grad_out, allow_unused=True)
    return run


def _fwd(provider, inp):
    def run():
        with torch.no_grad():
            provider(*inp.args)
    return run


def measure(fn, calls: int, top: int):
    """(host µs per call, wall µs per call, syncs per call, profile text)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    # syncs: the debug mode warns on every synchronizing CUDA call
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    host = (time.thread_time() - c0) / calls * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - w0) / calls * 1e6
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime")
    lines = []
    for order, col in (("own", 2), ("cum", 3)):
        lines.append(f"    by {order} time:")
        for (file, line, name), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][col])[:top]:
            where = f"{os.path.basename(file)}:{line}" if file != "~" else "builtin"
            lines.append(f"      {tt / calls * 1e6:8.1f} us own {ct / calls * 1e6:8.1f} us cum {nc / calls:6.1f}x  "
                         f"{name} ({where})")
    return host, wall, syncs, "\n".join(lines)


def triton_launch_costs(calls: int = 2000):
    """Host µs of one launch of a trivial Triton kernel with 2, 16 and 32 arguments."""
    import triton
    import triton.language as tl

    @triton.jit
    def k2(X, n):
        i = tl.arange(0, 16)
        tl.store(X + i, tl.load(X + i, mask=i < n), mask=i < n)

    @triton.jit
    def k16(X, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, Y, n):
        i = tl.arange(0, 16)
        tl.store(Y + i, tl.load(X + i, mask=i < n) + a1 + a13, mask=i < n)

    @triton.jit
    def k32(X, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
            a21, a22, a23, a24, a25, a26, a27, a28, a29, Y, n, B: tl.constexpr):
        i = tl.arange(0, B)
        tl.store(Y + i, tl.load(X + i, mask=i < n) + a1 + a29, mask=i < n)

    x = torch.randn(16, device="cuda")
    y = torch.empty_like(x)
    out = {}
    for name, run in [("2 args", lambda: k2[(1,)](x, 16)),
                      ("16 args", lambda: k16[(1,)](x, *range(3, 16), y, 16)),
                      ("32 args", lambda: k32[(1,)](x, *range(3, 32), y, 16, B=16))]:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        c0 = time.thread_time()
        for _ in range(calls):
            run()
        out[name] = (time.thread_time() - c0) / calls * 1e6
        torch.cuda.synchronize()
    c0 = time.thread_time()
    for _ in range(calls):
        y.copy_(x)
    out["torch copy_ (reference)"] = (time.thread_time() - c0) / calls * 1e6
    torch.cuda.synchronize()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("items", nargs="*", help="op:case[:provider,...] (default: a small set of headline cases)")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None)
    p.add_argument("--cache-key", action="store_true")
    a = p.parse_args(argv)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)
    say(f"triton cache-key facts: {cache_key_facts()}")
    if a.cache_key:
        return 0
    from mmkernels.gpucheck.steps import TritonCompiles
    from mmkernels.ops import bench_specs
    compiles = TritonCompiles()
    specs = bench_specs()
    table = []
    for item in a.items or DEFAULT:
        op, case_name, *rest = item.split(":")
        spec = specs[op]
        case = spec.case(case_name)
        providers = rest[0].split(",") if rest else ["triton"]
        inp = spec.make_inputs(case, torch.bfloat16, torch.device("cuda"))
        for prov in providers:
            if prov not in spec.providers:
                say(f"== {op} {case_name} {prov}: no such provider")
                continue
            for mode, make in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
                try:
                    host, wall, syncs, prof = measure(make(spec.providers[prov], inp), a.calls, a.top)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    say(f"== {op} {case_name} {prov} {mode}: {type(exc).__name__}: {exc}")
                    continue
                say(f"== {op} {case_name} {prov} {mode}: host {host:.0f} us/call, wall {wall:.0f} us/call, "
                    f"{syncs} syncs/call")
                say(prof)
                table.append((op, case_name, prov, mode, host, wall, syncs))
        del inp
        torch.cuda.empty_cache()
    say(f"== Triton compiles: {compiles.summary()}")
    say("== bare Triton launch, host us: " + ", ".join(f"{k} {v:.1f}" for k, v in triton_launch_costs().items()))
    say(f"{'op':16s} {'case':34s} {'provider':9s} {'mode':8s} {'host us':>8s} {'wall us':>8s} {'syncs':>5s}")
    for op, case_name, prov, mode, host, wall, syncs in table:
        say(f"{op:16s} {case_name:34s} {prov:9s} {mode:8s} {host:8.0f} {wall:8.0f} {syncs:5d}")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
