"""The compact table a GPU check ends with (only the end of the output comes back from the GPU
machine): one line per step, the correctness failures, the headline rows (the benchmark's
``summary.md`` table, :func:`mmkernels.bench.report.summary_table`, as plain text) and the Triton
cache."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional


def _load(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def print_summary(out: Path) -> int:
    steps = _load(out / "steps.json")
    lines = [f"==== GPU check summary ({out})"]
    if not steps:
        lines.append("no steps.json: the run did not start")
        print("\n".join(lines), flush=True)
        return 1
    lines.append(f"budget {steps['budget_s']:.0f} s{' (dry run on the CPU)' if steps.get('dry') else ''}"
                 + (f", ops {', '.join(steps['only'])}" if steps.get("only") else ""))
    lines.append(f"{'step':10s} {'status':8s} {'wall s':>7s} {'est s':>6s}  note")
    for rec in steps["steps"]:
        lines.append(f"{rec['step']:10s} {rec['status']:8s} {rec.get('wall_s', '-')!s:>7s} "
                     f"{rec.get('estimate_s', 0):6.0f}  {rec.get('note', '')}")
    env = _load(out / "env.json")
    if env:
        lib = env.get("cuda_library") or {}
        lines.append(f"GPU {env.get('gpu') or 'none'}; CUDA library from {lib.get('source') or 'nowhere'}"
                     + (f" (prebuilt passed over: {lib['prebuilt']})" if lib.get("prebuilt") else "")
                     + (f"; unavailable: {lib['unavailable']}" if lib.get("unavailable") else ""))
    compiled = hit = 0
    for name in ("correct", "headline", "compile", "tuned"):
        tri = (_load(out / f"{name}.json") or {}).get("triton") or {}
        compiled += tri.get("compiled", 0)
        hit += tri.get("cache_hit", 0)
    if compiled or hit:
        lines.append(f"Triton kernels: {compiled} compiled here, {hit} from the cache")
    corr = _load(out / "correct.json")
    if corr:
        bad = [r for r in corr["lines"] if not r["ok"]]
        worst = max((r["max_rel_err"] for r in corr["lines"] if r["ok"]), default=0.0)
        lines.append(f"correct: {len(corr['lines']) - len(bad)}/{len(corr['lines'])} ok (worst passing max rel err "
                     f"{worst:.1e})")
        for r in bad:
            lines.append(f"  FAIL {r['op']} {r['backend']} {r['dtype']}: {'; '.join(r['problems'])[:300]}")
    from ..bench.report import header, summary_table, text_table
    for name in ("headline", "tuned"):
        res = _load(out / name / "results.json")
        if not res:
            continue
        cols, rows, notes = summary_table(res)
        lines.append(f"{name} ({out / name / 'summary.md'}): {header(res)}")
        lines += text_table(cols, rows) + [f"  {n}" for n in notes]
    tour = _load(out / "tournament.json")
    if tour:
        from .tournament import score
        for slot, e in tour.get("slots", {}).items():
            parts = [f"{name} {'ok' if c.get('correct') else 'WRONG'} {score(c)}"
                     for name, c in e.get("candidates", {}).items()]
            lines.append(f"tournament {slot} (geomean ms of its cases): {'; '.join(parts)} -> "
                         f"winner {e.get('winner') or 'none'}")
    print("\n".join(lines), flush=True)
    return 0 if all(r["status"] == "ok" for r in steps["steps"]) else 1
