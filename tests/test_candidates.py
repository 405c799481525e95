"""Kernel design candidates (mmkernels.candidates) and the GPU check's tournament: a kernel
launches the forced candidate, else the tournament's winner for its GPU model, else its chip
class's, else the slot's default; a candidate that fails the reference check never wins; the
tournament's dry run walks every candidate and ``record`` makes its winner the GPU's default."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels import candidates, runtime
from mmkernels.gpucheck import record, tournament

ROOT = Path(__file__).resolve().parent.parent
SLOT = "gated_sum.bwd"


@pytest.fixture
def gpus(monkeypatch, tmp_path):
    """A fake candidates table and GPU identities: index 0 an H200, 1 an H100, 2 an A100."""
    table = tmp_path / "candidates.json"
    monkeypatch.setattr(candidates, "TABLE", str(table))
    names = {0: ("NVIDIA H200", (9, 0)), 1: ("NVIDIA H100 80GB HBM3", (9, 0)), 2: ("NVIDIA A100-SXM4-80GB", (8, 0))}
    monkeypatch.setattr(runtime, "_gpu_identity", names.__getitem__)
    candidates.reset()
    yield table
    candidates.reset()


def test_every_slot_has_a_default_and_distinct_candidates():
    assert SLOT in candidates.SLOTS
    for slot, names in candidates.SLOTS.items():
        assert len(names) >= 2 and len(set(names)) == len(names), slot
        assert slot.split(".")[0] in set(mmkernels.ops.OPS) | {"gated_fusion"}   # the layer of several ops too
    assert set(tournament.SLOTS) == set(candidates.SLOTS)   # every slot has tournament cases


def test_choice_forced_then_model_then_class_then_default(gpus):
    gpus.write_text(json.dumps({"winners": {"class:hopper": {SLOT: "unrolled"}, "NVIDIA H200": {SLOT: "padded"}}}))
    cuda = lambda i: torch.device("cuda", i)  # noqa: E731
    assert candidates.choice(SLOT, cuda(0)) == "padded"       # its model's winner
    assert candidates.choice(SLOT, cuda(1)) == "unrolled"     # its chip class's
    assert candidates.choice(SLOT, cuda(2)) == "padded"       # nothing measured: the default
    assert candidates.choice(SLOT, torch.device("cpu")) == "padded"
    with candidates.use(SLOT, "unrolled"):
        assert candidates.choice(SLOT, cuda(0)) == "unrolled"
        assert candidates.choice(SLOT, torch.device("cpu")) == "unrolled"
    assert candidates.choice(SLOT, cuda(0)) == "padded"       # restored


def test_a_table_naming_an_unknown_candidate_is_ignored(gpus):
    gpus.write_text(json.dumps({"winners": {"NVIDIA H200": {SLOT: "gone", "no.slot": "x"}}}))
    assert candidates.choice(SLOT, torch.device("cuda", 0)) == candidates.SLOTS[SLOT][0]


def test_a_missing_or_broken_table_gives_the_default(gpus):
    assert candidates.choice(SLOT, torch.device("cuda", 0)) == candidates.SLOTS[SLOT][0]
    gpus.write_text("{not json")
    candidates.reset()
    assert candidates.choice(SLOT, torch.device("cuda", 0)) == candidates.SLOTS[SLOT][0]


def test_bad_names_raise_one_clear_error():
    with pytest.raises(ValueError, match="expected one of padded, unrolled, got 'fast'"):
        candidates.force(SLOT, "fast")
    with pytest.raises(ValueError, match="candidate slot: expected one of"):
        with candidates.use("gated_sum.fwd", "padded"):
            pass
    with pytest.raises(ValueError, match="MMKERNELS_CANDIDATES: expected 'op.pass=candidate"):
        candidates._parse("gated_sum.bwd")
    assert candidates._parse(" gated_sum.bwd = unrolled ,") == {"gated_sum.bwd": "unrolled"}
    with pytest.raises(ValueError, match="distinct names"):
        candidates.declare("x.y", ("a", "a"))


def test_the_environment_forces_a_candidate_and_is_checked_at_import():
    import subprocess
    import sys
    code = "import mmkernels, torch; from mmkernels import candidates; print(candidates.choice('gated_sum.bwd', torch.device('cpu')))"
    env = dict(__import__("os").environ, MMKERNELS_CANDIDATES="gated_sum.bwd=unrolled")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "unrolled", done.stderr[-2000:]
    env["MMKERNELS_CANDIDATES"] = "norm_concat.fwd=x"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no such slot 'norm_concat.fwd'" in done.stderr


def _entry(**cands):
    return dict(mode="bwd", candidates={name: dict(correct=ok, rows=[dict(case=c, kernel_ms=t, ms=t) for c, t in times.items()])
                                        for name, (ok, times) in cands.items()})


def test_the_winner_is_correct_and_fastest_by_geometric_mean():
    assert tournament.winner(_entry(padded=(True, {"a": 1.0, "b": 4.0}), unrolled=(True, {"a": 1.5, "b": 2.0}))) == "unrolled"
    # faster but wrong: never wins
    assert tournament.winner(_entry(padded=(True, {"a": 1.0}), unrolled=(False, {"a": 0.1}))) == "padded"
    # a tie keeps the default; nothing correct: no winner
    assert tournament.winner(_entry(padded=(True, {"a": 1.0}), unrolled=(True, {"a": 1.0}))) == "padded"
    assert tournament.winner(_entry(padded=(False, {"a": 1.0}), unrolled=(False, {"a": 1.0}))) is None
    # only cases every correct candidate timed count (a case one could not run says nothing)
    assert tournament.winner(_entry(padded=(True, {"a": 1.0, "b": None}), unrolled=(True, {"a": 2.0, "b": 0.1}))) == "padded"


@pytest.mark.slow
def test_the_dry_tournament_checks_and_times_every_candidate_and_record_makes_the_winner_the_default(tmp_path, gpus):
    written = {}
    result = tournament.step(tmp_path, [], torch.device("cpu"), True, lambda r: written.update(r))
    assert set(result["slots"]) == set(candidates.SLOTS)
    entry = result["slots"][SLOT]
    assert result["ok"] and written["slots"][SLOT]["winner"] == entry["winner"]
    assert list(entry["candidates"]) == list(candidates.SLOTS[SLOT])
    for slot, e in result["slots"].items():
        assert list(e["candidates"]) == list(candidates.SLOTS[slot])
        for name, c in e["candidates"].items():
            assert c["correct"] and len(c["checks"]) == 2, (slot, name, c["checks"])   # fp32, fp16 on the interpreter
            assert [r["case"] for r in c["rows"]] == ["dry_small", "dry_ragged"]
            assert all(r["ms"] > 0 and not r["error"] for r in c["rows"])
    assert not candidates._forced                                           # nothing left forced
    # record: a tournament-only run writes its rows and the winner for the GPU and its chip class
    result["provenance"].update(gpu="NVIDIA H200", sm="9.0", commit="0123456789", dirty=False, date="2026-12-06T00:00")
    entry["winner"] = "unrolled"
    run = tmp_path / "run"
    run.mkdir()
    (run / "tournament.json").write_text(json.dumps(result))
    md = tmp_path / "RESULTS.md"
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", md)
    assert record.main([str(run), "--results-md", str(md), "--candidates-table", str(gpus)]) == 0
    table = json.loads(gpus.read_text())
    assert set(table["winners"]) == {"NVIDIA H200", "class:hopper"}
    assert all(w == {slot: e["winner"] for slot, e in result["slots"].items()} for w in table["winners"].values())
    assert table["winners"]["NVIDIA H200"][SLOT] == "unrolled"
    section = md.read_text().split(tournament.SECTION)[1]
    assert "not yet measured" not in section
    assert "| 2026-12-06 | NVIDIA H200 | 0123456 | `bash benchmarks/gpu_check.sh tournament` | gated_sum.bwd | unrolled " \
           "| dry_small | bwd |" in section
    assert section.count("| yes |") >= 2                                   # correct, and the winner's rows
    candidates.reset()
    assert candidates.choice(SLOT, torch.device("cuda", 1)) == "unrolled"  # another Hopper GPU takes it


def test_the_gpu_check_summary_names_each_slots_candidates_and_winner(tmp_path, capsys):
    # only the end of a GPU run's output comes back: the summary carries the tournament's verdict
    from mmkernels.gpucheck import summary
    (tmp_path / "steps.json").write_text(json.dumps(dict(budget_s=400, dry=True, only=[], command=[], steps=[
        dict(step="tournament", status="ok", estimate_s=75, wall_s=10)])))
    (tmp_path / "tournament.json").write_text(json.dumps(dict(ok=True, slots={SLOT: dict(winner="padded", candidates={
        "padded": dict(correct=True, rows=[dict(case="a", kernel_ms=0.2, ms=0.3), dict(case="b", kernel_ms=0.8)]),
        "unrolled": dict(correct=False, rows=[dict(case="a", kernel_ms=0.1)])})})))
    assert summary.print_summary(tmp_path) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tournament gated_sum.bwd")]
    assert line == ["tournament gated_sum.bwd (geomean ms of its cases): padded ok 0.4000; unrolled WRONG 0.1000 "
                    "-> winner padded"]
