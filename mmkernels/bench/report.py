"""The reports of one benchmark run: ``summary.md`` (one row per op, case and pass; the same table
in the terminal and in the GPU check's summary), ``results_full.md`` (every provider and column),
``results.json`` and ``results.png`` (a panel per op)."""
from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from typing import Callable, Dict, List, Optional, Tuple

from .runner import AUTO, _ratio
from .timing import SMALL_BYTES, SMALL_FLOPS
from .timing import UNSTABLE as UNSTABLE_X

COLUMNS = [("op", "op"), ("case", "case"), ("mode", "mode"), ("dtype", "dtype"), ("provider", "provider"),
           ("ms", "ms"), ("spread", "p20-p80 ms"), ("round_spread", "rounds max/min"), ("cpu_ms", "CPU ms"),
           ("unstable", "unstable"), ("threads", "threads"), ("kernel_ms", "kernel ms"), ("loop_ms", "loop ms"),
           ("host_bound", "host-bound"), ("floor_ms", "floor ms"), ("x_floor", "x floor"),
           ("x_floor_save_inputs", "x floor save-inputs"), ("gb_s", "GB/s"),
           ("tflop_s", "TFLOP/s"), ("peak_mb", "peak MB"), ("vs_eager", "vs eager"), ("vs_compile", "vs compile"),
           ("vs_sdpa", "vs sdpa"), ("vs_cublas_premade", "vs cuBLAS premade"),
           ("vs_cublas_premade_aligned", "vs cuBLAS aligned"), ("vs_cublas_gemms", "vs cuBLAS GEMMs"),
           ("vs_cublas_gemms_aligned", "vs cuBLAS GEMMs aligned"), ("vs_best", "vs best baseline"),
           ("math", "runs as")]
_NAMES = 5  # op, case, mode, dtype, provider
PLAIN = ("eager", "compile")   # the baselines every op has; the others are libraries' (SDPA, cuBLAS)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(key, v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if key in ("ms", "floor_ms", "kernel_ms", "loop_ms", "cpu_ms"):
        return f"{v:.4f}"
    if key == "host_bound":
        return "yes" if v else "no"
    if key.startswith("x_floor") or key.startswith("vs_") or key == "round_spread":
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _math(r: Dict) -> str:
    """What a row computes in: the plain baselines' dtypes (and SDPA kernel), the backend auto ran."""
    dts = r.get("math_dtypes")
    text = "+".join(dts) if isinstance(dts, list) else (dts or "")
    if r.get("sdpa_backend"):
        text += f", sdpa {r['sdpa_backend']}"
    if r.get("backend"):
        text = f"backend {r['backend']}" + (f", {text}" if text else "")
    return text


def _layout(result: Dict):
    """Columns that hold a value somewhere, each row's cells, and the footnoted reasons of the
    providers that could not run (and of missing kernel times)."""
    notes: List[str] = []

    def note(text):
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    cells = []
    for r in result["rows"]:
        row = {k: _fmt(k, r.get(k)) for k, _ in COLUMNS}
        row["spread"] = f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}" if _number(r.get("p20_ms")) else "-"
        row["math"] = _math(r) or "-"
        row["unstable"] = f"UNSTABLE: {r['unstable']}" if r.get("unstable") else "-"
        if r.get("error"):
            row = {k: (v if i < _NAMES else "") for i, (k, v) in enumerate(row.items())}
            row["ms"] = f"n/a [{note(r['error'])}]"
        elif r.get("kernel_ms") is None and r.get("kernel_timer"):
            row["kernel_ms"] = f"n/a [{note(r['kernel_timer'])}]"
        elif r.get("kernel_timer", "cudagraph") != "cudagraph":
            row["kernel_ms"] += f" [{note(r['kernel_timer'])}]"
        cells.append(row)
    cols = [(k, t) for k, t in COLUMNS if any(c[k] not in ("-", "") for c in cells)]
    return cols, [[c[k] for k, _ in cols] for c in cells], notes


_WHY = (f"its timing rounds or its calls disagreed by more than {UNSTABLE_X:g}x, or its calls waited more than "
        "they ran")


def unstable_rows(result: Dict) -> List[Dict]:
    return [r for r in result["rows"] if r.get("unstable") and not r.get("error")]


def header(result: Dict) -> str:
    """The reports' first line: whether the run was cut off, whether it saw rows that are not
    speeds (``unstable``), then the device and its ceilings."""
    m = result["machine"]
    if m["name"] == "cpu":
        text = ("Device: CPU. GPU numbers need a GPU: these are CPU timings of small sizes (no floors); "
                f"torch {m['torch']}.")
    else:
        rates = ", ".join(f"{k[6:]} {v / 1e12:.0f} TFLOP/s" for k, v in m["matmul_flop_per_s"].items() if _number(v))
        text = (f"Device: {m['name']}; HBM copy bandwidth {m['hbm_bytes_per_s'] / 1e12:.2f} TB/s, read "
                f"{m.get('hbm_read_bytes_per_s', float('nan')) / 1e12:.2f} TB/s; matmul {rates}; "
                f"torch {m['torch']}, triton {m.get('triton', '-')}.")
    bad = unstable_rows(result)
    if bad:
        text = (f"UNSTABLE ROWS: {len(bad)} of {len(result['rows'])} rows are not speeds (marked unstable: {_WHY}, "
                "also when measured again; the machine was busy). " + text)
    if not result.get("complete", True):
        where = result.get("in_progress")
        text = ("INCOMPLETE RUN (cut off or still running" + (f"; was measuring: {where}" if where else "")
                + "): only the rows below were measured. " + text)
    return text


def provenance_line(result: Dict) -> str:
    p = result.get("provenance") or {}
    if not p:
        return ""
    dirty = " (with uncommitted changes)" if p.get("dirty") else ""
    parts = [f"date {p.get('date')}", f"commit {p.get('commit') or '?'}{dirty}",
             f"command `{p.get('command')}`", f"torch {p.get('torch')}", f"triton {p.get('triton')}",
             f"CUDA {p.get('cuda') or '-'}"]
    if p.get("gpu"):
        parts += [f"GPU {p['gpu']} (sm {p.get('sm')}, L2 {p.get('l2_bytes', 0) / 1e6:.0f} MB)",
                  f"driver {p.get('driver') or '?'}"]
        if p.get("clocks_mhz"):
            parts.append("clocks/limits " + ", ".join(f"{k} {v}" for k, v in p["clocks_mhz"].items()))
    at = p.get("autotune") or {}
    parts.append(f"autotune {'on' if at.get('on') else 'off'} (MMKERNELS_AUTOTUNE={at.get('MMKERNELS_AUTOTUNE')})")
    parts.append(f"MMKERNELS_BACKEND={p.get('backend_env')}")
    return "Provenance: " + "; ".join(parts) + "."


# --- the summary: one row per (op, case, mode, dtype) ---------------------------------------------

SUMMARY_COLUMNS = [("op", "op"), ("case", "case"), ("mode", "pass"), ("dtype", "dtype"), ("runs", "auto runs"),
                   ("ms", "ms"), ("x_floor", "x floor"), ("best", "best baseline"), ("vs_best", "vs best"),
                   ("vs_eager", "vs eager"), ("vs_compile", "vs compile"), ("note", "note")]


def _short(v, unit: str = "x") -> str:
    """A summary number: 4 significant digits (ms), or a ratio: two decimals from 0.1 to 100, two
    significant digits below, none above."""
    if not _number(v):
        return "-" if v is None or isinstance(v, float) else str(v)
    if unit == "":
        return f"{v:.4g}"
    if abs(v) < 0.1:
        return f"{v:.2g}{unit}"
    return f"{v:.2f}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"


def _ms_of(r: Optional[Dict]) -> float:
    return r["ms"] if r is not None and not r.get("error") and _number(r.get("ms")) else float("nan")


def _fastest(g: Dict[str, Dict], names) -> Optional[str]:
    timed = [n for n in names if _number(_ms_of(g.get(n)))]
    return min(timed, key=lambda n: g[n]["ms"]) if timed else None


def _baselines(result: Dict, op: str, g: Dict[str, Dict]) -> List[str]:
    """The op's baselines: as the run recorded them, else read off its rows' ``vs_*`` columns."""
    info = (result.get("ops") or {}).get(op)
    if info:
        return list(info["baselines"])
    return list(dict.fromkeys(k[3:] for r in g.values() for k in r if k.startswith("vs_") and k != "vs_best"))


def summary_rows(result: Dict) -> List[Dict]:
    """One dict per (op, case, mode, dtype), in run order: ``provider``, the row the summary is
    about (``auto``, or latent_pool's ``patched``; where the run did not time it, the fastest
    mmkernels provider, ``auto`` False), ``runs`` (the backend auto ran, else the provider),
    ``ms`` and ``x_floor``; ``best``, the fastest library baseline (SDPA, cuBLAS) where the op has
    one, else the faster of eager and compile, and the speedups against it, eager and compile (> 1:
    mmkernels is faster); ``unstable``, the providers among those compared whose rows are."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for r in result["rows"]:
        groups.setdefault((r["op"], r["case"], r["mode"], r["dtype"]), {})[r["provider"]] = r
    out = []
    for (op, case, mode, dtype), g in groups.items():
        bases = _baselines(result, op, g)
        subject = next((p for p in AUTO if p in g and not g[p].get("error")), None)
        auto = subject is not None
        if subject is None:
            subject = _fastest(g, [p for p in g if p not in bases and p not in AUTO])
        row = g.get(subject) if subject else None
        libs = [b for b in bases if b not in PLAIN]
        best = _fastest(g, libs) or _fastest(g, [b for b in bases if b in PLAIN])
        ms = _ms_of(row)
        compared = [p for p in dict.fromkeys([subject, best, "eager", "compile"]) if p in g]
        out.append(dict(op=op, case=case, mode=mode, dtype=dtype, provider=subject, auto=auto,
                        runs=((row.get("backend") or subject) if auto else subject) if row else None,
                        ms=ms, x_floor=row.get("x_floor") if row else None, best=best,
                        vs_best=_ratio(_ms_of(g.get(best)), ms), vs_eager=_ratio(_ms_of(g.get("eager")), ms),
                        vs_compile=_ratio(_ms_of(g.get("compile")), ms),
                        unstable=[p for p in compared if g[p].get("unstable") and not g[p].get("error")]))
    return out


def summary_table(result: Dict) -> Tuple[List[Tuple[str, str]], List[List[str]], List[str]]:
    """``(columns, cells, notes)`` of the summary, the one builder behind ``summary.md``, the
    terminal table and the GPU check's summary: columns without a value anywhere are left out
    (dtype when the run had one, x floor on a CPU); a figure that involves an unstable row carries
    ``!`` and its row's ``note`` says ``unstable``; the notes say what the marks mean and which
    providers could not run."""
    srows = summary_rows(result)
    notes = []
    cells = []
    for s in srows:
        c = {k: _short(s.get(k)) for k, _ in SUMMARY_COLUMNS}
        c["ms"] = _short(s["ms"], "")
        c["runs"] = (s["runs"] or "n/a") + ("" if s["auto"] or not s["runs"] else "*")
        c["best"] = s["best"] or "-"
        bad = set(s["unstable"])
        marks = dict(ms=[s["provider"]], x_floor=[s["provider"]], best=[s["best"]], vs_best=[s["provider"], s["best"]],
                     vs_eager=[s["provider"], "eager"], vs_compile=[s["provider"], "compile"])
        for k, involved in marks.items():
            if bad & set(involved) and c[k] != "-":
                c[k] += "!"
        c["note"] = "unstable" if bad else ""
        cells.append(c)
    for k in ("ms", "x_floor", "vs_best", "vs_eager", "vs_compile"):    # keep the digits of a column aligned
        if any(c[k].endswith("!") for c in cells):
            for c in cells:
                c[k] += "" if c[k].endswith("!") else " "
    keep = [(k, t) for k, t in SUMMARY_COLUMNS
            if k in ("op", "case", "mode", "runs", "ms") or any(c[k] not in ("-", "") for c in cells)]
    if len({s["dtype"] for s in srows}) <= 1:
        keep = [(k, t) for k, t in keep if k != "dtype"]
    if any(not s["auto"] and s["runs"] for s in srows):
        notes.append("* auto was not timed here (or could not run): the fastest mmkernels provider.")
    notes.append("vs X: X's ms over auto's (> 1: auto is faster); best baseline: the fastest library baseline "
                 "(SDPA, cuBLAS) where the op has one, else the faster of eager and compile.")
    if any(s["unstable"] for s in srows):
        notes.append(f"! (unstable): the figure involves a row that is not a speed ({_WHY}, also when measured "
                     "again; results_full.md says which and how).")
    one = {r["threads"] for r in result["rows"] if r.get("threads")}
    if 1 in one:
        notes.append(f"Timed in one thread: the cases whose forward moves at most {SMALL_BYTES >> 20} MiB and does at "
                     f"most {SMALL_FLOPS / 1e6:g} MFLOP" + ("" if one == {1} else " (the others in "
                                                             f"{max(one)})") + ".")
    skipped = skipped_line(result)
    if skipped:
        notes.append(skipped)
    return keep, [[c[k] for k, _ in keep] for c in cells], notes


def _reason(error: str) -> Tuple[Optional[str], str]:
    """``(op, reason)`` of a row's error: a BackendError's own words without its preamble."""
    import re
    m = re.match(r"\w+: mmkernels\.(\w+): (?:backend '\w+' cannot run these inputs|no backend can run these inputs): ?"
                 r"(.*)", error)
    return (m.group(1), m.group(2).strip()) if m else (None, error)


def skipped_line(result: Dict, width: int = 100) -> str:
    """One line: the providers that could not run (their rows are left out of the summary), grouped
    by why; a reason only some ops gave is prefixed with those ops."""
    by: Dict[str, Dict[str, List[str]]] = {}
    for r in result["rows"]:
        if r.get("error"):
            op, why = _reason(r["error"])
            ops = by.setdefault(r["provider"], {}).setdefault(why[:width], [])
            if op and op not in ops:
                ops.append(op)
    if not by:
        return ""
    every = {}
    for p, reasons in by.items():
        common = max(reasons, key=lambda w: len(reasons[w]))
        text = "; ".join(w if w == common else f"{', '.join(o)}: {w}" for w, o in reasons.items())
        every.setdefault(text, []).append(p)
    return "Skipped (could not run here): " + "; ".join(f"{', '.join(ps)} ({text})" for text, ps in every.items()) + "."


def print_table(result: Dict, console=None, width: int = 120) -> None:
    """The summary (:func:`summary_table`) as a terminal table at most ``width`` columns wide, the op
    as a section title above its rows; then the notes and the provenance."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    width = min(width, console.width) if console.is_terminal else width
    cols, rows, notes = summary_table(result)

    def print_line(text):
        console.print(text, markup=False, highlight=False, width=width, overflow="fold")
    print_line(header(result))
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold underline")
    for k, title in cols:
        if k == "op":
            continue
        text = k in ("runs", "best", "note")      # these fold where the width runs out; names and numbers do not
        left = text or k in ("case", "mode", "dtype")
        table.add_column(title.replace(" ", "\n", 1), justify="left" if left else "right", overflow="fold",
                         no_wrap=not text)
    at = [k for k, _ in cols].index("op")
    op = None
    for cells in rows:
        if cells[at] != op:
            op = cells[at]
            table.add_row(f"[bold]{op}[/bold]", end_section=False)
        table.add_row(*[c for (k, _), c in zip(cols, cells) if k != "op"])
    console.print(table, width=width)
    for n in notes:
        print_line(n)
    if provenance_line(result):
        print_line(provenance_line(result))


def text_table(cols: List[Tuple[str, str]], rows: List[List[str]], indent: str = "  ") -> List[str]:
    """Plain aligned lines of a table (the GPU check prints its summary this way)."""
    widths = [max([len(t)] + [len(r[i]) for r in rows]) for i, (_, t) in enumerate(cols)]
    line = lambda cells: indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line([t for _, t in cols])] + [line(r) for r in rows]


def summary_markdown(result: Dict) -> str:
    """``summary.md``: the header line, the summary table, its notes, the provenance."""
    cols, rows, notes = summary_table(result)
    lines = [header(result), "", "| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += [""] + notes + ["", "Every provider and column: `results_full.md` (and `results.json`).", "",
                             provenance_line(result)]
    return "\n".join(lines) + "\n"


def markdown(result: Dict) -> str:
    """``results_full.md``: every provider's row, every column."""
    cols, rows, notes = _layout(result)
    lines = [header(result), "", provenance_line(result), "",
             "| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


# --- the plot -------------------------------------------------------------------------------------

PLOT_DPI = 100
PLOT_WIDTH_IN = 16.0   # 1600 px at PLOT_DPI: a screen's width


def plot(result: Dict, path: str) -> Dict[str, List[str]]:
    """``results.png``: one panel per op in a grid two panels wide (1600 px at its dpi), each
    provider's speed-up against eager (eager's ms / its ms) as horizontal bars on a log axis, one
    group of bars per (case, mode[, dtype]) labelled on the y axis, 1.0 (as fast as eager) a black
    line; where the case has a floor, a diamond at the speed-up a provider at the floor would have
    and each bar's fraction of the floor (1 / x floor) beside its ratio; a bar whose row (or eager's)
    is unstable pale and hatched. Returns ``{op: [group labels drawn]}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker
    from matplotlib.patches import Patch

    one_dtype = len({r["dtype"] for r in result["rows"]}) <= 1
    panels: Dict[str, Dict[str, Dict[str, Dict]]] = {}
    for r in result["rows"]:
        if not r.get("error") and _number(r.get("ms")):
            label = f"{r['case']} {r['mode']}" + ("" if one_dtype else f" {r['dtype']}")
            panels.setdefault(r["op"], {}).setdefault(label, {})[r["provider"]] = r
    providers = sorted({p for groups in panels.values() for g in groups.values() for p in g if p != "eager"},
                       key=lambda p: (p not in AUTO, p not in PLAIN, p))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    ops = list(panels) or ["(no rows)"]
    ncols = 1 if len(ops) == 1 else 2
    nrows = math.ceil(len(ops) / ncols)
    bar_in = 0.16   # inches per bar

    def bars(op):
        groups = panels.get(op, {})
        return sum(max(1, len([p for p in g if p != "eager"])) for g in groups.values()) + len(groups)
    heights = [max(bars(op) for op in ops[i * ncols:(i + 1) * ncols]) * bar_in + 1.0 for i in range(nrows)]
    # constrained layout makes room for every case label and the legend; the width stays fixed
    fig = plt.figure(figsize=(PLOT_WIDTH_IN, sum(heights) + 1.0), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols, height_ratios=heights)
    drawn: Dict[str, List[str]] = {}
    any_floor = any_unstable = False
    for i, op in enumerate(ops):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        groups = panels.get(op, {})
        y, ticks, labels = 0.0, [], []
        for label, g in groups.items():
            eager = g.get("eager")
            shown = [p for p in providers if p in g]
            top = y
            for p in shown:
                ratio = _speedup(eager, g[p]) if eager else None
                if ratio is None:
                    continue
                bad = bool(g[p].get("unstable") or eager.get("unstable"))   # the ratio involves both
                any_unstable |= bad
                ax.barh(y, ratio, height=0.85, color=colors[p], alpha=0.35 if bad else 1.0,
                        hatch="///" if bad else None, edgecolor="black" if bad else "none", linewidth=0.5)
                xf = g[p].get("x_floor")
                text = f"{ratio:.2f}" + (f" · {100 / xf:.0f}% floor" if _number(xf) and xf > 0 else "") + \
                    (" unstable" if bad else "")
                ax.annotate(text, (ratio, y), xytext=(3 if ratio >= 1 else -3, 0), textcoords="offset points",
                            ha="left" if ratio >= 1 else "right", va="center", fontsize=7)
                y += 1
            if eager and _number(eager.get("floor_ms")) and eager["floor_ms"] > 0:
                ax.plot([eager["ms"] / eager["floor_ms"]], [(top + y - 1) / 2], marker="D", color="black", ms=5)
                any_floor = True
            if y == top:                  # nothing to compare with eager: keep the label, say so
                ax.annotate("no eager row" if not eager else "only eager ran", (1.0, y), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=7, color="dimgrey")
                y += 1
            ticks.append((top + y - 1) / 2)
            labels.append(label)
            y += 1                        # a gap between groups
        drawn[op] = labels
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=9)
        ax.set_ylim(y - 0.5, -1)
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.3)
        ax.grid(axis="x", color="0.9", lw=0.6)
        ax.set_axisbelow(True)
        ax.set_title(op, fontsize=11, loc="left", fontweight="bold")
        ax.set_xlabel("speed-up vs eager (log; > 1: faster than eager)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    handles = [Patch(color=colors[p], label=p) for p in providers]
    if any_unstable:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="unstable (not a speed)"))
    if any_floor:
        handles.append(matplotlib.lines.Line2D([], [], marker="D", color="black", lw=0, label="floor"))
    fig.legend(handles=handles, loc="outside upper left", ncol=max(1, min(len(handles), 7)), fontsize=9, frameon=False,
               title=textwrap.fill(header(result), 200), title_fontsize=8, alignment="left")
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return drawn


def _speedup(eager: Dict, row: Optional[Dict]) -> Optional[float]:
    """eager's ms over ``row``'s, or None where either is missing."""
    if row is None or not _number(row.get("ms")) or not _number(eager.get("ms")) or not row["ms"] > 0:
        return None
    return eager["ms"] / row["ms"]


def json_safe(obj):
    """``obj`` with NaN and infinities replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, then rename it over ``path``: a
    reader (or a kill mid-write) sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path: str, obj) -> None:
    """Valid JSON (NaN/inf written as null; anything else unserialisable fails here, before the
    file is touched), written atomically."""
    write_text(path, json.dumps(json_safe(obj), indent=1, default=str, allow_nan=False) + "\n")


REPORTS = {"json": "results.json", "summary": "summary.md", "full": "results_full.md", "png": "results.png"}


def write_all(result: Dict, out_dir: str, png: bool = True) -> Dict[str, str]:
    """``results.json``, ``summary.md``, ``results_full.md`` and (``png``) ``results.png`` in
    ``out_dir``, each replaced atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, name) for k, name in REPORTS.items()}
    write_json(paths["json"], result)
    write_text(paths["summary"], summary_markdown(result))
    write_text(paths["full"], markdown(result))
    if png:
        atomic_write(paths["png"], lambda tmp: plot(result, tmp))
    return paths
