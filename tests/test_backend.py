"""The dispatch: names, set/use/env var, auto's choice, and one error listing every reason."""
import os
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
    with pytest.raises(ValueError, match=r"set_backend\(name\): expected one of auto, reference, triton, cuda"):
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


def test_auto_takes_reference_for_cpu_tensors():
    xs = [torch.randn(2, 3)]
    name, _ = mmkernels.ops.norm_concat._select("auto", xs, [None], [None])
    assert name == "reference"


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
