"""Prepared launches (:mod:`mmkernels.runtime`): after the first launch of a specialization, a Triton
kernel is started through its plan — the compiled kernel's launcher, called directly — and a plan is
never reused for a call that Triton would have compiled differently (a dtype, a pointer's 16-byte
alignment, an integer equal to 1 or divisible by 16, a 64-bit integer, a constexpr, a launch option,
another GPU). Host TMA descriptors are encoded once per (pointer, shape, strides, box)."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from mmkernels import runtime

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_launch_worker.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _through(obs) -> str:
    """'plan' (a prepared launch), 'jit' (Triton's own JITFunction.run) or 'compile' (run, compiling)."""
    if obs["prepared"] == 1 and obs["jit"] == 0:
        return "plan"
    assert obs["prepared"] == 0 and obs["jit"] == 1, obs
    return "compile" if obs["compiles"] else "jit"


def test_every_launch_runs_the_kernel_triton_itself_would_run(launches):
    rows = {k: v for k, v in launches.items() if isinstance(v, dict) and "compiles" in v}
    assert len(rows) > 20
    assert all(v["ran_the_kernel_triton_would"] for v in rows.values()), \
        [k for k, v in rows.items() if not v["ran_the_kernel_triton_would"]]


def test_a_repeat_call_takes_its_plan(launches):
    assert _through(launches["first"]) == "compile"
    for label in ("repeat", "repeat, other float", "repeat, other int of the same kind", "launch option, repeat",
                  "other kernel, repeat", "grid as a tuple", "another GPU, repeat", "prepared again"):
        assert _through(launches[label]) == "plan", label


@pytest.mark.parametrize("label", ["dtype", "alignment", "int equal to 1 (a stride of 1)", "int divisible by 16",
                                   "64-bit int", "constexpr", "constexpr flag", "constexpr of another type",
                                   "launch option",
                                   "other kernel, same arguments' kinds"])
def test_what_changes_the_compiled_kernel_never_reuses_a_plan(launches, label):
    assert _through(launches[label]) == "compile"


def test_a_plan_is_per_gpu_and_launches_on_that_gpus_stream(launches):
    assert _through(launches["another GPU"]) == "jit"          # a new plan for cuda:1, not cuda:0's
    assert launches["another GPU, repeat"]["stream"] == 1001   # the current stream of cuda:1
    assert launches["repeat"]["last_prepared"][2] == [1, 1, 1, 1000]


def test_a_plan_passes_the_launcher_what_jitfunction_run_passes(launches):
    first, repeat = launches["first"]["last_jit"], launches["repeat"]["last_prepared"]
    assert repeat[4] == first[3]                       # every parameter, constexprs included, in order
    assert repeat[3].endswith("None, None, None)")     # no launch metadata, no hooks
    other = launches["repeat, other float"]["last_prepared"]
    assert other[4][4] == 5.0 and other[4][:4] == first[3][:4]   # this call's values, not the first call's


def test_launch_hooks_and_the_jit_mode_go_through_triton(launches):
    assert _through(launches["launch hook installed"]) == "jit"   # a profiler's hook sees every launch
    assert _through(launches["hook removed"]) == "plan"
    assert _through(launches["jit mode"]) == _through(launches["jit mode, repeat"]) == "jit"
    assert _through(launches["prepared again"]) == "plan"         # each mode keeps its own plans
    assert _through(launches["jit mode for a block"]) == "jit"
    assert _through(launches["after the block"]) == "plan"
    assert launches["plans"] == {"scale_kernel@0": 10, "scale_kernel@1": 1, "other_kernel@0": 1}   # 10 specializations
    assert _through(launches["after reset_plans"]) == "jit"
    assert launches["plans after reset"] == {"scale_kernel@0": 1}


def test_auto_takes_the_mode_measured_on_this_gpu_or_its_chip_class(monkeypatch, tmp_path):
    import json
    table = tmp_path / "launch_table.json"
    table.write_text(json.dumps({"modes": {"NVIDIA H200": "static", "class:hopper": "jit"}}))
    monkeypatch.setattr(runtime, "LAUNCH_TABLE", str(table))
    gpus = {0: ("NVIDIA H200", (9, 0)), 1: ("NVIDIA H100 80GB HBM3", (9, 0)), 2: ("NVIDIA A100-SXM4-80GB", (8, 0))}
    monkeypatch.setattr(runtime, "_gpu_identity", lambda index: gpus[index])
    assert [runtime.measured_launch_mode(i) for i in (0, 1, 2)] == ["static", "jit", "prepared"]
    monkeypatch.setattr(runtime, "LAUNCH_TABLE", str(tmp_path / "absent.json"))
    assert runtime.measured_launch_mode(0) == "prepared"


def test_launch_mode_is_validated():
    with pytest.raises(ValueError, match="launch mode: expected one of auto, prepared, static, jit"):
        runtime.set_launch_mode("fast")
    assert runtime.launch_mode() in runtime.LAUNCH_MODES + ("auto",)


def test_the_installed_triton_speaks_the_launch_protocol_plans_use():
    # a Triton whose JITFunction.run calls its launcher differently turns plans off (every launch
    # through JITFunction.run) instead of calling it wrongly; the pinned one must keep them on
    assert runtime.launch_protocol_reason() is None


# --- TMA descriptors, encoded once ---------------------------------------------------------------

def _descriptor_fixture():
    from triton.backends.nvidia import driver as nv
    from triton.tools.tensor_descriptor import TensorDescriptor

    from mmkernels.testing import _HostlessDriver
    signature = {"A": "tensordesc<bf16[64, 64]>", "n": "i32", "B": "tensordesc<bf16[64, 32]>", "C": "*bf16"}
    metas = [dict(swizzle=3, elem_size=2, elem_type=10, block_size=[64, 64], fp4_padded=False),
             dict(swizzle=3, elem_size=2, elem_type=10, block_size=[64, 32], fp4_padded=False)]
    a = torch.randn(128, 64, dtype=torch.bfloat16)
    b = torch.randn(256, 64, dtype=torch.bfloat16)
    descs = (TensorDescriptor(a, [128, 64], [64, 1], [64, 64]), TensorDescriptor(b, [256, 64], [64, 1], [64, 32]))
    return nv, _HostlessDriver, signature, metas, descs


def _wrapper_protocol(nv):
    """How Triton's descriptor wrapper is called: (number of launch arguments, a function that
    makes the call from them and the kernel's). Triton 3.6: the kernel's arguments follow the
    ``_BASE_ARGS_FORMAT_LEN`` launch arguments, flat; Triton 3.9 (one generic launcher, no
    ``make_launcher``): they follow the 15 launch arguments of ``CudaLauncher`` as one tuple."""
    if hasattr(nv, "make_launcher"):
        return nv._BASE_ARGS_FORMAT_LEN, lambda fn, base, *kernel: fn(*base, *kernel)
    return 15, lambda fn, base, *kernel: fn(*base, kernel)


def test_descriptors_are_encoded_once_and_packed_as_tritons_wrapper_packs_them(monkeypatch):
    import triton
    nv, hostless, signature, metas, (da, db) = _descriptor_fixture()
    monkeypatch.setattr(triton.runtime.driver, "_active", hostless())
    encodes = []
    real = nv.make_tensordesc_arg
    monkeypatch.setattr(nv, "make_tensordesc_arg", lambda d, m, *rest: encodes.append(1) or real(d, m, *rest))
    packed = []
    wrapped = nv.wrap_handle_tensordesc(lambda *a: packed.append(a), signature, metas)
    runner = types.SimpleNamespace(launch=wrapped)            # a compiled kernel's launcher, as Triton builds it
    cached = runtime._cached_descriptors(runner, signature)
    assert cached is not runner and runner.launch is wrapped  # a copy: Triton's own launcher is untouched
    n_base, call = _wrapper_protocol(nv)
    base = tuple(range(n_base))
    c = torch.empty(4, dtype=torch.bfloat16)
    for _ in range(3):
        n = len(encodes)
        call(wrapped, base, da, 7, db, c)
        assert len(encodes) == n + 2                           # Triton: both descriptors, every launch
        call(cached.launch, base, da, 7, db, c)
        theirs, ours = packed[-2:]
        assert _flat(ours) == _flat(theirs)                    # the raw launcher gets the same arguments
        assert [type(a) for a in ours] == [type(a) for a in theirs]
    assert len(encodes) == 3 * 2 + 2                           # ours: each descriptor once
    db.block_shape = [32, 32]                                  # another box: encoded anew
    call(cached.launch, base, da, 7, db, c)
    assert len(encodes) == 3 * 2 + 3
    b2 = torch.randn(256, 64, dtype=torch.bfloat16)            # another tensor: encoded anew
    db2 = type(db)(b2, [256, 64], [64, 1], [64, 32])
    call(cached.launch, base, da, 7, db2, c)
    assert len(encodes) == 3 * 2 + 4
    assert _flat(packed[-1])[n_base + 6][1][0] == b2.data_ptr()   # A: map, 2 dims, 2 strides; n


def _flat(args):
    """The launch's arguments in order, the kernel's sequence (Triton 3.9) unpacked: tensors by
    address, CUtensorMaps by their fields."""
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out.extend(_flat(a))
        elif isinstance(a, torch.Tensor):
            out.append(("tensor", a.data_ptr()))
        elif type(a).__name__ == "_TensorMap":
            out.append(("tma", a.fields))
        else:
            out.append(a)
    return out


def test_runner_without_descriptors_is_left_alone():
    runner = types.SimpleNamespace(launch=lambda *a: None)
    assert runtime._cached_descriptors(runner, {"X": "*fp32", "n": "i32"}) is runner


def test_descriptors_lowered_to_plain_loads_are_not_cached():
    # below sm_90 Triton compiles no TMA metadata: a descriptor expands to its tensor, shape and
    # strides, and a cache of those would keep every tensor it saw alive
    from triton.backends.nvidia import driver as nv
    signature = {"A": "tensordesc<bf16[64, 64]>", "n": "i32"}
    runner = types.SimpleNamespace(launch=nv.wrap_handle_tensordesc(lambda *a: None, signature, None))
    assert runtime._cached_descriptors(runner, signature) is runner


def test_static_launcher_arguments_leave_out_constexprs_and_refuse_descriptors_and_tuples():
    spec = [("*bf16", "D"), ("constexpr", 1), ("i32", ""), ("fp32", None), ("constexpr", None), ("constexpr", 64)]
    assert runtime.static_arguments(spec) == (0, 2, 3)
    assert runtime.static_arguments([("tensordesc<bf16[64, 64]>", None)]) is None
    assert runtime.static_arguments([(("i32", "i32"), ("D", ""))]) is None
