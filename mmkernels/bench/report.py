"""Terminal table (rich), JSON, Markdown and a PNG plot of one benchmark run."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List

COLUMNS = [("op", "op"), ("case", "case"), ("mode", "mode"), ("dtype", "dtype"), ("provider", "provider"),
           ("ms", "ms"), ("floor_ms", "floor ms"), ("x_floor", "x floor"), ("gb_s", "GB/s"),
           ("tflop_s", "TFLOP/s"), ("peak_mb", "peak MB"), ("vs_eager", "vs eager"), ("vs_compile", "vs compile"),
           ("vs_sdpa", "vs sdpa"), ("vs_cublas_premade", "vs cuBLAS premade"),
           ("vs_cublas_gemms", "vs cuBLAS GEMMs"), ("vs_best", "vs best baseline")]


def _fmt(key, v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in ("ms", "floor_ms"):
        return f"{v:.4f}"
    if key == "x_floor" or key.startswith("vs_"):
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _layout(result: Dict):
    """Columns that hold a value somewhere, each row's cells, and the footnoted reasons of the
    providers that could not run."""
    notes: List[str] = []
    cells = []
    for r in result["rows"]:
        row = {k: _fmt(k, r.get(k)) for k, _ in COLUMNS}
        if r.get("error"):
            if r["error"] not in notes:
                notes.append(r["error"])
            row = {k: (v if i < 5 else "") for i, (k, v) in enumerate(row.items())}
            row["ms"] = f"n/a [{notes.index(r['error']) + 1}]"
        cells.append(row)
    cols = [(k, t) for k, t in COLUMNS if any(c[k] not in ("-", "") for c in cells)]
    return cols, [[c[k] for k, _ in cols] for c in cells], notes


def header(result: Dict) -> str:
    m = result["machine"]
    if m["name"] == "cpu":
        return ("Device: CPU. GPU numbers need a GPU: these are CPU timings of small sizes (no floors); "
                f"torch {m['torch']}.")
    rates = ", ".join(f"{k[6:]} {v / 1e12:.0f} TFLOP/s" for k, v in m["matmul_flop_per_s"].items())
    return (f"Device: {m['name']}; HBM copy bandwidth {m['hbm_bytes_per_s'] / 1e12:.2f} TB/s; matmul {rates}; "
            f"torch {m['torch']}, triton {m.get('triton', '-')}.")


def print_table(result: Dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    cols, rows, notes = _layout(result)
    table = Table(title=header(result), title_justify="left")
    for _, title in cols:
        table.add_column(title, justify="left" if title in ("op", "case", "mode", "dtype", "provider") else "right")
    for cells in rows:
        table.add_row(*cells)
    console.print(table)
    for i, n in enumerate(notes, 1):
        console.print(f"[{i}] {n}", markup=False)


def markdown(result: Dict) -> str:
    cols, rows, notes = _layout(result)
    lines = [header(result), "", "| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in result["rows"]:
        if not r.get("error"):
            groups.setdefault(f"{r['case']}\n{r['mode']} {r['dtype']}", {})[r["provider"]] = r
    providers = sorted({p for g in groups.values() for p in g})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j, g in enumerate(groups.values()) if p in g]
        ys = [g[p]["ms"] for g in groups.values() if p in g]
        ax.bar(xs, ys, width, label=p)
    for j, g in enumerate(groups.values()):
        floor = next(iter(g.values()))["floor_ms"]
        if floor == floor:
            ax.hlines(floor, j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="dashed",
                      label="floor" if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(list(groups), fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_title(header(result)[:110], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(result: Dict, out_dir: str, png: bool = True) -> Dict[str, str]:
    """``results.json``, ``results.md`` and (``png``) ``results.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    if png:
        plot(result, paths["png"])
    return paths
