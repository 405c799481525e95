"""``python -m mmkernels.cuda build [--out DIR]`` | ``table RESULTS.json...`` | ``status``.

* ``build``: compile csrc/ for ``TORCH_CUDA_ARCH_LIST`` (default: this machine's GPU, or every
  target of ``DEFAULT_ARCHS`` where there is none; with ``--out``, 9.0) into the cache and load
  it; works without a GPU; exit status 1 with the compiler's message on failure. ``--out DIR``
  also writes DIR/library.so and DIR/manifest.json, a prebuilt library that is loaded first
  wherever DIR is ``$MMKERNELS_CUDA_PREBUILT`` (or ``prebuilt/cuda`` of the checkout) and the
  sources' hash matches; the command then lists the ops the copy registers.
* ``table``: regenerate ``mmkernels/cuda/dispatch_table.json`` (what ``auto`` reads) from
  ``mmkernels-bench`` results that include both the ``cuda`` and ``triton`` providers.
* ``status``: where the library comes from, why a prebuilt one was passed over, whether it loads,
  the architectures it carries and which ops it registers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import builder, dispatch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmkernels.cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the extension now (no GPU needed)")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    b.add_argument("--out", help="also write a prebuilt library (library.so + manifest.json) to this folder")
    t = sub.add_parser("table", help="regenerate the auto dispatch table from benchmark results")
    t.add_argument("results", nargs="+", help="results.json files written by mmkernels-bench")
    t.add_argument("--out", default=str(dispatch.TABLE))
    sub.add_parser("status", help="where the library comes from, and whether it loads")
    args = p.parse_args(argv)
    if args.cmd == "build":
        if args.out and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"   # the prebuilt library is for the H100/H200
        start = time.time()
        print(f"building csrc/ for TORCH_CUDA_ARCH_LIST={builder.arch_list()} into {builder.build_dir()}", flush=True)
        try:
            lib = builder.build(verbose=args.verbose, out=args.out)
        except Exception as exc:
            print(exc, file=sys.stderr)
            return 1
        if args.out:
            print(f"registers: {', '.join(builder.registered_ops())}")
        print(f"ok: {lib} ({time.time() - start:.0f} s)")
        return 0
    if args.cmd == "table":
        results = [json.load(open(f)) for f in args.results]
        table = dispatch.make_table(results)
        with open(args.out, "w") as f:
            json.dump(table, f, indent=2, sort_keys=True)
            f.write("\n")
        print(json.dumps(table["ops"], indent=2, sort_keys=True))
        return 0
    lib, why = builder.prebuilt_library()
    print(f"prebuilt: {lib or why}")
    print(f"ahead-of-time library: {builder._aot_library() or 'none'}; cache: {builder.build_dir()}")
    reason = builder.load()
    if reason is None:
        info = builder.library_info()
        print(f"loaded from {info.get('source')}: {info.get('path')}")
        if info.get("source") != "emulator":
            try:
                targets = builder.library_targets(info["path"])
                print(f"targets: {', '.join(targets['sass'])}; PTX: {', '.join(targets['ptx']) or 'none'}")
            except (builder.BuildError, OSError) as exc:
                print(f"targets: unknown ({exc})")
        print(f"registers: {', '.join(builder.registered_ops())}")
    else:
        print(f"unavailable: {reason}")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
