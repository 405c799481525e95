"""``mmkernels-bench``: time every op's providers on named sizes (in interleaved rounds), print the
summary table, write summary.md, results_full.md, results.json and results.png. On a CPU it times
the small "cpu" cases and says GPU numbers need a GPU."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .spec import MODES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


BENCH_EXTRA = ("rich", "matplotlib")  # the report's table and plot: `pip install mmkernels[bench]`


def missing_extra() -> list:
    """The packages of the ``bench`` extra that are not installed."""
    import importlib.util
    return [m for m in BENCH_EXTRA if importlib.util.find_spec(m) is None]


def main(argv=None) -> int:
    missing = missing_extra()
    if missing:
        print(f"mmkernels-bench needs the bench extra: pip install 'mmkernels[bench]' (missing: {', '.join(missing)})",
              file=sys.stderr)
        return 2
    from ..ops import bench_specs
    specs = bench_specs()
    p = argparse.ArgumentParser(prog="mmkernels-bench", description=__doc__)
    p.add_argument("--op", action="append", choices=sorted(specs), help="op(s) to run (default: all)")
    p.add_argument("--case", action="append", help="case name(s) to run (default: by --quick / device)")
    p.add_argument("--quick", action="store_true", help="only the cases tagged quick")
    p.add_argument("--mode", action="append", choices=MODES, help="fwd, bwd, fwd+bwd (default: fwd and fwd+bwd)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--provider", action="append", help="default: every provider of the op")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench-out",
                   help="folder for summary.md, results_full.md, results.json and results.png")
    p.add_argument("--list", action="store_true", help="list ops, cases and providers, then exit")
    a = p.parse_args(argv)

    chosen = [specs[o] for o in (a.op or sorted(specs))]
    if a.list:
        for s in chosen:
            print(f"{s.op}: providers {', '.join(s.providers)}")
            for c in s.cases:
                print(f"  {c.name:28s} {c.params} {' '.join(c.tags)}")
        return 0
    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    if a.case:
        known = {c.name for s in chosen for c in s.cases}
        unknown = set(a.case) - known
        if unknown:
            p.error(f"--case: unknown {sorted(unknown)}; see --list")
        case_filter = lambda c: c.name in a.case
    elif not on_gpu:
        case_filter = lambda c: "cpu" in c.tags
    elif a.quick:
        case_filter = lambda c: "quick" in c.tags
    else:
        case_filter = lambda c: "cpu" not in c.tags
    dtypes = [DTYPES[d] for d in (a.dtype or (["bf16"] if on_gpu else ["fp32"]))]
    modes = a.mode or ["fwd", "fwd+bwd"]
    providers = set(a.provider or [p_ for s in chosen for p_ in s.providers])

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from . import report, runner

    console = Console()
    if not console.is_terminal:  # CI logs and pipes: the summary's 120 columns
        console = Console(width=120)
    # the bar goes to stderr, so what stdout gets starts with the report's first line
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        def progress(total):
            task = bar.add_task("starting", total=total)

            def step(done, current):
                bar.update(task, completed=done, description=current)
            return step
        command = sys.argv if argv is None else ["mmkernels-bench", *argv]
        result = runner.run(chosen, case_filter, providers, modes, dtypes, device, progress,
                            on_rows=lambda partial: report.write_all(partial, a.out, png=False),  # survives a kill
                            argv=command)
    report.print_table(result, console)
    paths = report.write_all(result, a.out)
    names = ", ".join(os.path.basename(paths[k]) for k in ("summary", "full", "json", "png"))
    console.print(f"wrote {names} in {a.out}", markup=False, highlight=False, soft_wrap=True)   # a path whole
    return 0


if __name__ == "__main__":
    sys.exit(main())
