"""pytest-benchmark suite over the harness's cases and providers:
``python -m pytest benchmarks/ --benchmark-only`` (GPU: the quick cases in bf16; CPU: the small
cases in fp32). ``mmkernels-bench`` is the main tool (floors, speedups, reports); this suite feeds
pytest-benchmark's history and comparison (``--benchmark-autosave``, ``--benchmark-compare``).

What it measures is not what ``mmkernels-bench`` measures, so its numbers do not compare with the
CLI's: pytest-benchmark's wall-clock time of one call plus ``torch.cuda.synchronize()``, host time
included, on one input set (no rotation) and with no L2 flush between calls, so on a GPU inputs
that fit in L2 are read from it. ``torch.compile`` runs through one graph per case (the provider is
made fresh for each test). Use it to see a change move, not for the tables in RESULTS.md."""
import pytest
import torch

from mmkernels import BackendError

from mmkernels.bench.runner import _callable
from mmkernels.ops import bench_specs

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
PARAMS = [(op, case.name, p, mode)
          for op, spec in bench_specs().items()
          for case in spec.cases if ("quick" if ON_GPU else "cpu") in case.tags
          for p in spec.providers for mode in ("fwd", "fwd+bwd")]


@pytest.mark.parametrize("op,case,provider,mode", PARAMS)
def test_bench(benchmark, op, case, provider, mode):
    spec = bench_specs()[op]
    inputs = spec.make_inputs(spec.case(case), DTYPE, DEVICE)
    run = spec.providers[provider]
    if hasattr(run, "fresh"):
        run.fresh()
    try:
        fn = _callable(run, [inputs], mode)
        fn()
    except BackendError as exc:  # only "this backend cannot take these inputs" skips; a bug fails
        pytest.skip(f"{provider} cannot run here: {exc}")

    def step():
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
    benchmark.extra_info.update(bytes=spec.traffic(spec.case(case), DTYPE)[mode].total, dtype=str(DTYPE),
                                timer="pytest-benchmark wall time + synchronize, one input set, no L2 flush")
    benchmark(step)
