"""The GPU check (benchmarks/gpu_check.sh, mmkernels.gpucheck): its dry run on the CPU walks every
default step through the same code as on a GPU, the budget skips what cannot fit, a broken step
fails the run without stopping the others, results become RESULTS.md rows and the dispatch table,
and the prebuilt CUDA library is loaded only when it matches the sources."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mmkernels.cuda as ext
from mmkernels.gpucheck import DEFAULT_STEPS, OPS, STARTUP_S, STEPS, estimate
from mmkernels.gpucheck import record
from mmkernels.gpucheck.correct import CASES, FOLDER
from mmkernels.gpucheck.steps import FIXED_TILES, HEADLINE

ROOT = Path(__file__).resolve().parent.parent


def _check(tmp_path, *args, env=None, timeout=600):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, "OUT": str(out),
                                                "GPU_CHECK_DRY": "1", **(env or {})})
    return proc, out / "gpu-check"


def _load(path):
    return json.loads(Path(path).read_text())


@pytest.mark.slow
def test_dry_run_walks_every_default_step(tmp_path):
    proc, out = _check(tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    steps = _load(out / "steps.json")
    assert [s["step"] for s in steps["steps"]] == DEFAULT_STEPS
    assert all(s["status"] == "ok" for s in steps["steps"]), steps
    # correct: one line per op x backend x dtype (the interpreter skips bf16), all within tolerance
    lines = _load(out / "correct.json")["lines"]
    expected = sum(len(backends) * 3 - (1 if "triton" in backends else 0) for backends, _ in CASES.values())
    assert len(lines) == expected and all(r["ok"] and r["max_rel_err"] < 1e-2 for r in lines)
    assert {(r["op"], r["backend"]) for r in lines} >= {("attention_pool_varlen", "cuda"), ("concat_linear", "triton"),
                                                       ("latent_pool", "triton"), ("tensor_fusion", "triton"),
                                                       ("low_rank_fusion", "triton")}
    # headline: the harness's results with provenance, every op, no provider error, complete
    res = _load(out / "headline" / "results.json")
    assert res["complete"] and res["provenance"]["command"].startswith("bash benchmarks/gpu_check.sh headline")
    assert {r["op"] for r in res["rows"]} == set(OPS) == set(HEADLINE)
    assert not [r for r in res["rows"] if r["error"]]
    assert {r["provider"] for r in res["rows"] if r["op"] == "attention_pool"} >= {"triton", "cuda", "eager", "sdpa"}
    assert "cuda" not in {r["provider"] for r in res["rows"] if r["op"] == "concat_linear"}
    assert {r["provider"] for r in res["rows"] if r["op"] == "latent_pool"} == {"triton", "eager"}
    # LMF's reference backend and TFN's and concat_linear's torch backend too (the table may choose
    # them); and what users get where the table's verdict is hand-set (TFN, concat_linear) or its
    # Triton path lost to eager (GatedFusion)
    assert {r["provider"] for r in res["rows"] if r["op"] == "low_rank_fusion"} == {"triton", "eager", "reference"}
    assert {r["provider"] for r in res["rows"] if r["op"] == "tensor_fusion"} == {"triton", "eager", "torch", "auto"}
    assert "torch" in {r["provider"] for r in res["rows"] if r["op"] == "concat_linear"}
    for op in ("concat_linear", "gated_fusion"):
        assert "auto" in {r["provider"] for r in res["rows"] if r["op"] == op}
    # tuned: only the ops that have an autotune space
    tuned = _load(out / "tuned" / "results.json")
    assert {r["op"] for r in tuned["rows"]} == set(HEADLINE) - set(FIXED_TILES)
    # the summary comes last
    tail = proc.stdout.strip().splitlines()
    at = max(i for i, ln in enumerate(tail) if ln.startswith("==== GPU check summary"))
    assert not [ln for ln in tail[at:] if ln.startswith(("== ", "   "))]   # no step header or output after it
    assert sum(ln.startswith("  latent_pool ") for ln in tail[at:]) == 2    # its headline rows, fwd and fwd+bwd
    assert any(ln.startswith("correct: ") and ln.split()[1] == f"{expected}/{expected}" for ln in tail)


@pytest.mark.slow
def test_a_broken_step_fails_the_run_and_the_later_steps_still_run(tmp_path):
    # the CUDA backend turned off: env and correct's cuda lines break, headline still runs
    proc, out = _check(tmp_path, "correct", "headline", "--only", "gated_sum", env={"MMKERNELS_CUDA": "0"})
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    steps = {s["step"]: s for s in _load(out / "steps.json")["steps"]}
    assert steps["env"]["status"] == "failed" and steps["correct"]["status"] == "failed"
    assert steps["headline"]["status"] == "failed"                 # its cuda rows have the reason
    res = _load(out / "headline" / "results.json")
    assert res["complete"] and all(r["error"] is None for r in res["rows"] if r["provider"] != "cuda")
    assert all("MMKERNELS_CUDA=0" in r["error"] for r in res["rows"] if r["provider"] == "cuda")
    lines = _load(out / "correct.json")["lines"]
    assert [r["ok"] for r in lines if r["backend"] == "triton"] == [True, True]
    cuda = [r for r in lines if r["backend"] == "cuda"]
    assert len(cuda) == 3 and not any(r["ok"] for r in cuda)
    assert "MMKERNELS_CUDA=0" in cuda[0]["problems"][0]
    assert "FAIL gated_sum cuda fp32" in proc.stdout.split("==== GPU check summary")[-1]


def test_every_op_is_checked_and_benchmarked():
    """Each op of the check has correctness cases (a representative and an odd shape, plus the
    shapes only a kernel candidate takes), headline
    cases that its bench.py defines, and its CLI name; the newer ops come after the older ones."""
    from mmkernels.ops import OPS as OP_FOLDERS, bench_specs
    assert set(OPS) == set(OP_FOLDERS) | {"gated_fusion"}
    assert {FOLDER.get(op, op) for op in CASES} == set(OPS)
    assert all(set(shapes) >= {"rep", "odd"} for _, shapes in CASES.values())
    # each kernel candidate's shape class is checked (the tournament's correctness gate)
    assert "short" in CASES["attention_pool"][1]
    assert list(HEADLINE) == list(OPS)
    specs = bench_specs()
    for op, (names, providers, _) in HEADLINE.items():
        assert all(specs[op].case(n) for n in names)
        assert set(providers) <= set(specs[op].providers), op
    newer = ["latent_pool", "tensor_fusion", "low_rank_fusion"]
    assert list(CASES)[-3:] == newer and list(HEADLINE)[-3:] == newer


def test_only_scales_the_per_op_steps_estimates():
    assert estimate("headline", False) == STEPS["headline"].gpu_s
    one = estimate("headline", False, ["norm_concat"])
    assert one == STARTUP_S + (STEPS["headline"].gpu_s - STARTUP_S) / len(OPS)
    assert estimate("headline", False, ["norm_concat", "gated_sum"]) - STARTUP_S == pytest.approx(2 * (one - STARTUP_S))
    assert estimate("env", False, ["norm_concat"]) == STEPS["env"].gpu_s       # not a per-op step
    assert estimate("headline", False, ["unknown"]) == STEPS["headline"].gpu_s


def test_the_budget_skips_a_step_that_cannot_fit(tmp_path):
    # env fits (its limit: what is left, up to 4x its estimate), and correct's estimate (every op)
    # cannot fit in what env leaves of a budget of that estimate, however quick env is
    budget = estimate("correct", True)
    assert budget > 2 * STEPS["env"].dry_s
    proc, out = _check(tmp_path, "correct", "--budget", str(budget))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    steps = {s["step"]: s for s in _load(out / "steps.json")["steps"]}
    assert steps["env"]["status"] == "ok"
    assert steps["correct"]["status"] == "skipped" and "budget left" in steps["correct"]["note"]
    assert not (out / "correct.json").exists()
    assert "correct    skipped" in proc.stdout


def _results(tmp_path):
    prov = dict(date="2026-12-02T10:00:00+00:00", commit="0123456789abcdef", dirty=False,
                command="bash benchmarks/gpu_check.sh headline", gpu="NVIDIA H200")

    def row(op, case, mode, provider, ms, x_floor=None, peak_mb=None):
        return dict(op=op, case=case, mode=mode, dtype="bfloat16", provider=provider, ms=ms, x_floor=x_floor,
                    peak_mb=peak_mb, error=None)
    rows = [row("norm_concat", "b32768_768+1024+512", "fwd", "triton", 0.08, 1.12),
            row("norm_concat", "b32768_768+1024+512", "fwd", "cuda", 0.07, 0.98),
            row("norm_concat", "b32768_768+1024+512", "fwd", "eager", 0.24),
            row("attention_pool", "b512_l576_d1024_h8", "fwd", "triton", 0.2, 1.4),
            row("attention_pool", "b512_l576_d1024_h8", "fwd", "sdpa", 0.3),
            row("tensor_fusion", "tfn_mosi_b1024", "fwd+bwd", "triton", 0.05, 1.25, 21.4),
            row("tensor_fusion", "tfn_mosi_b1024", "fwd+bwd", "eager", 0.4),
            row("latent_pool", "so400m_b256_n729", "fwd", "triton", 0.5, 1.9),
            row("latent_pool", "so400m_b256_n729", "fwd", "eager", 2.0)]
    head = tmp_path / "run" / "headline"
    head.mkdir(parents=True)
    (head / "results.json").write_text(json.dumps(dict(provenance=prov, machine=dict(name="NVIDIA H200"),
                                                       complete=True, rows=rows)))
    comp = tmp_path / "run" / "compile"
    comp.mkdir()
    (comp / "results.json").write_text(json.dumps(dict(provenance=prov, complete=True, rows=[
        row("norm_concat", "b32768_768+1024+512", "fwd", "compile", 0.1)])))
    return tmp_path / "run"


def test_record_writes_results_rows_and_the_dispatch_table(tmp_path):
    run = _results(tmp_path)
    md = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", md)
    table = tmp_path / "table.json"
    assert record.main([str(run), "--results-md", str(md), "--table", str(table)]) == 0
    text = md.read_text()
    nc = text.split("## norm_concat")[1].split("## ")[0]
    assert "not yet measured" not in nc
    assert ("| 2026-12-02 | NVIDIA H200 | 0123456 | `bash benchmarks/gpu_check.sh headline` | b32768_768+1024+512 "
            "| fwd | 0.0800 | 1.12x | 3.00x | 1.25x |") in nc
    ap = text.split("## attention_pool")[1].split("## ")[0]
    assert "| b512_l576_d1024_h8 | fwd | 0.2000 | 1.40x | n/a | n/a | 1.50x |" in ap
    tf = text.split("## tensor_fusion and low_rank_fusion")[1].split("## ")[0]
    assert "not yet measured" not in tf
    assert "| tfn_mosi_b1024 | fwd+bwd | 0.0500 | 1.25x | 8.00x | n/a | 21 |" in tf
    lp = text.split("## latent_pool")[1].split("## ")[0]
    assert "| so400m_b256_n729 | fwd | 0.5000 | 1.90x | 4.00x | n/a |" in lp
    cu = text.split("## CUDA C++ backend")[1].split("## ")[0]
    assert "| norm_concat | b32768_768+1024+512 | fwd | 0.0800 | 0.0700 | 0.98x | 1.14x |" in cu
    # no cuda row measured there (RESULTS.md's own rows from earlier runs stay as they were)
    assert not any("b512_l576" in ln and "0123456" in ln for ln in cu.splitlines())
    assert "not yet measured" in text.split("## End-to-end model")[1]   # untouched section
    assert json.loads(table.read_text())["ops"] == {"norm_concat": {"NVIDIA H200": "cuda"}}


def test_record_writes_the_per_call_steps_host_rows(tmp_path):
    run = _results(tmp_path)
    head = run / "headline" / "results.json"
    res = json.loads(head.read_text())
    res["provenance"]["sm"] = "9.0"
    head.write_text(json.dumps(res))
    (run / "per_call").mkdir()
    us = {"eager": 60.0, "auto": 40.0, "triton@jit": 90.0, "triton@unplanned": 55.0, "triton@prepared": 30.0,
          "triton@static": 24.0}
    (run / "per_call" / "results.json").write_text(json.dumps(dict(rows=[
        dict(op="gated_sum", case="tiny_b8_m3_h32_feature", mode="fwd", plain="eager", us=us)])))
    md = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", md)
    launch = tmp_path / "launch.json"
    assert record.main([str(run), "--results-md", str(md), "--table", str(tmp_path / "t.json"),
                        "--launch-table", str(launch)]) == 0
    # the launch mode whose host time was lowest, for this GPU and its chip class
    written = json.loads(launch.read_text())
    assert written["modes"] == {"NVIDIA H200": "static", "class:hopper": "static"}
    assert written["evidence"]["NVIDIA H200"]["jit_over_prepared"] == 3.0
    host = md.read_text().split("## Host time per call")[1].split("\n## ")[0]
    assert "not yet measured" not in host
    assert ("| 2026-12-02 | NVIDIA H200 | 0123456 | `bash benchmarks/gpu_check.sh per_call` | gated_sum "
            "| tiny_b8_m3_h32_feature | fwd | eager | 60.0 | 40.0 | 90.0 | 55.0 | 30.0 | 24.0 | n/a | 0.40x |") in host


def test_record_names_the_commit_that_ran_when_told(tmp_path):
    # the GPU machine's copy carries the session's starting git metadata: a later commit's run reads
    # as the older commit "with uncommitted changes"; --commit puts the right one in the rows
    run = _results(tmp_path)
    res = json.loads((run / "headline" / "results.json").read_text())
    res["provenance"].update(commit="92f9909aaaa", dirty=True)
    (run / "headline" / "results.json").write_text(json.dumps(res))
    md = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", md)
    assert record.main([str(run), "--results-md", str(md), "--table", str(tmp_path / "t.json"),
                        "--commit", "0a268a951bd7"]) == 0
    rows = [ln for ln in md.read_text().splitlines() if "2026-12-02" in ln]
    assert rows and all("| 0a268a9 |" in ln and "dirty" not in ln and "92f9909" not in ln for ln in rows)


def test_record_merges_into_the_dispatch_table(tmp_path):
    # a run that timed some ops keeps the other ops' measured verdicts
    run = _results(tmp_path)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"ops": {"gated_sum": {"NVIDIA H200": "cuda"}, "norm_concat": {"NVIDIA H100": "triton"}},
                                 "evidence": {"gated_sum": {"NVIDIA H200": {"cuda_over_triton": 0.4, "rows": 4}},
                                              "norm_concat": {"NVIDIA H100": {"cuda_over_triton": 1.2, "rows": 2}}}}))
    md = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", md)
    assert record.main([str(run), "--results-md", str(md), "--table", str(table)]) == 0
    ops = json.loads(table.read_text())["ops"]
    assert ops == {"gated_sum": {"NVIDIA H200": "cuda"},
                   "norm_concat": {"NVIDIA H100": "triton", "NVIDIA H200": "cuda"}}


def test_record_refuses_an_incomplete_run(tmp_path):
    run = _results(tmp_path)
    res = json.loads((run / "headline" / "results.json").read_text())
    (run / "headline" / "results.json").write_text(json.dumps(dict(res, complete=False, in_progress="x")))
    md = tmp_path / "RESULTS.md"
    md.write_text("unchanged\n")
    assert record.main([str(run), "--results-md", str(md), "--table", str(tmp_path / "t.json")]) == 1
    assert md.read_text() == "unchanged\n" and not (tmp_path / "t.json").exists()


# --- the prebuilt CUDA library -----------------------------------------------------------------------

def _fake_prebuilt(folder, **manifest):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ext.PREBUILT_LIBRARY).write_bytes(b"not a library")
    src = ext.csrc_dir()
    m = dict(sources_hash=ext.sources_hash(src), torch=__import__("torch").__version__, archs="9.0")
    m.update(manifest)
    (folder / ext.PREBUILT_MANIFEST).write_text(json.dumps(m))
    return folder


def test_a_stale_or_missing_prebuilt_library_is_never_loaded(tmp_path, monkeypatch):
    lib, why = ext.prebuilt_library(tmp_path / "nothing")
    assert lib is None and "no prebuilt library" in why and "build --out" in why
    lib, why = ext.prebuilt_library(_fake_prebuilt(tmp_path / "stale", sources_hash="0" * 64))
    assert lib is None and "stale" in why and "built from other sources" in why
    lib, why = ext.prebuilt_library(_fake_prebuilt(tmp_path / "torch", torch="2.0.0"))
    assert lib is None and "torch 2.0.0" in why
    good = _fake_prebuilt(tmp_path / "good")
    assert ext.prebuilt_library(good) == (good / ext.PREBUILT_LIBRARY, "")
    # the loader reads only the manifest before loading: stale -> not loaded, reason kept
    monkeypatch.setenv(ext.PREBUILT_VAR, str(tmp_path / "stale"))
    loaded = []
    monkeypatch.setattr(ext.builder.torch.ops, "load_library", lambda p: loaded.append(p))
    monkeypatch.setattr(ext.builder, "_info", {})
    assert ext.builder._load_prebuilt() is None and not loaded
    assert "stale" in ext.library_info()["prebuilt"]
    # a matching one that refuses to load: the reason says so, the caller moves on
    monkeypatch.setenv(ext.PREBUILT_VAR, str(good))
    monkeypatch.setattr(ext.builder.torch.ops, "load_library", lambda p: (_ for _ in ()).throw(OSError("bad ELF")))
    assert ext.builder._load_prebuilt() is None
    assert "refused to load: OSError: bad ELF" in ext.library_info()["prebuilt"]


LOAD_PREBUILT = """
import sys, torch
torch.ops.load_library(sys.argv[1] + "/library.so")
import mmkernels.cuda as ext
print(" ".join(ext.registered_ops()))
"""


@pytest.mark.slow
def test_build_out_is_for_sm90_unless_told(tmp_path, monkeypatch):
    from mmkernels.cuda import __main__ as cli
    from mmkernels.cuda import builder
    seen = []
    monkeypatch.setattr(builder, "build", lambda verbose=False, out=None: seen.append(builder.arch_list()) or
                        Path(out or tmp_path) / "library.so")
    for given, want in ((None, "9.0"), ("8.0;9.0", "8.0;9.0")):
        if given is None:
            monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        else:
            monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
        assert cli.main(["build", "--out", str(tmp_path / "prebuilt")]) == 0
        assert seen[-1] == want


def test_build_out_writes_a_prebuilt_library_that_loads_without_a_gpu(tmp_path):
    # built for the default JIT architectures, so the build that tests/test_cuda.py makes (or
    # this one) serves both: the folder's build turn makes the later one reuse it
    out = tmp_path / "prebuilt"
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": ext.builder.DEFAULT_ARCHS}
    proc = subprocess.run([sys.executable, "-m", "mmkernels.cuda", "build", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["archs"] == ext.builder.DEFAULT_ARCHS
    assert manifest["sources_hash"] == ext.sources_hash(ext.csrc_dir())
    # a fresh process: plain torch.ops.load_library registers every cuda_* op (no GPU needed)
    proc = subprocess.run([sys.executable, "-c", LOAD_PREBUILT, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["cuda_attention_pool_bwd", "cuda_attention_pool_fwd", "cuda_attention_pool_smem",
                                   "cuda_gated_sum_bwd", "cuda_gated_sum_fwd", "cuda_norm_concat_bwd",
                                   "cuda_norm_concat_fwd"]
    # and the loader takes it from $MMKERNELS_CUDA_PREBUILT
    proc = subprocess.run([sys.executable, "-m", "mmkernels.cuda", "status"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), ext.PREBUILT_VAR: str(out)})
    assert proc.returncode == 0 and f"loaded from prebuilt: {out / 'library.so'}" in proc.stdout, proc.stdout


def test_a_carried_triton_cache_is_pointed_at_its_new_place(tmp_path, monkeypatch):
    """Triton's cache groups hold absolute paths: the check rewrites them to where the cache now is,
    keeping only what a cache hit reads when asked."""
    from mmkernels.gpucheck import relocate_triton_cache
    entry = tmp_path / "cache" / "KEY"
    entry.mkdir(parents=True)
    for name in ("_k.cubin", "_k.json", "_k.ptx"):
        (entry / name).write_text("x")
    old = {name: f"/elsewhere/triton-cache/KEY/{name}" for name in ("_k.cubin", "_k.json", "_k.ptx")}
    (entry / "__grp___k.json").write_text(json.dumps({"child_paths": old}))
    assert relocate_triton_cache(tmp_path / "cache", keep={".cubin", ".json"}) == 1
    group = json.loads((entry / "__grp___k.json").read_text())["child_paths"]
    assert group == {"_k.cubin": str(entry / "_k.cubin"), "_k.json": str(entry / "_k.json")}
    import triton
    from triton.runtime.cache import FileCacheManager
    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path / "cache"))
    assert FileCacheManager("KEY").get_group("_k.json") == group   # what triton.compile looks up
