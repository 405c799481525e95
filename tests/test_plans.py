"""Call plans (:mod:`mmkernels.plans`): a repeat call of an op on a GPU replays what its first
calls recorded — the same launches with the same arguments, the same outputs — and a plan is
never reused for a call its backend's Python could have treated differently."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmkernels import candidates, plans, runtime

HERE = os.path.dirname(os.path.abspath(__file__))
GPU = lambda device: "cuda"       # noqa: E731  (the device-type seam: CPU tensors stand for GPU ones)


def _run_worker(backend: str, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    env.update(env_extra)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_plan_worker.py"), backend], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def worker():
    return _run_worker("triton")


def test_a_replayed_call_launches_and_returns_what_the_backends_python_does(worker):
    rows = worker["rows"]
    assert len(rows) >= 28
    for label, seen in rows.items():
        full, planned = seen["false"], seen["true"]
        assert planned["launches"] == full["launches"], label       # kernel, grid, every argument
        assert planned["result"] == full["result"], label           # outputs and gradients
    replayed = {label.split("/")[0] for label, seen in rows.items() if seen["true"]["replayed"]}
    assert replayed >= {"norm_concat", "attention_pool", "concat_linear", "gated_sum", "gated_fusion", "latent_pool"}
    assert any("/triton_varlen/" in label and seen["true"]["replayed"] for label, seen in rows.items())
    # GatedFusion on slices of one buffer: its projections' one strided view (from the slices' storage
    # offsets) replayed on this call's buffer, with the values of the backend's own call
    sliced = rows["gated_fusion/slices of one buffer/float32/fwd"]
    assert sliced["true"]["replayed"] > 0 and sliced["true"]["values"] == sliced["false"]["values"]
    # tensor_fusion's blocked cuBLAS path is torch ops only: its Python is kept (a replay of its
    # operators through the dispatcher would cost more than it saves)
    assert not any(seen["true"]["replayed"] for label, seen in rows.items() if label.startswith("tensor_fusion"))


def test_a_launch_hook_or_triton_debug_knob_changes_the_signature(worker):
    # a profiler's launch hook sends every launch through Triton's own path; the debug and
    # instrumentation knobs compile other kernels (worker: Triton not interpreted)
    assert worker["knobs"] == {"hook": True, "debug": True, "after": False}


def test_bad_input_on_a_repeat_call_gets_its_value_error_before_any_launch(worker):
    bad = worker["bad_input"]
    assert bad["replayed_before"] > 0 and bad["launches"] == 0
    assert bad["error"].startswith("weights[2]: expected shape (48,)")


def _args(x, w, backend="triton"):
    return ([x, x[:, :8]], [w], [True], False, 1e-5, backend)


def test_the_signature_changes_with_everything_the_backends_python_reads():
    x, w = torch.randn(8, 64), torch.randn(64)
    base = plans.signature(_args(x, w), GPU)[0]
    assert plans.signature(_args(x, w), GPU)[0] == base
    assert plans.signature(_args(x.clone(), w.clone()), GPU)[0] == base              # other tensors, same kind
    buf = torch.randn(8 * 64 + 1)
    others = {
        "dtype": _args(x.half(), w),
        "16-byte alignment": _args(buf[1:].view(8, 64), w),
        "a stride": _args(torch.randn(64, 8).t(), w),
        "a storage offset": _args(torch.randn(8 * 64 + 4)[4:].view(8, 64), w),
        "a shape": _args(torch.randn(9, 64), w),
        "requires grad": _args(x.clone().requires_grad_(), w),
        "the backend": _args(x, w, "cuda"),
        "a float argument": ([x, x[:, :8]], [w], [True], False, 1e-6, "triton"),
        "one tensor in two places": ([x, x], [w], [True], False, 1e-5, "triton"),
    }
    for what, args in others.items():
        assert plans.signature(args, GPU)[0] != base, what
    assert plans.signature(([torch.randn(8, 64), x], [w], [True], False, 1e-5, "triton"), GPU)[0] != \
        plans.signature(([x, x], [w], [True], False, 1e-5, "triton"), GPU)[0]
    assert plans.signature(_args(x, w), lambda device: "cpu") is None          # CPU tensors: no plans


def test_the_signature_changes_with_the_process_wide_choices():
    x, w = torch.randn(8, 64), torch.randn(64)
    base = plans.signature(_args(x, w), GPU)[0]
    with runtime.use_launch_mode("static" if runtime.launch_mode() != "static" else "prepared"):
        assert plans.signature(_args(x, w), GPU)[0] != base
    with runtime.use_launch_mode("jit"):                        # no prepared launch: nothing to plan
        assert plans.signature(_args(x, w), GPU) is None
    slot = sorted(candidates.SLOTS)[0]
    with candidates.use(slot, candidates.SLOTS[slot][-1]):
        assert plans.signature(_args(x, w), GPU)[0] != base
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        assert plans.signature(_args(x, w), GPU)[0] != base
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    runtime.reset_plans()                                       # every plan made before is stale
    assert plans.signature(_args(x, w), GPU)[0] != base


def _record(body, *inputs):
    table = plans.Table()
    key = ("test", len(inputs))
    for _ in range(plans.ATTEMPTS + 2):      # a first sighting, then the recordings
        table.call((key, list(inputs)), body)
    return table[key]


def test_a_call_that_reads_a_device_value_on_the_host_is_not_planned():
    x = torch.randn(16)

    def body():
        n = int(x.sum().item() > 0)            # a decision made from a value: not the same next call
        return torch.empty(n + 1), "triton"
    assert _record(body, x) == plans.ATTEMPTS
    assert plans.last_refusal[0].startswith("aten._local_scalar_dense")


def test_a_call_whose_launch_is_not_prepared_is_not_planned():
    x = torch.randn(16)

    def body():
        runtime._refuse_plan("a launch through JITFunction.run")
        return torch.empty(4), "triton"
    assert _record(body, x) == plans.ATTEMPTS


def test_a_call_that_aliases_its_input_outside_torchs_dispatch_is_not_planned():
    x = torch.randn(16)

    def body():
        return torch.from_numpy(x.numpy())[:4], "triton"     # made without torch's dispatch: unseen
    assert _record(body, x) == plans.ATTEMPTS
    assert plans.last_refusal[0].startswith("a tensor from outside the call")


def test_inputs_that_share_memory_replay_only_for_calls_that_share_it_alike():
    # a backend may view such inputs as one strided tensor (gated_fusion's batched projections,
    # from their storage offsets): the signature tells slices of one buffer from separate tensors
    buf, other = torch.randn(2, 16), torch.randn(2, 16)
    w = torch.randn(16)
    one = plans.signature(([buf[0], buf[1]], [w], [True], False, 1e-5, "triton"), GPU)[0]
    two = plans.signature(([buf[0], other[1]], [w], [True], False, 1e-5, "triton"), GPU)[0]
    assert one != two
    assert plans.signature(([other[0], other[1]], [w], [True], False, 1e-5, "triton"), GPU)[0] == one


def test_a_call_that_uses_a_backends_cached_tensor_is_not_planned():
    cache = torch.zeros(4)                    # e.g. a padded weight, valid while its source is unchanged
    x = torch.randn(4)

    def body():
        return torch.add(x, cache), "triton"
    assert _record(body, x) == plans.ATTEMPTS
    assert plans.last_refusal[0].startswith("a tensor from outside the call")


@pytest.fixture
def gpu_seams(monkeypatch):
    """The current GPU and its stream (7), as a replayed launch asks them."""
    monkeypatch.setattr(runtime, "_current_device", lambda: 0)
    monkeypatch.setattr(runtime, "_current_stream", lambda index: 7)


def _recorded_launch(plan, grid, bound):
    """A prepared launch as :mod:`mmkernels.runtime` reports it to the call being recorded."""
    if plans.recording.recorder is not None:
        plans.recording.recorder.launch(plan, grid, 0, bound)


def test_a_plan_replays_its_torch_ops_and_launches_on_this_calls_tensors(gpu_seams):
    launched = []

    def kernel_plan(gx, gy, gz, stream, bound):          # what a prepared launch hands the launcher
        launched.append((gx, gy, gz, stream, dict(bound)))

    def body_of(x):
        def body():
            y = torch.empty(x.shape[0], 2)
            bound = {"X": x.view(2, -1), "Y": y, "n": x.shape[0], "BLOCK": 16}
            _recorded_launch(kernel_plan, (3, 1, 1), bound)
            kernel_plan(3, 1, 1, 7, bound)
            return (y.t(), x.view(-1, 4).sum(1), x[2:]), "triton"
        return body
    x = torch.randn(8, 4)
    table = plans.Table()
    key = "k"
    table.call((key, [x]), body_of(x))          # a first sighting: run, not recorded
    assert table[key] == 0
    table.call((key, [x]), body_of(x))
    assert isinstance(table[key], plans.CallPlan)
    launched.clear()
    z = torch.randn(8, 4)
    (yt, sums, tail), name = table.call((key, [z]), body_of(x))     # replayed: the body is not run
    assert name == "triton" and yt.shape == (2, 8)
    torch.testing.assert_close(sums, z.sum(1))
    assert tail.data_ptr() == z[2:].data_ptr()
    [(gx, gy, gz, stream, bound)] = launched                         # the launch, with this call's tensors
    assert (gx, gy, gz, stream) == (3, 1, 1, 7) and bound["n"] == 8 and bound["BLOCK"] == 16
    # a launcher reads a tensor's data pointer alone: the view a launch took is its source on replay
    assert bound["X"].data_ptr() == z.data_ptr() and bound["X"].dtype == z.dtype
    assert bound["Y"].data_ptr() == yt.data_ptr()


def test_a_replay_makes_only_the_views_a_torch_op_or_the_result_uses(gpu_seams):
    # views that keep their source's pointer and go only to launches, and the detach of a tensor the
    # call made, are not made again: the launch takes the source; an output allocated, launched
    # into and returned as a view is allocated in the view's shape; a view that a torch op reads is
    # made, and so is a view of an empty that a torch op reads too
    launched = []

    def body_of(x):
        def body():
            y = torch.empty(4, 8).detach()
            w = torch.empty(2, 16)
            flat = x.view(-1)
            bound = {"X": flat.view(2, 16).t(), "Y": y, "W": w}      # a chain of views, to the launch only
            _recorded_launch(lambda *a: launched.append(dict(a[4])), (1, 1, 1), bound)
            return (y.view(-1, 4), x.view(4, 8).sum(0), w.view(32), w.sum()), "triton"
        return body
    x = torch.randn(8, 4)
    table = plans.Table()
    for _ in range(2):
        table.call(("k", [x]), body_of(x))
    plan = table["k"]
    # what was recorded, detaches aside (a factory called under a dispatch mode records one, and
    # y's .detach() another)
    assert [r for r in plan.recorded if r != "detach.default"] == [
        "empty.memory_format", "empty.memory_format", "view.default", "view.default", "t.default", "launch",
        "view.default", "view.default", "sum.dim_IntList", "view.default", "sum.default"]
    # y in the view's shape, w, the launch, x's view and its sum, w's view and its sum
    assert len(plan.steps) == 7
    z = torch.randn(8, 4)
    (yv, sums, wv, _), _ = table.call(("k", [z]), body_of(x))
    assert launched[-1]["X"] is z and launched[-1]["Y"] is yv and yv.shape == (8, 4) and yv.is_contiguous()
    assert launched[-1]["W"].shape == (2, 16) and wv.shape == (32,) and wv.data_ptr() == launched[-1]["W"].data_ptr()
    torch.testing.assert_close(sums, z.view(4, 8).sum(0))


def test_a_call_with_no_launch_is_not_planned():
    # an empty batch: nothing a replay would save
    x = torch.randn(4)

    def body():
        return torch.empty(0), "triton"
    assert _record(body, x) == plans.ATTEMPTS
    assert plans.last_refusal[0].startswith("no launch")


def test_a_plan_keeps_no_tensor_of_the_call_it_recorded(gpu_seams):
    # the recorded launch's tensors, a TMA descriptor's base included, are this call's on replay and
    # are not kept alive by the plan
    import gc
    import weakref
    from triton.tools.tensor_descriptor import TensorDescriptor
    got = []

    def body_of(x):
        def body():
            y = torch.empty(16, 16)
            d = TensorDescriptor(x, list(x.shape), list(x.stride()), [16, 16])
            _recorded_launch(lambda *a: got.append(a[4]), (1, 1, 1), {"D": d, "Y": y})
            return y, "triton"
        return body
    table = plans.Table()
    x = torch.randn(16, 16)
    for _ in range(2):
        table.call(("k", [x]), body_of(x))
    assert isinstance(table["k"], plans.CallPlan)
    gone = weakref.ref(x)
    del x
    gc.collect()
    assert gone() is None
    z = torch.randn(16, 16)
    table.call(("k", [z]), body_of(z))
    assert got[-1]["D"].base is z and list(got[-1]["D"].block_shape) == [16, 16]


def test_launches_captured_for_the_ahead_of_time_compile_are_not_planned():
    x = torch.randn(4)

    def body():
        runtime.launch(object(), (1,), x)            # captured: recorded for the compile, never run
        return torch.empty(4), "triton"
    with runtime.capture_launches():
        assert _record(body, x) == plans.ATTEMPTS
    assert plans.last_refusal[0].startswith("a launch captured")


@pytest.mark.slow
def test_the_cuda_backends_calls_replay_too():
    # the CUDA C++ library's ops on its CPU emulator (real results): each op call is a launch of the
    # plan; a replayed call gives what the backend's Python gives
    rows = _run_worker("cuda", MMKERNELS_CUDA_EMULATE="1")["rows"]
    assert {label.split("/")[0] for label in rows} == {"norm_concat", "attention_pool", "gated_sum"}
    for label, seen in rows.items():
        full, planned = seen["false"], seen["true"]
        assert planned["replayed"] > 0 and planned["result"] == full["result"], label
        for a, b in zip(planned["values"], full["values"]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
