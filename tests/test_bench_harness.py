"""The benchmark harness runs end to end on a CPU and writes its table, JSON, Markdown and PNG."""
import json

import pytest

from mmkernels.bench import cli
from mmkernels.ops import bench_specs

pytestmark = pytest.mark.slow


def test_cli_on_cpu_writes_every_report(tmp_path, capsys):
    assert cli.main(["--op", "norm_concat", "--case", "cpu_b512_300+64", "--provider", "eager",
                     "--provider", "cuda", "--mode", "fwd", "--mode", "bwd", "--device", "cpu",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPU numbers need a GPU" in out
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["provider"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {("eager", "fwd"), ("eager", "bwd"), ("cuda", "fwd"), ("cuda", "bwd")}
    assert rows[("eager", "fwd")]["ms"] > 0 and rows[("eager", "fwd")]["error"] is None
    assert rows[("eager", "bwd")]["bytes"] > rows[("eager", "fwd")]["bytes"]
    assert "cannot run" in rows[("cuda", "fwd")]["error"]  # the reason is kept, not hidden
    assert "| norm_concat | cpu_b512_300+64 | fwd |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


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


def test_an_interrupted_run_keeps_what_it_measured(tmp_path):
    # results.json/.md are rewritten after every (case, mode, dtype) group, before the run ends
    import torch

    from mmkernels.bench import report, runner
    spec = bench_specs()["norm_concat"]
    seen = []

    def on_rows(partial):
        report.write_all(partial, str(tmp_path), png=False)
        seen.append(len(partial["rows"]))
        assert all("vs_eager" in r for r in partial["rows"])  # derived columns present
    result = runner.run([spec], lambda c: c.name == "cpu_b512_300+64", {"eager"}, ["fwd", "fwd+bwd"],
                        [torch.float32], torch.device("cpu"), on_rows=on_rows)
    assert seen == [1, 2] and len(result["rows"]) == 2
    assert "| norm_concat | cpu_b512_300+64 |" in (tmp_path / "results.md").read_text()
