"""The launch machinery every Triton kernel goes through: kernels run on their tensors' GPU, not on
the current one; autotuning never runs under CUDA-graph capture; autotune buckets stay few."""
import types

import pytest
import torch

import mmkernels
from mmkernels import runtime

from conftest import HAS_CUDA

TWO_GPUS = HAS_CUDA and torch.cuda.device_count() >= 2


# --- autotune buckets -----------------------------------------------------------------------------

def test_tune_bucket_is_a_clamped_power_of_four():
    assert [runtime.tune_bucket(n, 256, 16384) for n in (1, 256, 257, 1024, 1025, 5000, 10 ** 6)] == \
        [256, 256, 1024, 1024, 4096, 16384, 16384]
    # a ragged run over lengths 1..16384 meets 4 keys, not one per power of two
    assert len({runtime.tune_bucket(n, 256, 16384) for n in range(1, 16385)}) == 4


# --- no timing under CUDA-graph capture -----------------------------------------------------------

def _fake_tuned(cache):
    def prune(configs, nargs, **meta):
        assert meta.get("UNTUNED") is True
        return [c for c in configs if c.kwargs["BLOCK"] <= nargs["N"]]
    configs = [types.SimpleNamespace(kwargs={"BLOCK": b}, pre_hook=None, all_kwargs=lambda b=b: {"BLOCK": b})
               for b in (64, 32, 16)]
    return types.SimpleNamespace(arg_names=["X", "N", "FLAG"], keys=["N", "FLAG"], cache=cache, configs=configs,
                                 early_config_prune=prune, fn="plain kernel")


@pytest.mark.parametrize("capturing", [False, True])
@pytest.mark.parametrize("cached", [False, True])
def test_tuned_launch_takes_the_cached_choice_else_tunes_except_under_graph_capture(monkeypatch, cached, capturing):
    x = torch.empty(4, dtype=torch.float16)
    key = (20, True, "torch.float16")
    choice = types.SimpleNamespace(kwargs={"BLOCK": 32}, pre_hook=None, all_kwargs=lambda: {"BLOCK": 32})
    tuned = _fake_tuned({key: choice} if cached else {})
    assert runtime.tuning_key(tuned, (x, 20), {"FLAG": True}) == key
    launched = []
    monkeypatch.setattr(runtime, "launch", lambda k, grid, *args, **meta: launched.append((k, meta)))
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "TRITON_INTERPRET", False)
    monkeypatch.setattr(runtime, "_capturing_graph", lambda: capturing)
    runtime.launch_tuned(tuned, (1,), (x, 20), {"FLAG": True})
    if cached:       # the choice on the plain kernel (a prepared launch), no autotuner call
        assert launched == [("plain kernel", {"FLAG": True, "BLOCK": 32})]
    elif capturing:  # the plain kernel with the pruning's untuned choice: no timing, no sync
        assert launched == [("plain kernel", {"FLAG": True, "BLOCK": 16})]
    else:            # the autotuner times its configurations once for this key
        assert launched == [(tuned, {"FLAG": True})]


def test_capture_for_the_aot_compile_records_tuned_and_untuned_launches(monkeypatch):
    x = torch.empty(4)
    tuned = _fake_tuned({})
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "TRITON_INTERPRET", False)
    with runtime.capture_launches() as launches:
        runtime.launch_tuned(tuned, (1,), (x, 20), {"FLAG": True})
    assert [k is tuned for k, _, _ in launches] == [True, False]
    untuned = launches[1][0]
    assert untuned.fn == "plain kernel" and [c.kwargs for c in untuned.configs] == [{"BLOCK": 16}]


# --- the tensors' device --------------------------------------------------------------------------

def test_launch_device_is_found_in_tensors_tuples_and_descriptors():
    t = torch.empty(2, device="meta")
    desc = types.SimpleNamespace(base=t, block_shape=[1])
    assert runtime._device_of((3, desc)) == t.device
    assert runtime._device_of((None, (1, t))) == t.device
    assert runtime._device_of((1, 2.0)) is None
    import contextlib
    assert isinstance(runtime._on_device((torch.empty(1),)), contextlib.nullcontext)  # CPU tensors: no guard


@pytest.mark.gpu
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs (tensors on cuda:1 while cuda:0 is current)")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_every_op_runs_on_the_tensors_gpu_not_the_current_one(backend):
    from mmkernels.nn import GatedFusion
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, torch.bfloat16).requires_grad_()
    lengths = torch.tensor([100, 3, 0, 50, 99, 1, 7, 64], device=dev)
    gmu = GatedFusion([256, 128], 64).to(dev, torch.bfloat16)
    cases = {  # name: (function of the leaves, leaves)
        "norm_concat": (lambda *xs: mmkernels.norm_concat(list(xs)), [rnd(64, 256), rnd(64, 128)]),
        "attention_pool": (lambda x, q: mmkernels.attention_pool(x, q, lengths), [rnd(8, 100, 256), rnd(1, 1, 4, 64)]),
        "concat_linear": (lambda a, b, w, bias: mmkernels.concat_linear([a, b], w, bias, "gelu"),
                          [rnd(64, 256), rnd(64, 128), rnd(96, 384), rnd(96)]),
        "gated_sum": (mmkernels.gated_sum, [rnd(64, 3, 128), rnd(64, 3, 128)]),
        "gated_fusion": (lambda a, b: gmu([a, b]), [rnd(64, 256), rnd(64, 128)]),
    }
    for name, (fn, leaves) in cases.items():
        if backend == "cuda" and name in ("concat_linear", "gated_fusion"):
            continue  # no CUDA C++ kernel for these
        results = {}
        for b in ("reference", backend):
            with mmkernels.use_backend(b):
                out = fn(*leaves)
                results[b] = (out, torch.autograd.grad(out.float().square().sum(), leaves))
        torch.cuda.synchronize(dev)
        (ref, ref_grads), (out, grads) = results["reference"], results[backend]
        assert out.device == dev and torch.cuda.current_device() == 0, name
        torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2, msg=name)
        for gr, rr in zip(grads, ref_grads):
            torch.testing.assert_close(gr.float(), rr.float(), atol=2e-1, rtol=5e-2, msg=name)
