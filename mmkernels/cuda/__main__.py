"""``python -m mmkernels.cuda build`` | ``table RESULTS.json...`` | ``status``.

* ``build``: compile csrc/ for ``TORCH_CUDA_ARCH_LIST`` (default 8.0;9.0) into the cache and
  load it; works without a GPU; exit status 1 with the compiler's message on failure.
* ``table``: regenerate ``mmkernels/cuda/dispatch_table.json`` (what ``auto`` reads) from
  ``mmkernels-bench`` results that include both the ``cuda`` and ``triton`` providers.
* ``status``: where the library would come from and whether it loads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import TABLE, _aot_library, arch_list, build, build_dir, load, make_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmkernels.cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the extension now (no GPU needed)")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    t = sub.add_parser("table", help="regenerate the auto dispatch table from benchmark results")
    t.add_argument("results", nargs="+", help="results.json files written by mmkernels-bench")
    t.add_argument("--out", default=str(TABLE))
    sub.add_parser("status", help="where the library comes from, and whether it loads")
    args = p.parse_args(argv)
    if args.cmd == "build":
        start = time.time()
        print(f"building csrc/ for TORCH_CUDA_ARCH_LIST={arch_list()} into {build_dir()}", flush=True)
        try:
            lib = build(verbose=args.verbose)
        except Exception as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"ok: {lib} ({time.time() - start:.0f} s)")
        return 0
    if args.cmd == "table":
        results = [json.load(open(f)) for f in args.results]
        table = make_table(results)
        with open(args.out, "w") as f:
            json.dump(table, f, indent=2, sort_keys=True)
            f.write("\n")
        print(json.dumps(table["ops"], indent=2, sort_keys=True))
        return 0
    lib = _aot_library()
    print(f"ahead-of-time library: {lib or 'none'}; cache: {build_dir()}")
    reason = load()
    print("loaded" if reason is None else f"unavailable: {reason}")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
