"""The dispatch: names, set/use/env var, auto's choice, and one error listing every reason."""
import os
import re
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import backend

from conftest import HAS_CUDA


def test_default_is_auto_and_set_backend_validates():
    assert mmkernels.get_backend() == "auto"
    mmkernels.set_backend("reference")
    assert mmkernels.get_backend() == "reference"
    with pytest.raises(ValueError, match=r"set_backend\(name\): expected one of auto, torch, reference, triton, cuda"):
        mmkernels.set_backend("fastest")


def test_use_backend_restores_on_exit_and_on_error():
    with mmkernels.use_backend("triton"):
        assert mmkernels.get_backend() == "triton"
        with mmkernels.use_backend("reference"):
            assert mmkernels.get_backend() == "reference"
        assert mmkernels.get_backend() == "triton"
    assert mmkernels.get_backend() == "auto"
    with pytest.raises(RuntimeError):
        with mmkernels.use_backend("reference"):
            raise RuntimeError
    assert mmkernels.get_backend() == "auto"


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", backend.ENV_VAR)}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)


def test_environment_variable():
    p = _python("import mmkernels; print(mmkernels.get_backend())", MMKERNELS_BACKEND="reference")
    assert p.returncode == 0 and p.stdout.strip() == "reference", p.stderr
    p = _python("import mmkernels", MMKERNELS_BACKEND="nope")
    assert p.returncode != 0 and "MMKERNELS_BACKEND: expected one of" in p.stderr


def test_auto_takes_torch_for_cpu_tensors_and_every_backend_has_one_path():
    xs = [torch.randn(2, 3)]
    inputs = dict(xs=xs, weights=[None], biases=[None], rms=False, eps=1e-5)
    assert mmkernels.ops.norm_concat.OP.select("auto", inputs)[0] == "torch"
    assert backend.auto_order("norm_concat", inputs)[0] == "torch"
    # requested by name, torch takes any device; auto takes it on a GPU only where the table says so
    # and the op's plain formulation was what that verdict timed (plain_devices)
    gpu = dict(inputs, xs=[torch.empty(2, 3, device="meta")])
    impl = mmkernels.ops.norm_concat.OP.impls["torch"]
    assert impl.why_not(True, **gpu) is None and "plain formulation on cpu tensors only" in impl.why_not(False, **gpu)


def test_explicit_backend_that_cannot_run_names_the_reason():
    xs = [torch.randn(2, 3)]
    with mmkernels.use_backend("cuda"), pytest.raises(mmkernels.BackendError, match=r"backend 'cuda' cannot run.*CUDA"):
        mmkernels.norm_concat(xs)
    if not HAS_CUDA:  # the interpreter serves CPU tensors, but not float64
        with mmkernels.use_backend("triton"), pytest.raises(mmkernels.BackendError, match=r"float64 is not supported"):
            mmkernels.norm_concat([torch.randn(2, 3, dtype=torch.float64)])


def test_triton_on_cpu_without_interpreter_is_refused_with_reason():
    p = _python("import torch, mmkernels\n"
                "with mmkernels.use_backend('triton'): mmkernels.norm_concat([torch.randn(2, 3)])")
    assert p.returncode != 0 and "CPU tensors need TRITON_INTERPRET=1" in p.stderr, p.stderr[-2000:]


class _Refuses:
    def __init__(self, reason):
        self.reason = reason

    def why_not(self, explicit, **inputs):
        return self.reason


def test_auto_lists_every_backends_reason_when_none_fits():
    impls = {"reference": _Refuses("no"), "triton": _Refuses("too wide"), "cuda": _Refuses("not built")}
    with pytest.raises(mmkernels.BackendError) as err:
        backend.select("toy", impls, "auto")
    msg = str(err.value)
    assert "mmkernels.toy: no backend can run these inputs" in msg
    assert "cuda: not built" in msg and "triton: too wide" in msg and "reference: no" in msg
    assert isinstance(err.value, ValueError)


def test_auto_without_a_measurement_prefers_triton_then_cuda_then_reference():
    ok = _Refuses(None)
    assert backend.select("toy", {"reference": ok, "triton": ok, "cuda": ok}, "auto")[0] == "triton"
    assert backend.select("toy", {"reference": ok, "triton": _Refuses("x"), "cuda": ok}, "auto")[0] == "cuda"
    assert backend.select("toy", {"reference": ok}, "auto")[0] == "reference"


def test_auto_tries_the_measured_faster_backend_first(monkeypatch):
    import mmkernels.cuda
    ok = _Refuses(None)
    monkeypatch.setattr(mmkernels.cuda, "preferred", lambda op, t: "cuda")
    assert backend.auto_order("toy", {}) == ("cuda", "triton", "reference")
    assert backend.select("toy", {"reference": ok, "triton": ok, "cuda": ok}, "auto")[0] == "cuda"
    assert backend.select("toy", {"reference": ok, "triton": ok, "cuda": _Refuses("x")}, "auto")[0] == "triton"


# --- declared capabilities ------------------------------------------------------------------------

def test_declared_capabilities_give_every_reason_that_applies():
    caps = backend.Capabilities(dtypes=(torch.float16,), devices=("cuda",),
                                limits=(backend.Limit("modalities", lambda h, **_: h.shape[0], 2, "one tile"),))
    why = caps.reasons({"h": torch.zeros(3, dtype=torch.float64)})
    assert why == ["dtype torch.float64 is not supported (supported: torch.float16)",
                   "device type 'cpu' is not supported (supported: cuda)",
                   "3 modalities > 2 (one tile)"]
    assert caps.reasons({"h": torch.zeros(2, dtype=torch.float16, device="meta")}) == [
        "device type 'meta' is not supported (supported: cuda)"]


def test_explicit_backend_error_lists_several_reasons():
    # float64, 20 queries per head and a head dim of 300: the Triton attention pooling refuses all three
    x = torch.randn(2, 5, 600, dtype=torch.float64)
    q = torch.randn(20, 2, 300, dtype=torch.float64)
    with pytest.raises(mmkernels.BackendError) as err:
        mmkernels.attention_pool(x, q, backend="triton")
    msg = str(err.value)
    assert msg.startswith("mmkernels.attention_pool: backend 'triton' cannot run these inputs: ")
    assert "dtype torch.float64 is not supported (supported: torch.float16, torch.bfloat16, torch.float32)" in msg
    assert "20 queries per head > 16 (one program holds them all; a regular attention kernel fits better)" in msg
    assert "300 head dim > 256 (one program's registers)" in msg


def test_auto_error_lists_several_reasons_for_one_backend():
    impls = {"reference": _Refuses("no"), "triton": _Refuses(["too wide", "too many"]), "cuda": None}
    with pytest.raises(mmkernels.BackendError) as err:
        backend.select("toy", impls, "auto")
    msg = str(err.value)
    assert "  triton: too wide; too many" in msg and "  cuda: not implemented for this op" in msg


def test_per_call_backend_beside_the_process_wide_one():
    xs = [torch.randn(3, 4)]
    with mmkernels.use_backend("reference"):
        with pytest.raises(mmkernels.BackendError, match=r"backend 'cuda' cannot run"):
            mmkernels.norm_concat(xs, backend="cuda")   # the call's choice wins
        torch.testing.assert_close(mmkernels.norm_concat(xs, backend="auto"), mmkernels.norm_concat(xs))
    for call in (lambda: mmkernels.gated_sum(torch.randn(2, 3, 4), torch.randn(2, 3), backend="nope"),
                 lambda: mmkernels.concat_linear(xs, torch.randn(2, 4), backend="nope")):
        with pytest.raises(ValueError, match=r"backend: expected one of auto, torch, reference, triton, cuda"):
            call()


def test_every_op_folder_registers_through_the_one_helper():
    # no op folder calls torch.library itself: the schema, backends and output shapes go to
    # mmkernels.ops._register.Op, which registers the custom ops, fakes and autograd
    import importlib
    import pathlib

    from mmkernels.ops._register import Op
    root = pathlib.Path(mmkernels.__file__).parent / "ops"
    folders = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
    from mmkernels.ops import OPS
    # every folder is an op the test and benchmark machinery lists (gated_fusion launches no Triton
    # kernel of its own: its layer is benchmarked instead)
    assert set(folders) == set(OPS) | {"gated_fusion"}
    for name in folders:
        assert not re.search(r"torch\.library\.\w+\(|register_fake|register_autograd",
                             (root / name / "__init__.py").read_text()), name
        op = importlib.import_module(f"mmkernels.ops.{name}").OP
        assert isinstance(op, Op)
        assert hasattr(torch.ops.mmkernels, op.name) and hasattr(torch.ops.mmkernels, f"{op.name}_backward")
        for impl in op.impls.values():  # every backend declares what it takes, or refuses outright
            assert hasattr(impl, "CAPABILITIES") or impl.why_not(explicit=True, xs=[torch.ones(1)]), impl


@pytest.mark.parametrize("op, arg", [("latent_pool", "x"), ("low_rank_fusion", "xs")])
@pytest.mark.parametrize("declared", [False, True])
def test_triton_backends_not_built_for_a_chip_say_so_there_only(op, arg, declared, monkeypatch):
    # a backend whose kernels do not compile for a chip (the ahead-of-time compile shows it) declares
    # it (UNBUILT: compute capability major -> why) and refuses there with the reason, elsewhere not.
    # Both compile for every target today (nothing declared); the mechanism is checked with a
    # declaration for sm_10x
    from mmkernels import runtime
    impl = mmkernels.ops.OPS[op].OP.impls["triton"]
    module = impl_module(op)
    assert module.UNBUILT == {}
    if declared:
        monkeypatch.setattr(module, "UNBUILT", {10: "a kernel fails to compile there"})
    t = torch.randn(2, 3)
    inputs = {arg: t if arg == "x" else [t, t]}
    monkeypatch.setattr(runtime, "_device_type", lambda device: "cuda")
    monkeypatch.setattr(runtime, "_current_device", lambda: 0)
    for cc, refused in (((10, 0), declared), ((9, 0), False), ((12, 0), False), ((8, 9), False)):
        monkeypatch.setattr(runtime, "_CAPABILITY", {})
        monkeypatch.setattr(runtime, "_gpu_identity", lambda index, cc=cc: ("GPU", cc))
        # the backend's own why_not where the interpreter serves CPU tensors; on a GPU machine they
        # are refused earlier (no interpreter), so the declared part alone
        reason = runtime.unbuilt_on(t.device, module.UNBUILT) if HAS_CUDA else impl.why_not(True, **inputs)
        assert (reason is not None and f"not built for sm_{cc[0]}{cc[1]}" in reason) == refused, (cc, reason)


def impl_module(op):
    import importlib
    return importlib.import_module(f"mmkernels.ops.{op}.triton")
