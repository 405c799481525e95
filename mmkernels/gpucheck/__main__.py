"""``python -m mmkernels.gpucheck [STEP ...] [--budget S] [--only OP] [--out DIR] [--dry]``, plus:

* ``summary [DIR]``: the compact table of a run (also printed at the end of every run);
* ``record [DIR]``: the run's results into benchmarks/RESULTS.md rows and the auto dispatch table;
* ``prepare``: what the GPU machine should not spend minutes on, built here: the CUDA C++ library
  for sm_90 (``prebuilt/cuda``) and a Triton cache filled by the sm_90 ahead-of-time compile
  (``prebuilt/triton-cache``); prints the folders to carry and their sizes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from . import DEFAULT_STEPS, PREBUILT, ROOT, STEPS, is_dry, main_run

CARRY_LIMIT = 64 << 20


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def prepare(out: Path, triton_cache: bool, triton_wheel: Optional[str] = None) -> int:
    from .. import cuda as ext
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    t0 = time.time()
    print(f"== CUDA C++ library for sm_{ext.arch_list().replace('.', '').replace(';', ',sm_')} -> {out / 'cuda'}",
          flush=True)
    try:
        lib = ext.build(out=out / "cuda")
    except Exception as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"   {lib} ({time.time() - t0:.0f} s); registers {', '.join(ext.registered_ops())}", flush=True)
    if triton_cache:
        import shutil
        import tempfile

        from . import relocate_triton_cache
        cache = out / "triton-cache"
        print(f"== Triton cache: every kernel of the sm_90 ahead-of-time compile -> {cache}", flush=True)
        full = Path(tempfile.mkdtemp(prefix="triton-cache-"))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=str(full), PYTHONPATH=str(ROOT))
        from . import libtriton_sha256
        keyed = ""
        sha = libtriton_sha256(triton_wheel)
        if triton_wheel:   # the GPU machine's Triton (another Python): its libtriton goes into the keys
            keyed = f"from mmkernels.gpucheck import key_caches_for; key_caches_for({sha!r}); "
            print(f"   keys for the libtriton of {Path(triton_wheel).name} (sha256 {sha[:16]}...)", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", keyed + "from mmkernels.testing import aot_compile_all; "
                               "print(len(aot_compile_all()), 'configurations compiled')"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        print("   " + (proc.stdout.strip() or proc.stderr.strip()[-2000:]) + f" ({time.time() - t0:.0f} s)")
        if proc.returncode != 0:
            return 1
        # only what a cache hit reads (metadata and cubin), with the groups pointing at the copy
        shutil.rmtree(cache, ignore_errors=True)
        for f in full.glob("*/*"):
            if f.suffix in (".cubin", ".json"):
                (cache / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, cache / f.parent.name / f.name)
        relocate_triton_cache(cache, keep={".cubin", ".json"})
        (cache / "LIBTRITON_SHA256").write_text(sha + "\n")   # the env step compares it with the GPU's
        shutil.rmtree(full, ignore_errors=True)
    sizes = {p.relative_to(ROOT): _size(p) for p in (out / "cuda", out / "triton-cache") if p.is_dir()}
    for p, n in sizes.items():
        print(f"carry: {p}  {n / 2**20:.1f} MiB")
    total = sum(sizes.values())
    print(f"total {total / 2**20:.1f} MiB (with the tracked tree, under {CARRY_LIMIT >> 20} MiB): "
          f"carry [\"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}\"]")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("summary", "record", "prepare"):
        cmd, rest = argv[0], argv[1:]
        p = argparse.ArgumentParser(prog=f"python -m mmkernels.gpucheck {cmd}")
        if cmd == "prepare":
            p.add_argument("--out", default=str(PREBUILT))
            p.add_argument("--no-triton-cache", action="store_true")
            p.add_argument("--triton-wheel", default=None,
                           help="the GPU machine's Triton wheel (its Python's build, e.g. cp312): the cache is "
                                "keyed for its libtriton, else for this process's (hits only under the same Python)")
            a = p.parse_args(rest)
            return prepare(Path(a.out).resolve(), not a.no_triton_cache, a.triton_wheel)
        p.add_argument("dir", nargs="?", default=os.environ.get("OUT") or "bench-out/gpu-check")
        if cmd == "summary":
            from .summary import print_summary
            return print_summary(Path(p.parse_args(rest).dir))
        from .record import main as record_main
        return record_main(rest)
    p = argparse.ArgumentParser(prog="python -m mmkernels.gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("steps", nargs="*", help=f"steps or op names (default: {' '.join(DEFAULT_STEPS)}); "
                                            f"all steps: {', '.join(STEPS)}")
    p.add_argument("--budget", type=float, default=400, help="seconds for the whole run (default 400)")
    p.add_argument("--only", action="append", default=[], help="restrict the op steps to this op (repeatable)")
    p.add_argument("--tune", action="store_true", help="the autotuning steps: configs and tuned")
    p.add_argument("--out", default=None, help="results folder (default $OUT/gpu-check or bench-out/gpu-check)")
    p.add_argument("--dry", action="store_true", help="walk every step on the CPU (also GPU_CHECK_DRY=1)")
    p.add_argument("--step", help=argparse.SUPPRESS)   # one step, in this process (the orchestrator's child)
    a = p.parse_args(argv)
    out = Path(a.out or (Path(os.environ["OUT"]) / "gpu-check" if os.environ.get("OUT") else "bench-out/gpu-check"))
    if a.step:
        from .steps import run_step
        return run_step(a.step, out, a.only)
    from . import OPS
    steps, only = [], list(a.only)
    for s in a.steps:
        if s in STEPS:
            steps.append(s)
        elif s in OPS:
            only.append(s)
        else:
            p.error(f"unknown step or op {s!r} (steps: {', '.join(STEPS)}; ops: {', '.join(OPS)})")
    if a.tune:
        steps += ["configs", "tuned"]
    steps = list(dict.fromkeys(steps or DEFAULT_STEPS))
    if "env" not in steps:
        steps.insert(0, "env")
    dry = a.dry or is_dry()
    command = ["bash", "benchmarks/gpu_check.sh", *argv]
    try:
        return main_run(steps, a.budget, out, dry, only, command)
    finally:
        from .summary import print_summary
        print_summary(out)


if __name__ == "__main__":
    sys.exit(main())
