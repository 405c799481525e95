"""``python -m mmkernels.gpucheck record DIR``: a GPU check's results into records, no hand work.

* ``benchmarks/RESULTS.md``: one row per (case, mode) of every op section, in that section's own
  columns, with date, card, commit and command taken from the results' provenance; the section's
  "not yet measured" placeholder goes. Rows come from the ``headline`` step (heuristic
  configurations), with the ``compile`` step's times as ``vs compile`` where it ran.
* the host-time section of ``benchmarks/RESULTS.md``: one row per (tiny case, mode) of the
  ``per_call`` step (µs per call of plain PyTorch, ``auto``, triton under each launch mode, cuda).
* ``mmkernels/launch_table.json``: from the ``per_call`` step, per GPU and chip class, the launch
  mode (:mod:`mmkernels.runtime`) whose host time per call was lowest, which ``auto`` launches take.
* ``mmkernels/candidates.json``: from the ``tournament`` step, per GPU and chip class, the winning
  candidate of each kernel slot (:mod:`mmkernels.candidates`), and its rows in RESULTS.md (a
  tournament-only run records just these).
* ``mmkernels/cuda/dispatch_table.json``: the ``auto`` table (:func:`mmkernels.cuda.make_table`)
  from the headline rows that timed triton beside cuda, torch or reference, merged into the table there
  (ops the run did not time keep their entries).

Only complete runs are recorded (``"complete": true``), unless ``--allow-incomplete``.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

from . import ROOT

# RESULTS.md section heading -> the ops whose rows go there; "cuda" marks the cuda-vs-triton section
SECTIONS = {"## norm_concat": ("norm_concat",), "## attention_pool": ("attention_pool",),
            "## concat_linear": ("concat_linear",), "## gated_sum and gated_fusion": ("gated_sum", "gated_fusion"),
            "## tensor_fusion and low_rank_fusion": ("tensor_fusion", "low_rank_fusion"),
            "## latent_pool": ("latent_pool",),
            "## CUDA C++ backend": ("cuda", "norm_concat", "attention_pool", "gated_sum")}
PLACEHOLDER = "not yet measured"
HOST_SECTION = "## Host time per call"
HOST_PROVIDERS = {"auto us": "auto", "triton jit us": "triton@jit", "triton unplanned us": "triton@unplanned",
                  "triton prepared us": "triton@prepared", "triton static us": "triton@static", "cuda us": "cuda"}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _ms(v) -> str:
    return f"{v:.4f}" if _num(v) else "n/a"


def _x(v) -> str:
    return f"{v:.2f}x" if _num(v) else "n/a"


def _ratio(a, b):
    return a / b if _num(a) and _num(b) and b else float("nan")


def _groups(results: Dict, extra: Optional[Dict]):
    by: Dict[tuple, Dict[str, dict]] = {}
    for res in [results] + ([extra] if extra else []):
        for r in res.get("rows", []):
            if r.get("error"):
                continue
            by.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r
    return by


def cells(columns: List[str], op: str, case: str, mode: str, g: Dict[str, dict], prov: Dict) -> Optional[List[str]]:
    """One RESULTS.md row for a section's ``columns``; None when the row has nothing to show."""
    tri, cu = g.get("triton"), g.get("cuda")
    commit = (prov.get("commit") or "?")[:7] + (" (dirty)" if prov.get("dirty") else "")
    values = {"date": (prov.get("date") or "?")[:10], "card": prov.get("gpu") or prov.get("device") or "?",
              "commit": commit, "command": f"`{prov.get('command')}`", "op": op, "case": case, "mode": mode}
    if tri:
        values.update({"triton ms": _ms(tri["ms"]), "x floor": _x(tri.get("x_floor"))})
        # latent_pool's "patched ms": its triton provider is the patched head on the Triton kernels
        # (what the patched head runs on a GPU), and the section's ratios are against it
        values["patched ms"] = values["triton ms"]
        if _num(tri.get("peak_mb")):
            values["peak MB"] = f"{tri['peak_mb']:.0f}"
        for col in columns:
            m = re.fullmatch(r"vs (\w+)", col)
            if m and m.group(1) in g:
                values[col] = _x(_ratio(g[m.group(1)]["ms"], tri["ms"]))
    if cu:
        values.update({"cuda ms": _ms(cu["ms"]), "x floor (cuda)": _x(cu.get("x_floor"))})
        if tri:
            values["cuda vs triton"] = _x(_ratio(tri["ms"], cu["ms"]))
    if "triton ms" not in values and "cuda ms" not in values:
        return None
    return [values.get(c, "n/a") for c in columns]


def _append_rows(text: str, section_of, rows_for) -> str:
    """``text`` with rows appended to the table of each section ``section_of(heading)`` names (not
    None): ``rows_for(section, columns)`` gives them (lists of cells) for the table's ``columns``;
    the table's earlier rows stay, its "not yet measured" placeholder goes."""
    lines = text.splitlines()
    out: List[str] = []
    section = None
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("## "):
            section = section_of(ln)
        if section and ln.startswith("| date |"):
            columns = [c.strip() for c in ln.strip().strip("|").split("|")]
            out += [ln, lines[i + 1]]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                if PLACEHOLDER not in lines[i]:
                    out.append(lines[i])
                i += 1
            out += ["| " + " | ".join(row) + " |" for row in rows_for(section, columns)]
            continue
        out.append(ln)
        i += 1
    return "\n".join(out) + "\n"


def update_results_md(text: str, results: Dict, compiled: Optional[Dict] = None) -> str:
    prov = results.get("provenance") or {}
    groups = _groups(results, compiled)

    def rows_for(section, columns):
        cuda_section = section[0] == "cuda"
        for (op, case, mode), g in groups.items():
            if op not in section or (cuda_section and "cuda" not in g) or (not cuda_section and "triton" not in g):
                continue
            row = cells(columns, op, case, mode, g, prov)
            if row:
                yield row
    return _append_rows(text, lambda heading: next((v for k, v in SECTIONS.items() if heading.startswith(k)), None),
                        rows_for)


def host_cells(columns: List[str], row: Dict, prov: Dict) -> List[str]:
    """One row of the host-time section from a ``per_call`` step row (µs per provider)."""
    us = row["us"]
    plain = us.get(row["plain"])
    kernels = [v for k, v in us.items() if k.startswith(("triton", "cuda")) and _num(v)]
    commit = (prov.get("commit") or "?")[:7] + (" (dirty)" if prov.get("dirty") else "")
    values = {"date": (prov.get("date") or "?")[:10], "card": prov.get("gpu") or prov.get("device") or "?",
              "commit": commit, "command": "`bash benchmarks/gpu_check.sh per_call`", "op": row["op"],
              "case": row["case"], "mode": row["mode"], "plain": row["plain"],
              "plain us": f"{plain:.1f}" if _num(plain) else "n/a",
              "best kernel / plain": _x(_ratio(min(kernels), plain)) if kernels else "n/a"}
    for col, provider in HOST_PROVIDERS.items():
        v = us.get(provider)
        values[col] = f"{v:.1f}" if _num(v) else "n/a"
    return [values.get(c, "n/a") for c in columns]


def update_host_md(text: str, per_call: Dict, prov: Dict) -> str:
    """The host-time section with a row per ``per_call`` row appended (earlier runs' rows kept,
    the placeholder dropped)."""
    return _append_rows(text, lambda heading: heading.startswith(HOST_SECTION) or None,
                        lambda _, columns: [host_cells(columns, r, prov) for r in per_call.get("rows", [])])


def launch_verdict(per_call: Dict, prov: Dict) -> Dict:
    """The launch mode the ``per_call`` step measured fastest (:mod:`mmkernels.runtime`): per mode,
    the geometric mean over the rows that timed every mode of its µs over ``prepared``'s; the lowest
    wins. ``{"modes": {gpu: mode, "class:<chip class>": mode}, "evidence": {...}}``; empty when no
    row timed them all."""
    import math

    from ..cuda.dispatch import class_of_sm
    from ..runtime import LAUNCH_MODES
    keys = [f"triton@{m}" for m in LAUNCH_MODES]
    rows = [r["us"] for r in per_call.get("rows", []) if all(_num(r["us"].get(k)) and r["us"][k] > 0 for k in keys)]
    if not rows:
        return {}
    ratios = {m: math.exp(sum(math.log(u[f"triton@{m}"] / u["triton@prepared"]) for u in rows) / len(rows))
              for m in LAUNCH_MODES}
    best = min(ratios, key=ratios.get)
    gpu = prov.get("gpu") or "?"
    ev = dict({f"{m}_over_prepared": round(r, 4) for m, r in ratios.items()}, rows=len(rows),
              date=(prov.get("date") or "?")[:10], commit=(prov.get("commit") or "?")[:7])
    out = {"modes": {gpu: best}, "evidence": {gpu: ev}}
    cls = class_of_sm(prov.get("sm"))
    if cls:
        out["modes"][f"class:{cls}"] = best
        out["evidence"][f"class:{cls}"] = dict(ev, **{"from": gpu})
    return out


def record_tournament(tour: Dict, md: Path, commit: Optional[str], table: Optional[Path]) -> List[str]:
    """The tournament's rows into ``md`` (its section) and its winners into the candidates table."""
    from .. import candidates
    from . import tournament
    prov = dict(tour.get("provenance") or {})
    if commit:
        prov.update(recorded_commit=prov.get("commit"), commit=commit, dirty=False)
    md.write_text(_append_rows(md.read_text(), lambda heading: heading.startswith(tournament.SECTION) or None,
                               lambda _, columns: tournament.rows_md(tour, prov, columns)))
    wrote = [f"{md} ({tournament.SECTION[3:]})"]
    found = tournament.verdict(tour, prov)
    if found:
        path = table or Path(candidates.TABLE)
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps(tournament.merge(old, found), indent=2, sort_keys=True) + "\n")
        wrote.append(f"{path} ({json.dumps(found['winners'], sort_keys=True)})")
    return wrote


def merge_tables(old: Dict, new: Dict) -> Dict:
    """The dispatch table with ``new``'s verdicts (per op and GPU) over ``old``'s: a run that timed
    some ops leaves the others' measured choices in place."""
    out = dict(new)
    for key in ("ops", "evidence"):
        merged = {op: dict(per_gpu) for op, per_gpu in (old.get(key) or {}).items()}
        for op, per_gpu in (new.get(key) or {}).items():
            merged.setdefault(op, {}).update(per_gpu)
        out[key] = merged
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmkernels.gpucheck record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="the check's results folder ($OUT/gpu-check as it came back)")
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--table", default=None, help="dispatch table to write (default mmkernels/cuda/dispatch_table.json)")
    p.add_argument("--launch-table", default=None,
                   help="launch-mode table to write (default mmkernels/launch_table.json)")
    p.add_argument("--candidates-table", default=None,
                   help="kernel-candidate table to write (default mmkernels/candidates.json)")
    p.add_argument("--allow-incomplete", action="store_true")
    p.add_argument("--commit", default=None,
                   help="the commit whose tree ran, where the results' provenance names another: the GPU "
                        "machine's copy carries the session's starting git metadata, so a run after a later "
                        "commit reads as that older commit with uncommitted changes")
    a = p.parse_args(argv)
    from .. import cuda as ext
    folder = Path(a.dir)
    head = folder / "headline" / "results.json"
    wrote = []
    tour_path = folder / "tournament.json"
    if tour_path.is_file():    # the tournament step ran: its winners and rows, under its own provenance
        wrote += record_tournament(json.loads(tour_path.read_text()), Path(a.results_md), a.commit,
                                   Path(a.candidates_table) if a.candidates_table else None)
    if not head.is_file():
        print(f"record: no {head} (the headline step did not run)"
              + (f"; wrote {', '.join(wrote)}" if wrote else ""))
        return 0 if wrote else 1
    results = json.loads(head.read_text())
    if not results.get("complete") and not a.allow_incomplete:
        print(f"record: {head} is incomplete (cut off while measuring {results.get('in_progress')}); "
              "pass --allow-incomplete to record the rows it has")
        return 1
    comp_path = folder / "compile" / "results.json"
    compiled = json.loads(comp_path.read_text()) if comp_path.is_file() else None
    if a.commit:
        for res in (results, compiled):
            if res is not None:
                prov = res.setdefault("provenance", {})
                prov.update(recorded_commit=prov.get("commit"), commit=a.commit, dirty=False)
    md = Path(a.results_md)
    text = update_results_md(md.read_text(), results, compiled)
    host_path = folder / "per_call" / "results.json"
    wrote.append(str(md))
    if host_path.is_file():    # the per_call step ran: its rows, under the headline's provenance
        per_call = json.loads(host_path.read_text())
        text = update_host_md(text, per_call, results.get("provenance") or {})
        verdict = launch_verdict(per_call, results.get("provenance") or {})
        if verdict:
            from ..runtime import LAUNCH_TABLE
            launch_path = Path(a.launch_table or LAUNCH_TABLE)
            old = json.loads(launch_path.read_text()) if launch_path.is_file() else {}
            merged = {key: {**old.get(key, {}), **verdict[key]} for key in ("modes", "evidence")}
            merged["note"] = ("written by 'python -m mmkernels.gpucheck record' from the GPU check's per_call "
                              "step: per GPU (and chip class) the launch mode whose host time per call was lowest")
            launch_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
            wrote.append(f"{launch_path} ({json.dumps(verdict['modes'], sort_keys=True)})")
    md.write_text(text)
    table_path = Path(a.table) if a.table else ext.TABLE
    table = merge_tables(json.loads(table_path.read_text()) if table_path.is_file() else {}, ext.make_table([results]))
    table_path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    print(f"wrote {', '.join(wrote)} and {table_path}: {json.dumps(table['ops'], sort_keys=True)}")
    return 0
