"""Terminal table (rich), JSON, Markdown and a PNG plot of one benchmark run."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable, Dict, List, Optional

COLUMNS = [("op", "op"), ("case", "case"), ("mode", "mode"), ("dtype", "dtype"), ("provider", "provider"),
           ("ms", "ms"), ("spread", "p20-p80 ms"), ("kernel_ms", "kernel ms"), ("loop_ms", "loop ms"),
           ("host_bound", "host-bound"), ("floor_ms", "floor ms"), ("x_floor", "x floor"),
           ("x_floor_save_inputs", "x floor save-inputs"), ("gb_s", "GB/s"),
           ("tflop_s", "TFLOP/s"), ("peak_mb", "peak MB"), ("vs_eager", "vs eager"), ("vs_compile", "vs compile"),
           ("vs_sdpa", "vs sdpa"), ("vs_cublas_premade", "vs cuBLAS premade"),
           ("vs_cublas_premade_aligned", "vs cuBLAS aligned"), ("vs_cublas_gemms", "vs cuBLAS GEMMs"),
           ("vs_cublas_gemms_aligned", "vs cuBLAS GEMMs aligned"), ("vs_best", "vs best baseline"),
           ("math", "runs as")]
_NAMES = 5  # op, case, mode, dtype, provider


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(key, v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if key in ("ms", "floor_ms", "kernel_ms", "loop_ms"):
        return f"{v:.4f}"
    if key == "host_bound":
        return "yes" if v else "no"
    if key.startswith("x_floor") or key.startswith("vs_"):
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _math(r: Dict) -> str:
    dts = r.get("math_dtypes")
    text = "+".join(dts) if isinstance(dts, list) else (dts or "")
    if r.get("sdpa_backend"):
        text += f", sdpa {r['sdpa_backend']}"
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


def header(result: Dict) -> str:
    m = result["machine"]
    if m["name"] == "cpu":
        text = ("Device: CPU. GPU numbers need a GPU: these are CPU timings of small sizes (no floors); "
                f"torch {m['torch']}.")
    else:
        rates = ", ".join(f"{k[6:]} {v / 1e12:.0f} TFLOP/s" for k, v in m["matmul_flop_per_s"].items() if _number(v))
        text = (f"Device: {m['name']}; HBM copy bandwidth {m['hbm_bytes_per_s'] / 1e12:.2f} TB/s, read "
                f"{m.get('hbm_read_bytes_per_s', float('nan')) / 1e12:.2f} TB/s; matmul {rates}; "
                f"torch {m['torch']}, triton {m.get('triton', '-')}.")
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


def print_table(result: Dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    cols, rows, notes = _layout(result)
    table = Table(title=header(result), title_justify="left")
    for _, title in cols:
        table.add_column(title, justify="left" if title in ("op", "case", "mode", "dtype", "provider", "runs as")
                         else "right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)
    for i, n in enumerate(notes, 1):
        console.print(f"[{i}] {n}", markup=False)
    if provenance_line(result):
        console.print(provenance_line(result), markup=False)


def markdown(result: Dict) -> str:
    cols, rows, notes = _layout(result)
    lines = [header(result), "", provenance_line(result), "",
             "| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: str) -> None:
    """Two panels over the same groups (case, mode, dtype): above, grouped bars of median ms on a
    log axis, the floor dashed, p20-p80 as error bars; below, each provider's speed-up against
    eager (eager's ms / its ms, log axis, 1 = as fast as eager, each bar labelled with its ratio).
    Group labels are slanted under the lower panel only and the legend sits outside the axes, so
    nothing overlaps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = {}
    for r in result["rows"]:
        if not r.get("error") and _number(r.get("ms")):
            groups.setdefault(f"{r['op']} {r['case']}\n{r['mode']} {r['dtype']}", {})[r["provider"]] = r
    providers = sorted({p for g in groups.values() for p in g}, key=lambda p: (p != "eager", p))
    fig, (ax, sx) = plt.subplots(2, 1, sharex=True, figsize=(max(8, 1.2 * len(groups) + 3), 9),
                                 gridspec_kw=dict(height_ratios=(3, 2)))
    width = 0.8 / max(1, len(providers))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    for i, p in enumerate(providers):
        xs = [j + i * width for j, g in enumerate(groups.values()) if p in g]
        rs = [g[p] for g in groups.values() if p in g]
        ys = [r["ms"] for r in rs]
        err = [[max(0.0, r["ms"] - r.get("p20_ms", r["ms"])) for r in rs],
               [max(0.0, r.get("p80_ms", r["ms"]) - r["ms"]) for r in rs]]
        ax.bar(xs, ys, width, label=p, color=colors[p], yerr=err, capsize=1.5, error_kw=dict(lw=0.6))
    for j, g in enumerate(groups.values()):
        floor = next(iter(g.values()))["floor_ms"]
        if _number(floor):
            ax.hlines(floor, j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dashed",
                      label="floor" if j == 0 else None)
        eager = g.get("eager")
        if eager is None:
            continue
        for i, p in enumerate(providers):
            ratio = _speedup(eager, g.get(p))
            if ratio is None or p == "eager":
                continue
            x = j + i * width
            sx.bar(x, ratio, width, color=colors[p])
            sx.annotate(f"{ratio:.2f}", (x, ratio), xytext=(0, 2 if ratio >= 1 else -2), textcoords="offset points",
                        ha="center", va="bottom" if ratio >= 1 else "top", fontsize=5.5, rotation=90)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale; bars p20-p80)")
    ax.set_title(header(result)[:120], fontsize=7, loc="left")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    sx.axhline(1.0, color="black", lw=0.8)
    sx.set_yscale("log")
    ticker = matplotlib.ticker
    sx.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    sx.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    sx.yaxis.set_minor_formatter(ticker.NullFormatter())
    sx.margins(y=0.25)
    sx.set_ylabel("speed-up vs eager (x, log scale)\n> 1: faster than eager")
    sx.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    sx.set_xticklabels(list(groups), fontsize=6.5, rotation=35, ha="right", rotation_mode="anchor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def write_all(result: Dict, out_dir: str, png: bool = True) -> Dict[str, str]:
    """``results.json``, ``results.md`` and (``png``) ``results.png`` in ``out_dir``, each replaced
    atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "md", "png")}
    write_json(paths["json"], result)
    write_text(paths["md"], markdown(result))
    if png:
        atomic_write(paths["png"], lambda tmp: plot(result, tmp))
    return paths
