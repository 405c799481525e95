"""How a benchmark run reads: ``summary.md`` (one row per op, case and pass: what auto runs, its ms
and x floor, the best baseline and the speedups), the same table in the terminal within 120
columns and in the GPU check's summary, and ``results.png`` (a panel per op, at most 1600 px
wide, every case labelled). Built from made-up results: nothing here is timed."""
import io
import json
import struct

import pytest

from mmkernels.bench import report

NAN = float("nan")
CPU = dict(name="cpu", torch="2.x")
GPU = dict(name="NVIDIA H100", torch="2.x", triton="3.x", hbm_bytes_per_s=3e12, hbm_read_bytes_per_s=3.3e12,
           matmul_flop_per_s={"torch.bfloat16": 7e14})
OPS = {"attention_pool": dict(baselines=["eager", "compile", "sdpa"], bounds=[]),
       "concat_linear": dict(baselines=["eager", "compile", "cublas_premade", "cublas_premade_aligned"],
                             bounds=["cublas_premade", "cublas_premade_aligned"]),
       "gated_sum": dict(baselines=["eager", "compile"], bounds=[])}
NOT_HERE = "BackendError: mmkernels.gated_sum: backend 'cuda' cannot run these inputs: needs CUDA tensors, got cpu"


def row(op, case, provider, ms, mode="fwd", dtype="bfloat16", floor=NAN, **extra):
    r = dict(op=op, case=case, mode=mode, dtype=dtype, provider=provider, ms=ms, p20_ms=ms, p80_ms=ms,
             floor_ms=floor, x_floor=ms / floor if floor == floor else NAN, error=None, unstable=None)
    r.update(extra)
    return r


def result(rows, machine=CPU, ops=OPS):
    return dict(machine=machine, ops=ops, complete=True, rows=rows)


def test_summary_rows_say_what_auto_runs_against_the_best_baseline_eager_and_compile():
    rows = [row("attention_pool", "b512", p, ms, floor=0.5) for p, ms in
            (("eager", 4.0), ("compile", 2.0), ("sdpa", 1.5), ("triton", 1.0))]
    rows.append(row("attention_pool", "b512", "auto", 1.0, floor=0.5, backend="triton"))
    rows += [row("concat_linear", "b32768", p, ms) for p, ms in
             (("eager", 3.0), ("compile", 2.5), ("cublas_premade", 1.2), ("cublas_premade_aligned", 1.1),
              ("auto", 2.2))]
    rows += [row("gated_sum", "b16384", p, ms) for p, ms in (("eager", 1.0), ("compile", 0.8), ("triton", 0.4),
                                                             ("cuda", 0.5))]
    rows.append(row("gated_sum", "b16384", "auto", NAN, error=NOT_HERE))
    att, cl, gs = report.summary_rows(result(rows))
    # auto ran triton; SDPA is the library baseline to beat (it beats compile here)
    assert (att["provider"], att["runs"], att["ms"], att["x_floor"]) == ("auto", "triton", 1.0, 2.0)
    assert att["best"] == "sdpa"
    assert (att["vs_best"], att["vs_eager"], att["vs_compile"]) == (1.5, 4.0, 2.0)
    # concat_linear: the faster cuBLAS bound, even where compile would be slower than auto
    assert cl["best"] == "cublas_premade_aligned" and cl["vs_best"] == pytest.approx(0.5)
    assert cl["runs"] == "auto"   # no backend recorded (an old results.json): the provider's name
    # no auto row that ran (the GPU check's headline times the kernels): the fastest mmkernels provider,
    # said so; no library baseline: the faster of eager and compile
    assert (gs["provider"], gs["auto"], gs["best"], gs["vs_best"]) == ("triton", False, "compile", 2.0)


def test_summary_md_leads_with_the_run_and_leaves_out_empty_columns(tmp_path):
    rows = [row("gated_sum", "cpu_b512", p, ms, dtype="float32", backend="torch" if p == "auto" else None)
            for p, ms in (("eager", 1.0), ("compile", 2.0), ("auto", 0.5))]
    rows.append(row("gated_sum", "cpu_b512", "cuda", NAN, dtype="float32", error=NOT_HERE))
    paths = report.write_all(result(rows), str(tmp_path), png=False)
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[0] == report.header(result(rows)) and lines[0].startswith("Device: CPU")
    # one dtype, no floors on a CPU: no dtype and x floor columns
    assert lines[2] == "| op | case | pass | auto runs | ms | best baseline | vs best | vs eager | vs compile |"
    assert lines[4] == "| gated_sum | cpu_b512 | fwd | torch | 0.5 | eager | 2.00x | 2.00x | 4.00x |"
    assert "Skipped (could not run here): cuda (needs CUDA tensors, got cpu)." in lines
    full = (tmp_path / "results_full.md").read_text()
    assert paths["full"].endswith("results_full.md") and "| gated_sum | cpu_b512 | fwd | float32 | cuda |" in full
    # two dtypes: each its own row, with a dtype column
    both = result(rows + [dict(r, dtype="bfloat16") for r in rows])
    cols, cells, _ = report.summary_table(both)
    assert [k for k, _ in cols][:5] == ["op", "case", "mode", "dtype", "runs"] and len(cells) == 2


def test_the_terminal_table_fits_120_columns_and_has_no_rows_for_providers_that_cannot_run():
    # every op's GPU cases with all their providers (the longest names there are), one row unstable
    from rich.console import Console

    from mmkernels.ops import bench_specs
    rows, ops, groups = [], {}, []
    for op, spec in bench_specs().items():
        ops[op] = dict(baselines=list(spec.baselines), bounds=list(spec.bounds))
        for case in [c for c in spec.cases if not {"cpu", "cpu-large"} & set(c.tags)]:
            for mode in ("fwd", "fwd+bwd"):
                groups.append((case.name, mode))
                for i, p in enumerate(spec.providers):
                    rows.append(row(op, case.name, p, 0.125 * (i + 1), mode=mode, floor=0.0125,
                                    backend="triton" if p in ("auto", "patched") else None,
                                    unstable="rounds disagree 3.1x" if (op, case.name, mode, p) == (
                                        "gated_fusion", "b16384_768+1024+512_h1024_modality_masked", "fwd", "eager")
                                    else None))
                rows.append(row(op, case.name, "cuda_varlen", NAN, mode=mode, error=NOT_HERE))
    out = io.StringIO()
    report.print_table(result(rows, GPU, ops), Console(file=out, width=200))
    text = out.getvalue().splitlines()
    assert max(len(line) for line in text) <= 120
    assert text[0].startswith(f"UNSTABLE ROWS: 1 of {len(rows)} rows")
    for case, mode in groups:   # each on one line, whole
        (line,) = [ln for ln in text if ln.split()[:2] == [case, mode]]
        # eager unstable: the speedup against it marked, and the row; auto's own figures not
        marked = case.startswith("b16384_768") and case.endswith("modality_masked") and mode == "fwd"
        assert (line.split()[-1] == "unstable") == marked and ("x!" in line) == marked, line
        assert not line.split()[3].endswith("!")
    assert len([ln for ln in text if ln.split() and ln.split()[0] in ops]) == len(ops)     # a title per op
    assert not any("cuda_varlen" in line for line in text if line.startswith("b"))       # no row for it
    assert "Skipped (could not run here): cuda_varlen (needs CUDA tensors, got cpu)." in text


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_the_plot_has_a_panel_per_op_fits_a_1600_px_screen_and_labels_every_case(tmp_path, monkeypatch):
    # a run the size of a default CPU one: 8 ops, 72 (case, pass) groups, up to 7 providers
    import matplotlib.figure
    figures = []
    save = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        figures.append(self)
        return save(self, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    rows, want = [], {}
    providers = ("compile", "auto", "triton", "cuda", "torch", "reference", "sdpa")
    for k in range(8):
        op = f"op{k}"
        for c in range(9 if k % 2 else 4):
            for mode in ("fwd", "fwd+bwd"):
                case = f"cpu_b{256 * (c + 1)}_768+1024+512_h{c}"
                want.setdefault(op, []).append(f"{case} {mode}")
                floor = 0.25 if k == 0 else NAN
                rows.append(row(op, case, "eager", 2.0, mode=mode, floor=floor,
                                unstable="calls disagree (p80 3.0x p20)" if (k, c) == (3, 1) else None))
                for j, p in enumerate(providers[:3 + k % 5]):
                    rows.append(row(op, case, p, 0.5 * (j + 1), mode=mode, floor=floor,
                                    unstable="rounds disagree 4.0x" if (k, c, p) == (1, 0, "auto") else None))
                rows.append(row(op, case, "cuda_varlen", NAN, mode=mode, error=NOT_HERE))
    res = result(rows, ops={})
    path = tmp_path / "results.png"
    drawn = report.plot(res, str(path))
    width, height = _png_size(path)
    assert width <= 1600 and height > 0
    assert drawn == want                                      # every (case, pass) of the run, per op
    (fig,) = figures
    panels = {ax.get_title(loc="left"): ax for ax in fig.axes}
    assert set(panels) == set(want)
    for op, ax in panels.items():
        ticks = ax.get_yticklabels()
        assert [t.get_text() for t in ticks] == want[op]
        size_px = ticks[0].get_fontsize() * report.PLOT_DPI / 72
        assert ticks[0].get_fontsize() >= 8
        ys = sorted(ax.transData.transform((1, y))[1] for y in ax.get_yticks())
        assert min(b - a for a, b in zip(ys, ys[1:])) >= 1.5 * size_px      # labels do not touch
        assert ax.get_xscale() == "log" and any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.lines)
    # bars: eager's ms over the provider's; an unstable one pale and hatched (all of a case whose eager
    # row is: every ratio there involves it); the floor where there is one
    op1 = panels["op1"]
    heights = sorted({round(p.get_width(), 6) for p in op1.patches})
    assert heights == [round(2.0 / (0.5 * (j + 1)), 6) for j in range(4)][::-1]
    hatched = [p for p in op1.patches if p.get_hatch()]
    assert len(hatched) == 2 and all(p.get_width() == pytest.approx(2.0) for p in hatched)   # fwd, fwd+bwd
    assert all(p.get_alpha() < 1 for p in hatched) and not any(p.get_hatch() for p in panels["op2"].patches)
    assert len([p for p in panels["op3"].patches if p.get_hatch()]) == 2 * 6     # 2 passes x 6 providers
    assert any(t.get_text().endswith("unstable") for t in op1.texts)
    op0 = panels["op0"]
    assert any(line.get_marker() == "D" and list(line.get_xdata()) == [2.0 / 0.25] for line in op0.lines)
    assert any(t.get_text() == "4.00 · 50% floor" for t in op0.texts)    # auto at 0.5 ms: 2x its 0.25 ms floor


def test_the_gpu_checks_summary_prints_the_same_summary_table(tmp_path, capsys):
    from mmkernels.gpucheck.summary import print_summary
    rows = [row("gated_sum", "b16384_m3_h1024_feature", p, ms, floor=0.1) for p, ms in
            (("triton", 0.2), ("cuda", 0.25), ("eager", 0.9))]
    rows += [row("latent_pool", "so400m_b256_n729", p, ms, mode=m) for p, ms in (("triton", 1.0), ("eager", 2.0))
             for m in ("fwd", "fwd+bwd")]
    res = result(rows, GPU, ops={"gated_sum": OPS["gated_sum"], "latent_pool": OPS["gated_sum"]})
    (tmp_path / "headline").mkdir()
    (tmp_path / "headline" / "results.json").write_text(json.dumps(report.json_safe(res)))
    (tmp_path / "steps.json").write_text(json.dumps(dict(budget_s=900, steps=[dict(step="headline", status="ok")])))
    assert print_summary(tmp_path) == 0
    out = capsys.readouterr().out.splitlines()
    cols, cells, notes = report.summary_table(res)
    table = report.text_table(cols, cells)
    at = out.index(table[0])
    assert out[at:at + len(table)] == table
    assert table[1].startswith("  gated_sum ") and "triton*" in table[1] and "2.00x" in table[1]   # x floor
    assert sum(line.startswith("  latent_pool ") for line in out) == 2
    assert "  * auto was not timed here (or could not run): the fastest mmkernels provider." in out
