"""The benchmark harness runs end to end on a CPU and writes its summary, full table, JSON and PNG;
what it times is what it says (the providers of a case in interleaved rounds, small cases in one
thread, a row whose rounds disagree measured again and marked unstable if it still does, fresh
static compile per case, plain baselines in the input dtype, the SDPA kernel and auto's backend
recorded, one floor definition), and its files carry their provenance, say when a run was cut off,
and are never half-written. How the reports read: tests/test_bench_report.py."""
import dataclasses
import json
import os
import subprocess

import pytest
import torch

from mmkernels.bench import cli, report, runner
from mmkernels.bench.spec import SAVE_INPUTS, CompileError, compiled_provider
from mmkernels.ops import bench_specs

CPU = torch.device("cpu")

pytestmark = pytest.mark.slow


def test_cli_on_cpu_writes_every_report(tmp_path, capsys, monkeypatch):
    import rich.progress
    bar = []   # what the progress bar showed: (cases done, total, the current case)
    update = rich.progress.Progress.update

    def spy(self, task, **kw):
        update(self, task, **kw)
        t = self._tasks[task]
        bar.append((t.completed, t.total, t.description))
    monkeypatch.setattr(rich.progress.Progress, "update", spy)
    assert cli.main(["--op", "norm_concat", "--case", "cpu_b512_300+64", "--provider", "eager", "--provider", "auto",
                     "--provider", "cuda", "--mode", "fwd", "--mode", "bwd", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    assert bar == [(0, 2, "norm_concat cpu_b512_300+64 fwd float32"), (1, 2, "norm_concat cpu_b512_300+64 bwd float32"),
                   (2, 2, "done")]
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    summary = (tmp_path / "summary.md").read_text()
    # the terminal output starts with summary.md's first line (folded at 120 columns)
    head = report.header(result)
    assert summary.splitlines()[0] == head and "GPU numbers need a GPU" in head
    assert " ".join(out.split()).startswith(" ".join(head.split()))
    *report_lines, wrote = out.splitlines()
    assert max(map(len, report_lines)) <= 120
    assert wrote == f"wrote summary.md, results_full.md, results.json, results.png in {tmp_path}"
    rows = {(r["provider"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(p, m) for p in ("eager", "auto", "cuda") for m in ("fwd", "bwd")}
    assert rows[("auto", "fwd")]["backend"] == "torch"        # what auto ran: the CPU path
    eager = rows[("eager", "fwd")]
    assert eager["ms"] > 0 and eager["error"] is None
    assert eager["p20_ms"] <= eager["ms"] <= eager["p80_ms"]               # the spread is stored
    assert eager["kernel_ms"] is None and "CPU" in eager["kernel_timer"]   # no device timer, and why
    assert eager["math_dtypes"] == ["fp32"]
    assert rows[("eager", "bwd")]["bytes"] > rows[("eager", "fwd")]["bytes"]
    assert "cannot run" in rows[("cuda", "fwd")]["error"]  # the reason is kept, not hidden
    md = (tmp_path / "results_full.md").read_text()
    assert "| norm_concat | cpu_b512_300+64 | fwd |" in md
    assert "| kernel ms |" in md and "p20-p80 ms" in md and "n/a [" in md and "no device timer" in md
    assert "| norm_concat | cpu_b512_300+64 | fwd | torch |" in summary                  # op, case, pass, auto runs
    assert "Skipped (could not run here): cuda (needs CUDA tensors, got cpu)" in summary
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert result["complete"] is True and result["provenance"]["command"].endswith(str(tmp_path))


def test_every_op_has_a_bench_spec_with_the_standard_providers():
    from mmkernels.ops import OPS
    specs = bench_specs()
    assert set(OPS) <= set(specs)  # plus whole-layer specs (gated_fusion)
    for spec in specs.values():
        assert {"eager", "compile", "triton", "cuda"} <= set(spec.providers)
        assert any("quick" in c.tags for c in spec.cases) and any("cpu" in c.tags for c in spec.cases)


def test_unknown_case_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--case", "nope", "--device", "cpu"])
    assert "--case: unknown" in capsys.readouterr().err


@pytest.mark.parametrize("op", sorted(bench_specs()))
def test_every_provider_runs_the_cpu_cases(op):
    # Triton providers run under the interpreter here and must run; only the cuda provider may
    # refuse CPU tensors (BackendError). Outputs and gradients of every provider that computes the
    # op (not a bound) match eager's. torch.compile is left to the compile tests (minutes of
    # inductor on this machine).
    import torch

    from mmkernels import BackendError
    from mmkernels.bench.runner import _callable
    spec = bench_specs()[op]
    for case in [c for c in spec.cases if "cpu" in c.tags]:
        inputs = spec.make_inputs(case, torch.float32, torch.device("cpu"))
        results = {}
        for name, provider in spec.providers.items():
            if name == "compile":
                continue
            try:
                out = _callable(provider, [inputs], "fwd")()
                grads = _callable(provider, [inputs], "fwd+bwd")()
            except BackendError:
                assert name.startswith("cuda"), f"{op} {case.name}: provider {name} refused CPU tensors"
                continue
            assert any(g is not None for g in grads), (op, case.name, name)
            results[name] = (out, grads)
        assert set(spec.providers) - {"compile", "cuda", "cuda_varlen"} <= set(results), (op, case.name, sorted(results))
        want_out, want_grads = results["eager"]
        for name, (out, grads) in results.items():
            if name in spec.bounds:  # times a bound (e.g. the GEMM alone), computes something else
                continue
            msg = f"{op} {case.name} {name}"
            torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4, msg=msg)
            for g, w in zip(grads, want_grads):
                if g is not None and w is not None:
                    torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=msg + " grad")


class _Cut(Exception):
    pass


def test_a_cut_off_run_is_marked_incomplete_and_keeps_the_cases_it_measured(tmp_path):
    # the reports are rewritten before every (case, mode, dtype); a run killed while measuring its
    # second keeps the first one's rows, says it is incomplete and names what it was measuring
    spec = bench_specs()["norm_concat"]
    calls = []

    def on_rows(partial):
        report.write_all(partial, str(tmp_path), png=False)
        calls.append(len(partial["rows"]))
        assert all("vs_eager" in r for r in partial["rows"])  # derived columns present
        if len(calls) == 2:
            raise _Cut  # the kill: nothing after this point runs
    with pytest.raises(_Cut):
        runner.run([spec], lambda c: c.name == "cpu_b512_300+64", {"eager", "auto"}, ["fwd", "fwd+bwd"],
                   [torch.float32], CPU, on_rows=on_rows)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["complete"] is False
    assert [(r["provider"], r["mode"]) for r in result["rows"]] == [("eager", "fwd"), ("auto", "fwd")]
    assert all(r["ms"] > 0 for r in result["rows"])
    assert result["in_progress"] == "norm_concat cpu_b512_300+64 fwd+bwd float32"
    for name in ("summary.md", "results_full.md"):
        assert (tmp_path / name).read_text().startswith("INCOMPLETE RUN"), name
    assert "| norm_concat | cpu_b512_300+64 | fwd | float32 | eager |" in (tmp_path / "results_full.md").read_text()


def test_a_finished_run_is_marked_complete(tmp_path):
    spec = bench_specs()["norm_concat"]
    seen = []
    result = runner.run([spec], lambda c: c.name == "cpu_b512_300+64", {"eager"}, ["fwd", "fwd+bwd"],
                        [torch.float32], CPU, on_rows=lambda partial: seen.append(partial["complete"]))
    assert seen == [False, False, True] and result["complete"] is True and len(result["rows"]) == 2
    assert not report.markdown(result).startswith("INCOMPLETE")


def test_a_case_that_cannot_be_counted_gives_error_rows_and_the_run_goes_on(monkeypatch):
    # a case built from a library the machine lacks (open_clip on the GPU machine) must cost its own
    # rows only, not the step
    spec = bench_specs()["norm_concat"]
    cases = [c.name for c in spec.cases if "cpu" in c.tags][:2]
    real = spec.traffic

    def traffic(case, dtype):
        if case.name == cases[0]:
            raise ModuleNotFoundError("No module named 'missing_lib'")
        return real(case, dtype)
    monkeypatch.setattr(spec, "traffic", traffic)
    result = runner.run([spec], lambda c: c.name in cases, {"eager"}, ["fwd"], [torch.float32], CPU)
    assert result["complete"] is True
    by_case = {r["case"]: r for r in result["rows"]}
    assert by_case[cases[0]]["error"] == "ModuleNotFoundError: No module named 'missing_lib'"
    assert by_case[cases[1]]["error"] is None and by_case[cases[1]]["ms"] > 0
    assert "| norm_concat | " + cases[0] in report.markdown(result)


def test_results_carry_their_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKERNELS_AUTOTUNE", "0")
    argv = ["mmkernels-bench", "--op", "gated_sum", "--out", str(tmp_path)]
    result = runner.run([bench_specs()["gated_sum"]], lambda c: c.name == "cpu_b512_m2_h64_modality", {"eager"},
                        ["fwd"], [torch.float32], CPU, argv=argv)
    report.write_all(result, str(tmp_path), png=False)
    p = json.loads((tmp_path / "results.json").read_text())["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
    assert p["commit"] == head and len(head) == 40 and isinstance(p["dirty"], bool)
    assert p["command"] == " ".join(argv)
    assert p["date"].startswith("20") and p["date"].endswith("+00:00")
    assert p["torch"] == torch.__version__ and p["triton"] and "cuda" in p
    assert p["autotune"]["MMKERNELS_AUTOTUNE"] == "0" and isinstance(p["autotune"]["on"], bool)
    for key in ("python", "device", "allow_tf32", "backend_env"):
        assert key in p, key
    md = (tmp_path / "results_full.md").read_text()
    assert f"commit {head}" in (tmp_path / "summary.md").read_text()
    assert f"commit {head}" in md and "MMKERNELS_AUTOTUNE=0" in md and "mmkernels-bench --op gated_sum" in md


def test_results_json_is_valid_json_and_written_atomically(tmp_path, monkeypatch):
    first = dict(machine=dict(name="cpu", torch="x"), complete=True, rows=[dict(
        op="o", case="c", mode="fwd", dtype="float32", provider="eager", ms=1.0, floor_ms=float("nan"),
        x_floor=float("inf"), error=None)])
    report.write_all(first, str(tmp_path), png=False)
    text = (tmp_path / "results.json").read_text()

    def strict(const):  # NaN / Infinity are not JSON
        raise ValueError(const)
    row = json.loads(text, parse_constant=strict)["rows"][0]
    assert row["floor_ms"] is None and row["x_floor"] is None and row["ms"] == 1.0

    second = dict(first, rows=first["rows"] * 2, complete=False)

    def killed(src, dst):  # the process dies after writing the new file, before it replaces the old
        raise KeyboardInterrupt
    monkeypatch.setattr(report.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write_all(second, str(tmp_path), png=False)
    assert (tmp_path / "results.json").read_text() == text           # the old file, whole
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results_full.md", "summary.md"]   # no temporary left
    monkeypatch.undo()
    report.write_all(second, str(tmp_path), png=False)
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 2


def test_the_dispatch_table_reads_results_json(tmp_path):
    from mmkernels import cuda as ext
    rows = [dict(op="gated_sum", case="a", mode="fwd", dtype="bfloat16", provider=p, ms=ms, error=None)
            for p, ms in (("cuda", 1.0), ("triton", 2.0))]
    rows.append(dict(op="gated_sum", case="b", mode="fwd", dtype="bfloat16", provider="cuda", ms=float("nan"),
                     error="BackendError: x"))
    machine = dict(name="GPU X", torch="x", hbm_bytes_per_s=4e12, hbm_read_bytes_per_s=4.5e12,
                   matmul_flop_per_s={"torch.bfloat16": 7e14})
    report.write_all(dict(machine=machine, complete=True, rows=rows), str(tmp_path), png=False)
    table = ext.make_table([json.loads((tmp_path / "results.json").read_text())])
    assert table["ops"] == {"gated_sum": {"GPU X": "cuda"}} and table["evidence"]["gated_sum"]["GPU X"]["rows"] == 1


# --- what is timed ---------------------------------------------------------------------------------

def _with(spec, **changes):
    return dataclasses.replace(spec, **changes)


def test_compile_baseline_is_fresh_and_static_for_every_case():
    # two cases in one run: each (case, mode, dtype) is timed through one graph compiled for its own
    # static shapes. Reusing the first case's compiled function makes dynamo compile a second
    # (dynamic or re-specialised) graph, which the provider refuses (the row fails), so this test fails.
    base = bench_specs()["norm_concat"]
    compiled = compiled_provider(base.providers["compile"].fn, backend="eager")   # dynamo only: fast
    spec = _with(base, providers={"compile": compiled})
    graphs = []
    two = lambda c: c.name.startswith("cpu_")  # noqa: E731  (the two CPU-sized cases)
    result = runner.run([spec], two, {"compile"}, ["fwd"], [torch.float32], CPU,
                        on_rows=lambda partial: graphs.append(list(compiled.graphs)))
    assert [r["error"] for r in result["rows"]] == [None, None]
    cases = [c for c in spec.cases if two(c)]
    assert len(graphs) == 3 and len(graphs[1]) == 1 and len(graphs[2]) == 1   # one graph per case
    for case, (gm,) in zip(cases, graphs[1:]):
        shapes = [tuple(n.meta["example_value"].shape) for n in gm.graph.nodes if n.op == "placeholder"
                  and isinstance(n.meta.get("example_value"), torch.Tensor)]
        want = {(*case.params["lead"], d) for d in case.params["dims"]}
        assert want <= set(shapes), (case.name, shapes)
        assert all(isinstance(s, int) for shape in shapes for s in shape), shapes   # static, no SymInt


def test_compile_baseline_refuses_a_recompile():
    f = compiled_provider(lambda x: x.sin() * 2, backend="eager")
    f(torch.ones(4))
    f(torch.ones(4))                              # same shape: the same graph
    with pytest.raises(CompileError, match="recompiled"):
        f(torch.ones(5))                          # would silently time a second graph
    f.fresh()
    f(torch.ones(5))


@pytest.mark.parametrize("op", sorted(bench_specs()))
def test_every_compile_baseline_is_one_static_graph(op):
    # fullgraph=True, dynamic=False, forward and backward, on the CPU cases (dynamo only: fast)
    from mmkernels.bench.runner import _callable
    spec = bench_specs()[op]
    assert isinstance(spec.providers["compile"], compiled_provider)
    for case in [c for c in spec.cases if "cpu" in c.tags]:
        for mode in ("fwd", "fwd+bwd"):
            f = compiled_provider(spec.providers["compile"].fn, backend="eager")
            run = _callable(f, [spec.make_inputs(case, torch.float32, CPU)], mode)
            run()
            run()
            assert len(f.graphs) == 1, (case.name, mode)


def test_attention_pool_baselines_are_plain_and_record_dtype_and_sdpa_backend(monkeypatch):
    import torch.nn.functional as F

    from mmkernels.ops.attention_pool import bench as ap
    from mmkernels.ops.attention_pool.reference import attention_pool_ref
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    result = runner.run([ap.SPEC], lambda c: c.name.startswith("cpu_"), {"eager", "sdpa"}, ["fwd"], [torch.bfloat16],
                        CPU)
    rows = {(r["case"], r["provider"]): r for r in result["rows"]}
    for case in ("cpu_b32_l64_d256_h4", "cpu_varlen_b32_l64_d128_h2"):
        eager, sd = rows[(case, "eager")], rows[(case, "sdpa")]
        assert eager["error"] is None and sd["error"] is None
        assert eager["math_dtypes"] == ["bf16"], eager["math_dtypes"]      # no fp32 copy of x
        assert sd["math_dtypes"][0] == "bf16" and sd["sdpa_backend"] in ("cpu flash", "cpu math")
        assert "vs_sdpa" in eager
    assert masks and masks[0] is None and not any(m is None for m in masks[-3:])  # a mask only when padded
    # the robust reference upcasts, and the recorder sees it (so the assertion above can fail)
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    q = torch.randn(1, 1, 2, 8, dtype=torch.bfloat16)
    assert "fp32" in runner.describe(lambda a, b: attention_pool_ref(a, b)[0], (x, q), grad=False)["math_dtypes"]
    # the padded case's eager matches the reference on valid rows
    inputs = ap.make_inputs(ap.SPEC.case("cpu_varlen_b32_l64_d128_h2"), torch.float32, CPU)
    x, query, lengths = inputs.args[:3]
    torch.testing.assert_close(ap._eager(*inputs.args), attention_pool_ref(x, query[None], lengths)[0])


def test_one_floor_definition_for_every_op():
    for op, spec in bench_specs().items():
        for case in spec.cases:
            t = spec.traffic(case, torch.bfloat16)
            fwd, bwd, both, save = t["fwd"], t["bwd"], t["fwd+bwd"], t[SAVE_INPUTS]
            assert save.read == fwd.read + bwd.read and save.written == fwd.written + bwd.written, (op, case.name)
            assert max(fwd.total, bwd.total) <= both.total < save.total, (op, case.name)
    # norm_concat: x, y, dy, dx once each (4 activation tensors), not x twice
    nc = bench_specs()["norm_concat"]
    case = nc.case("b32768_768+1024+512")
    act = 32768 * 2304 * 2
    assert nc.traffic(case, torch.bfloat16)["fwd+bwd"].total == 4 * act + 4 * 2304 * 2
    # gated_sum M=3 feature gates: the save-inputs floor is 20/14 of the fwd+bwd floor (RESULTS.md)
    gs = bench_specs()["gated_sum"]
    t = gs.traffic(gs.case("b16384_m3_h1024_feature"), torch.bfloat16)
    assert t[SAVE_INPUTS].total * 14 == t["fwd+bwd"].total * 20


def test_floor_uses_the_read_stream_for_reads():
    from mmkernels.bench.timing import host_bound, memory_seconds
    copy, read = 3e12, 4e12
    assert memory_seconds(1e9, 1e9, copy, read) == pytest.approx(2e9 / copy)     # a copy: the copy rate
    assert memory_seconds(1e9, 0, copy, read) == pytest.approx(1e9 / read)       # reads only: the read rate
    assert host_bound(0.12, 0.1) is True and host_bound(0.105, 0.1) is False and host_bound(None, 0.1) is None


def test_cublas_bounds_also_run_on_the_aligned_problem():
    from mmkernels.bench.spec import Case
    from mmkernels.ops.concat_linear import bench as cl
    case = Case("t", dict(rows=64, dims=(96, 30), n=24, act=None))
    inputs = cl.make_inputs(case, torch.float32, CPU)
    premade, padded = inputs.args[3], inputs.args[5]
    assert premade.shape[-1] == 126 and padded[0].shape[-1] == 128 and padded[1].shape[-1] == 128
    assert padded[0].stride(0) * 4 % 16 == 0
    torch.testing.assert_close(cl._premade_aligned(*inputs.args), cl._premade(*inputs.args))
    assert "cublas_premade_aligned" in cl.SPEC.bounds and "cublas_gemms_aligned" in bench_specs()["gated_fusion"].bounds


def test_cli_without_the_bench_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from mmkernels.bench import cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a))
    assert cli.main(["--op", "norm_concat"]) == 2
    assert "pip install 'mmkernels[bench]' (missing: rich)" in capsys.readouterr().err


def test_per_call_script_prints_a_row_per_case(monkeypatch, capsys):
    """benchmarks/per_call.py (the README's CPU per-call and CPU-case tables): one row per case, auto
    against the fastest plain provider, ratios and differences consistent with the times."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "per_call.py"
    spec = importlib.util.spec_from_file_location("per_call", path)
    per_call = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(per_call)
    monkeypatch.setattr(per_call, "ROUNDS", 1)
    assert per_call.main(["gated_sum", "attention_pool"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("gated_sum", "tiny_b8_m3_h32_feature", "eager"),
                                                  ("attention_pool", "tiny_b4_l16_d64_h4", "sdpa")]
    for r in rows:
        for plain, auto, ratio, diff in (r[3:7], r[7:11]):
            assert float(plain) > 0 and float(auto) > 0
            assert abs(float(auto) / float(plain) - float(ratio)) < 0.01
            assert abs(float(auto) - float(plain) - float(diff)) < 1e-2
    # --provider: another provider against plain (the direct path through a named backend); ops
    # without it are left out
    assert per_call.main(["concat_linear", "gated_sum", "--provider", "reference"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "fwd refere" in out[0]
    assert [ln.split()[:2] for ln in out[1:]] == [["concat_linear", "tiny_b8_64+32+48_n16_gelu"]]


def test_per_call_synchronises_each_round_and_gives_the_gpu_checks_host_rows(tmp_path):
    """On a GPU every round ends with a synchronise (a stream of calls, not their launches); the
    GPU check's ``per_call`` step gives, per tiny case and mode, the plain providers and every
    backend that can run the case (triton under each launch mode) in µs, and writes them as JSON."""
    import importlib.util
    import json
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    spec = importlib.util.spec_from_file_location("per_call", root / "per_call.py")
    per_call = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(per_call)
    calls, syncs = [], []
    best = per_call._best_ms({"a": lambda: calls.append(1)}, 3, sync=lambda: syncs.append(len(calls)))
    assert best["a"] > 0 and len(syncs) == 2 + 3 and syncs[-1] == len(calls)   # calibration, then each round
    rows = per_call.host_rows(device="cpu", rounds=1, ops=["gated_sum", "norm_concat"])
    assert {(r["op"], r["case"]) for r in rows} == {("gated_sum", "tiny_b8_m3_h32_feature"),
                                                   ("norm_concat", "tiny_b8_64+32+48")}
    for r in rows:
        assert r["mode"] in ("fwd", "fwd+bwd") and r["plain"] in per_call.PLAIN
        assert r["us"][r["plain"]] > 0 and r["us"]["auto"] > 0
        # here the triton provider runs under the interpreter (CPU tensors, named): each launch mode
        # is a row of its own, and prepared launches without call plans; the cuda backend runs on the
        # emulator or is left out
        assert {"triton@jit", "triton@prepared", "triton@static", "triton@unplanned"} <= set(r["us"])
    out = tmp_path / "pc.json"
    assert per_call.main(["gated_sum", "--backends", "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["op"] for r in data["rows"]] == ["gated_sum", "gated_sum"] and data["launch_protocol"] == "ok"
    assert "call_plans" in data


@pytest.mark.slow
def test_gpu_call_path_scripts_run_on_a_cpu():
    """benchmarks/host_path.py and launch_cost.py (the GPU call path timed on a CPU, launches ending
    in no-ops): each prints its rows, prepared launches and Triton's own path side by side."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "benchmarks/host_path.py", "gated_sum", "--rounds", "1"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:]]
    assert [r[:3] for r in rows] == [["gated_sum", "tiny_b8_m3_h32_feature", "fwd"],
                                     ["gated_sum", "tiny_b8_m3_h32_feature", "fwd+bwd"]]
    assert all(float(v) > 0 for r in rows for v in r[3:6])
    proc = subprocess.run([sys.executable, "benchmarks/launch_cost.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 3 and "gated_sum fwd kernel" in proc.stdout


# --- numbers a reader can trust on a CPU -----------------------------------------------------------

def _stalls_every_third_call(fn, seconds=0.02):
    """``fn``, except that every 3rd call also sleeps ``seconds`` (a provider that stalls now and then)."""
    import itertools
    import time
    count = itertools.count(1)

    def stalls(*args):
        if next(count) % 3 == 0:
            time.sleep(seconds)
        return fn(*args)
    return stalls


def test_a_provider_that_stalls_now_and_then_is_marked_unstable_not_reported_as_a_speed(tmp_path):
    from rich.console import Console
    base = bench_specs()["norm_concat"]
    spec = _with(base, providers={"eager": base.providers["eager"],
                                  "stalls": _stalls_every_third_call(base.providers["eager"])})
    result = runner.run([spec], lambda c: c.name == "cpu_b512_300+64", {"eager", "stalls"}, ["fwd"], [torch.float32],
                        CPU)
    rows = {r["provider"]: r for r in result["rows"]}
    stalls, eager = rows["stalls"], rows["eager"]
    assert stalls["remeasured"] is True                        # measured again before it is marked
    assert "disagree" in stalls["unstable"] and stalls["error"] is None
    assert eager["unstable"] is None and eager["remeasured"] is False     # the steady provider beside it
    assert result["unstable"] == 1
    # every report says so: the JSON row (above and on disk), the first line of summary.md and of the
    # terminal output, the summary's row, the full table's row, the plot's bar
    paths = report.write_all(result, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["unstable"] == stalls["unstable"]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("UNSTABLE ROWS: 1 of 2 rows")
    (line,) = [ln for ln in summary.splitlines() if ln.startswith("| norm_concat |")]
    cells = [c.strip() for c in line.strip("| ").split("|")]
    assert cells[3] == "stalls*" and cells[4].endswith("!") and cells[-1] == "unstable"   # its ms marked
    (full,) = [ln for ln in (tmp_path / "results_full.md").read_text().splitlines() if "| stalls |" in ln]
    assert f"UNSTABLE: {stalls['unstable']}" in full
    console = Console(record=True, width=120, file=open(os.devnull, "w"))
    report.print_table(result, console)
    text = console.export_text()
    assert text.startswith("UNSTABLE ROWS: 1 of 2 rows")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("cpu_b512_300+64")]
    assert line.split()[2] == "stalls*" and line.split()[3].endswith("!") and line.split()[-1] == "unstable"
    assert paths["png"].endswith("results.png")


def test_providers_of_a_case_take_turns_round_by_round(monkeypatch):
    # after each provider's warm-up calls, every round times each provider once, each round starting
    # one provider further along (so a disturbance falls on some rounds of every provider)
    from mmkernels.bench import timing
    monkeypatch.setattr(timing, "ROUND_S", 0.001)
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "ABC"}
    got = timing.time_rounds(fns, CPU)
    runs = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert runs[:3] == ["A", "B", "C"] and log[:3 * timing.WARMUP_CALLS] == [n for n in "ABC" for _ in range(5)]
    assert runs[3:] == list("ABC" "BCA" "CAB" "ABC" "BCA")[:3 * timing.ROUNDS["cpu"]]
    for t in got.values():
        assert len(t.rounds) == timing.ROUNDS["cpu"] and t.calls >= timing.MIN_CALLS * timing.ROUNDS["cpu"]
        assert t.p20 <= t.ms <= t.p80


def test_rounds_that_disagree_make_a_row_unstable():
    from mmkernels.bench.timing import assess
    steady = assess([[1e-3] * 10, [1.1e-3] * 10, [1.05e-3] * 10])
    assert steady.unstable is None and steady.ms == pytest.approx(1.05) and steady.spread == pytest.approx(1.1)
    busy_round = assess([[1e-3] * 10] * 4 + [[3e-3] * 10])        # one round 3x slower throughout
    assert busy_round.unstable == "rounds disagree 3.0x" and busy_round.ms == pytest.approx(1.0)
    stalls = assess([[1e-3, 1e-3, 20e-3] * 4] * 5)                  # every 3rd call stalls: rounds agree
    assert stalls.spread == pytest.approx(1.0) and stalls.unstable.startswith("calls disagree (p80 ")


def test_small_cases_run_in_one_thread_and_the_thread_count_is_restored(monkeypatch):
    from mmkernels.bench import timing
    seen = []
    base = bench_specs()["gated_sum"]

    def eager(*args):
        from torch._inductor import config
        seen.append((torch.get_num_threads(), config.cpp.threads))
        return base.providers["eager"](*args)
    spec = _with(base, providers={"eager": eager})
    case = "cpu_b512_m2_h64_modality"
    before = torch.get_num_threads()
    result = runner.run([spec], lambda c: c.name == case, {"eager"}, ["fwd"], [torch.float32], CPU)
    assert result["rows"][0]["threads"] == 1 and set(seen) == {(1, 1)}   # torch's and inductor's C++ kernels'
    assert torch.get_num_threads() == before
    # every case a default CPU run times is small
    for s in bench_specs().values():
        for c in s.cases:
            if "cpu" in c.tags:
                assert timing.small_work(s.traffic(c, torch.float32)["fwd"].total, s.flops(c, "fwd")), (s.op, c.name)
    monkeypatch.setattr(timing, "SMALL_BYTES", 0)   # the same case counted as large: every thread
    seen.clear()
    result = runner.run([spec], lambda c: c.name == case, {"eager"}, ["fwd"], [torch.float32], CPU)
    assert result["rows"][0]["threads"] == before and {n for n, _ in seen} == {before}


def test_the_gpu_timer_is_do_bench_once_per_provider_as_before_rounds(monkeypatch):
    # on CUDA a round is one time_stats (triton's do_bench) per provider and there is one round: the
    # figures are do_bench's, unchanged
    from mmkernels.bench import timing
    calls = []

    def do_bench_stats(fn, device):
        calls.append(fn)
        return timing.Timing(2.0, 1.5, 2.5)
    monkeypatch.setattr(timing, "time_stats", do_bench_stats)
    a, b = (lambda: None), (lambda: None)
    got = timing.time_rounds({"a": a, "b": b}, torch.device("cuda"))
    assert calls == [a, b]
    assert [(t.ms, t.p20, t.p80, t.rounds, t.unstable) for t in got.values()] == [(2.0, 1.5, 2.5, [2.0], None)] * 2


def test_the_backend_auto_ran_is_recorded():
    from mmkernels.bench.spec import backend_provider
    from mmkernels.ops.gated_sum import gated_sum
    spec = bench_specs()["gated_sum"]
    args = spec.make_inputs(spec.case("tiny_b8_m3_h32_feature"), torch.float32, CPU).args
    assert runner.chosen_backends(backend_provider(gated_sum, "auto"), args, grad=False) == "torch"   # the CPU path
    assert runner.chosen_backends(backend_provider(gated_sum, "reference"), args, grad=True) == "reference"
    assert runner.chosen_backends(spec.providers["eager"], args, grad=False) == ""                  # no mmkernels op
    gf = bench_specs()["gated_fusion"]    # a layer of two ops, both on their CPU path
    args = gf.make_inputs(gf.case("tiny_b8_32+16_h16_feature"), torch.float32, CPU).args
    assert runner.chosen_backends(gf.providers["auto"], args, grad=True) == "torch"


def test_calls_that_wait_more_than_they_run_make_a_row_unstable():
    # in one thread the calling thread's CPU time is the work's: a row whose calls took more than
    # 2x that on the wall clock (the machine busy all through its rounds) is not a speed
    import time

    from mmkernels.bench import timing
    from mmkernels.bench.timing import assess
    assert assess([[3e-3] * 10] * 5, cpu=[1e-3] * 50).unstable == "waited (wall 3.0x CPU time)"
    assert assess([[1.2e-3] * 10] * 5, cpu=[1e-3] * 50).unstable is None
    sleeps = lambda: time.sleep(0.002)     # noqa: E731  (runs next to nothing, waits 2 ms)
    with timing.threads(1):
        (t,) = timing.time_rounds({"sleeps": sleeps}, CPU).values()
    assert t.unstable.startswith("waited (wall ") and t.cpu_ms < t.ms / 2
