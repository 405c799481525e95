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
    assert set(specs) == set(OPS)
    for spec in specs.values():
        assert {"eager", "compile", "triton", "cuda"} <= set(spec.providers)
        assert any("quick" in c.tags for c in spec.cases) and any("cpu" in c.tags for c in spec.cases)


def test_unknown_case_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--case", "nope", "--device", "cpu"])
    assert "--case: unknown" in capsys.readouterr().err


@pytest.mark.parametrize("op", sorted(bench_specs()))
def test_every_provider_runs_the_cpu_cases(op):
    # Triton providers run under the interpreter here; only "this backend cannot take these
    # inputs" (BackendError, e.g. cuda on CPU tensors) may stop a provider. torch.compile is left
    # to the compile tests (minutes of inductor on this machine).
    import torch

    from mmkernels import BackendError
    from mmkernels.bench.runner import _callable
    spec = bench_specs()[op]
    for case in [c for c in spec.cases if "cpu" in c.tags]:
        inputs = spec.make_inputs(case, torch.float32, torch.device("cpu"))
        outs = {}
        for name, provider in spec.providers.items():
            if name == "compile":
                continue
            try:
                outs[name] = _callable(provider, [inputs], "fwd")()
                grads = _callable(provider, [inputs], "fwd+bwd")()
            except BackendError:
                continue
            assert any(g is not None for g in grads), (op, case.name, name)
        assert {"eager", "triton"} <= set(outs), (op, case.name, sorted(outs))
        for name, out in outs.items():
            if name in spec.bounds:  # times a bound (e.g. the GEMM alone), computes something else
                continue
            torch.testing.assert_close(out, outs["eager"], atol=1e-4, rtol=1e-4, msg=f"{op} {case.name} {name}")
