"""The CUDA C++ backend (csrc/ + mmkernels/cuda): the build, loading and fallback rules, the
C++ Meta implementations under torch.compile, the auto dispatch table, and — on a GPU — every
kernel against the reference, forward and backward, in every dtype, plus compute-sanitizer.

The build tests compile the real sources for every target (sm_80, sm_86, sm_89, sm_90, sm_100,
sm_120 + PTX; no GPU needed) once, and check each target's machine code from that one library
(about ten minutes on two cores the first time, then the build cache answers)."""
import contextlib
import importlib
import json
import os
import shutil
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmkernels
import mmkernels.cuda as ext
from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parent.parent
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU to run the CUDA C++ kernels")]


def _cli(*args, env=None, timeout=1500):
    return subprocess.run([sys.executable, "-m", "mmkernels.cuda", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="session")
def built():
    """The extension, built (or found in the cache) and loaded in this process. A failure here is
    a failure of every test that needs it, never a skip."""
    reason = ext.load()
    assert reason is None, f"the CUDA extension did not build or load: {reason}"
    return ext.build_dir()


# --- building ------------------------------------------------------------------------------------

# the compiled targets: sm_80 (A100), sm_86 / sm_89 (RTX 30 / 40, L4), sm_90 (H100/H200), sm_100
# (B200), sm_120 (RTX 50), each as machine code, and sm_120's PTX for newer chips
TARGETS = [a.split("_")[1] for a in ext.arch_targets(ext.DEFAULT_ARCHS)["sass"]]


@pytest.fixture(scope="module")
def every_target():
    """The extension for every target of :data:`mmkernels.cuda.DEFAULT_ARCHS`, built once by
    ``python -m mmkernels.cuda build`` (or taken from the build cache: the wheel build of
    tests/test_wheel.py, the ``built`` fixture on a machine without a GPU and the prebuilt-folder
    test of tests/test_gpu_check.py compile the same one): the library's path."""
    env = {"TORCH_CUDA_ARCH_LIST": ext.DEFAULT_ARCHS, ext.EMULATE_VAR: "0"}
    proc = _cli("build", env=env, timeout=3600)   # cold, on a busy two-core machine: tens of minutes
    assert proc.returncode == 0, proc.stderr[-4000:]
    lib = Path(proc.stdout.strip().splitlines()[-1].split()[1])
    assert lib.is_file()
    return lib


def _cuobjdump(*args) -> str:
    proc = subprocess.run([ext.builder.cuobjdump(), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.xdist_group("cuda_build")
def test_build_command_compiles_every_target(every_target):
    assert ext.arch_targets(ext.DEFAULT_ARCHS) == {
        "sass": ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"], "ptx": ["compute_120"]}
    assert ext.library_targets(every_target) == ext.arch_targets(ext.DEFAULT_ARCHS)


@pytest.mark.slow
@pytest.mark.xdist_group("cuda_build")
@pytest.mark.parametrize("sm", TARGETS)
def test_machine_code_of_every_target(every_target, sm):
    """Per target: 16-byte global loads in every vector-width kernel, the approximate tanh
    (MUFU.TANH) only where the outputs are 16-bit, and no stack frame (register spill, local
    array) beyond the known ones."""
    sass = _cuobjdump("-sass", "-arch", f"sm_{sm}", str(every_target))
    kernels = {}
    for chunk in sass.split("Function : ")[1:]:
        name, _, body = chunk.partition("\n")
        kernels[name.strip()] = body
    vec = [n for n in kernels if "ILi8E" in n.replace("I6__half", "I").replace("I13__nv_bfloat16", "I") or "IfLi4E" in n]
    assert len(vec) >= 20, sorted(kernels)
    assert not [n for n in vec if "LDG.E.128" not in kernels[n]], "kernels without 16-byte loads"
    fp32 = [n for n in kernels if "_kernelIf" in n]
    assert fp32 and not [n for n in fp32 if "MUFU.TANH" in kernels[n]], "fp32 kernels use the approximate tanh"
    assert any("MUFU.TANH" in kernels[n] for n in kernels if "gated_sum" in n and "_kernelI6__half" in n)
    usage = _cuobjdump("-res-usage", "-arch", f"sm_{sm}", str(every_target))
    stacks = dict(re.findall(r"Function (\S+):\s*\n\s*REG:\d+ STACK:(\d+)", usage))
    assert len(stacks) >= 40 and set(stacks) == set(kernels), usage[:2000]
    spilled = {n for n, b in stacks.items() if int(b) > 0}
    known = {pat: {n for n in spilled if re.search(pat, n)} for pat, (where, _) in KNOWN_CUDA_STACKS.items()
             if sm in where}
    assert spilled == set().union(*known.values()), sorted(spilled - set().union(*known.values()))
    assert all(known.values()), f"a known stack frame is gone on sm_{sm}: drop it from its entry " \
                                f"({[p for p, v in known.items() if not v]})"


# Kernels whose code has a stack frame, the targets where it has one, and why it stays
# (benchmarks/gpu_risks.py times the first against its one-block-per-SM variant, which has none).
# Only sm_90's have been timed on a GPU; the others are ptxas's choices seen in the compiled code.
KNOWN_CUDA_STACKS = {
    # bf16, 16-byte, cached row, __launch_bounds__(256, 2): 128 registers, a 40-48 byte stack
    r"norm_concat_bwd_kernelI13__nv_bfloat16Li8ELb1ELi2E": (("90", "100", "120"),
                                                         "two blocks per SM cap the registers"),
    # 16-bit attention-pooling backward: 16-24 bytes at 48-64 registers (the fp32 variants have
    # none); small next to its shared-memory traffic, to be judged by a GPU timing
    r"attn_pool_bwd_kernelI(13__nv_bfloat16|6__half)Li(1|8)E": (("90",), "16-bit variants only"),
    # fp32 gated_sum backward, scalar loads (rows not 16-byte aligned): 8-32 bytes of 64-bit
    # values kept across the modality loop, though far under the register limit
    r"gated_sum_bwd_kernelIfLi1ELb0E": (("80",), "sm_80's ptxas: 32 registers and a 32-byte stack"),
    r"gated_sum_bwd_kernelIfLi1ELb1E": (("100",), "sm_100's ptxas: 48 registers and an 8-byte stack"),
}


@pytest.mark.slow
def test_build_failure_exits_nonzero_with_the_compiler_message(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    for name in ext.SOURCES[1:]:
        (src / name).write_text("// empty\n")
    for name in ext.HEADERS:
        (src / name).write_text("#pragma once\n")
    (src / ext.SOURCES[0]).write_text("int main() { return undefined_name_here; }\n")
    proc = _cli("build", env={"MMKERNELS_CUDA_SOURCES": str(src), "MMKERNELS_CUDA_CACHE": str(tmp_path / "cache"),
                              "TORCH_CUDA_ARCH_LIST": "9.0"}, timeout=600)
    assert proc.returncode == 1
    assert "undefined_name_here" in proc.stderr and "error" in proc.stderr
    assert "build.log" in proc.stderr
    log = next((tmp_path / "cache").glob("*/build.log"))
    assert "undefined_name_here" in log.read_text()


def test_a_builder_killed_mid_build_does_not_block_the_next(tmp_path):
    """cpp_extension's ``lock`` file outlives a builder killed mid-build (a timeout, a cancelled
    job) and would make every later build wait forever; the next builder to take the folder's
    turn removes it. The turn itself (an flock) dies with its process."""
    from mmkernels.cuda.builder import _build_turn
    code = ("import sys, time; from pathlib import Path; from mmkernels.cuda.builder import _build_turn\n"
            "with _build_turn(Path(sys.argv[1])):\n"
            "    (Path(sys.argv[1]) / 'lock').write_text('')\n    print('building', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert (tmp_path / "lock").exists()
    with _build_turn(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_importing_mmkernels_builds_and_loads_nothing():
    code = "import mmkernels, mmkernels.cuda as c, torch; print(c.builder._status is None, hasattr(torch.ops.mmkernels, 'cuda_gated_sum_fwd'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "False"], out.stderr


def test_build_key_follows_sources_and_architectures(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    k0 = ext.build_key(src)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    k1 = ext.build_key(src)
    (src / "gated_sum.cu").write_text((src / "gated_sum.cu").read_text() + "\n// changed\n")
    assert len({k0, k1, ext.build_key(src)}) == 3


def test_architectures_default_to_this_gpu_else_every_target(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ext.arch_list() == ext.DEFAULT_ARCHS == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 6), (9, 0)][i])
    assert ext.arch_list() == "8.6;9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "10.0")
    assert ext.arch_list() == "10.0"


def test_pip_cuda_headers_fill_in_only_what_nvcc_lacks(tmp_path, monkeypatch):
    """nvcc without cuBLAS / cuSPARSE headers takes those from the nvidia-* wheels, never the
    wheels' CUDA runtime or libcu++ headers (another CUDA version than nvcc's fails the build:
    "CUDA compiler and CUDA toolkit headers are incompatible")."""
    toolkit, wheels = tmp_path / "toolkit" / "include", tmp_path / "site" / "nvidia"
    for d, names in ((toolkit, ["cuda_runtime.h", "cccl/cuda/std/version"]),
                     (wheels / "cu13" / "include", ["cuda_runtime.h", "cccl/cuda/std/version", "cusparse.h",
                                                    "cublas_v2.h"])):
        for name in names:
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(f"// {d}\n")
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(__path__=[str(wheels)]))
    monkeypatch.setattr(ext.builder, "_nvcc_include", lambda home: toolkit)
    monkeypatch.setenv("MMKERNELS_CUDA_CACHE", str(tmp_path / "cache"))
    (shim,) = map(Path, ext.include_dirs())
    assert sorted(p.name for p in shim.iterdir()) == ["cublas_v2.h", "cusparse.h"]
    assert (shim / "cusparse.h").read_text() == f"// {wheels / 'cu13' / 'include'}\n"
    assert ext.include_dirs() == [str(shim)]  # a second call finds the links in place
    (toolkit / "cusparse.h").write_text("")
    assert ext.include_dirs() == []            # a full toolkit needs nothing else


def test_the_glue_files_host_compile_finds_nvccs_own_headers(tmp_path, monkeypatch):
    """The glue files (csrc/*_ops.cpp) are compiled by the host compiler and include ATen's CUDA
    headers: where CUDA_HOME is a folder without the toolkit's headers (nvcc on PATH through a
    wrapper, CUDA_HOME ``/usr/local``), the folder nvcc reports is added; a CUDA_HOME with its own
    headers needs nothing."""
    from torch.utils import cpp_extension
    toolkit = tmp_path / "toolkit" / "include"
    toolkit.mkdir(parents=True)
    (toolkit / "cuda_runtime.h").write_text("")
    home = tmp_path / "usr-local"
    (home / "include").mkdir(parents=True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setattr(ext.builder, "_nvcc_include", lambda h: toolkit if h == str(home) else None)
    assert ext.builder.toolkit_include_dirs() == [str(toolkit)]
    (home / "include" / "cuda_runtime.h").write_text("")
    assert ext.builder.toolkit_include_dirs() == []
    (home / "include" / "cuda_runtime.h").unlink()
    monkeypatch.setattr(ext.builder, "_nvcc_include", lambda h: None)     # no nvcc: the build says so
    assert ext.builder.toolkit_include_dirs() == []


def test_an_ahead_of_time_library_for_other_sources_or_another_torch_is_passed_over(tmp_path, monkeypatch):
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    key = tmp_path / "_C.sources"
    monkeypatch.setattr(ext.builder, "PACKAGE", tmp_path)
    monkeypatch.setattr(ext.builder, "AOT_KEY", key)
    key.write_text(ext.aot_key(ext.csrc_dir()))
    assert ext.builder._aot_library() == str(tmp_path / "_C.cpython-311-x86_64-linux-gnu.so")
    key.write_text(ext.aot_key(ext.csrc_dir()).replace(torch.__version__, "2.99.0"))
    with pytest.warns(UserWarning, match="built for torch 2.99.0, this is torch"):
        assert ext.builder._aot_library() is None
    key.write_text("0" * 64 + "\n")
    with pytest.warns(UserWarning, match="built from other sources"):
        assert ext.builder._aot_library() is None


# --- when the library is missing ----------------------------------------------------------------

def _fake_cuda_tensor(dtype=torch.float16):
    return types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=dtype, shape=(2, 3, 8))


@pytest.fixture
def unavailable(monkeypatch):
    """This process as if nvcc were absent: the load fails with that reason."""
    from torch.utils import cpp_extension
    monkeypatch.setattr(ext.builder, "_status", None)
    monkeypatch.setattr(ext.dispatch, "_warned", False)
    monkeypatch.setattr(ext.builder, "_load_prebuilt", lambda: None)
    monkeypatch.setattr(ext.builder, "_aot_library", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)


def test_without_nvcc_auto_warns_once_and_moves_on(unavailable):
    with pytest.warns(UserWarning) as rec:
        first = ext.why_not(_fake_cuda_tensor(), explicit=False)
        second = ext.why_not(_fake_cuda_tensor(), explicit=False)
    assert first == second and "nvcc was not found" in first
    msgs = [str(w.message) for w in rec if "unavailable" in str(w.message)]
    assert len(msgs) == 1 and "uses the Triton kernels instead" in msgs[0]


def test_without_nvcc_explicit_cuda_raises_with_the_reason(unavailable):
    from mmkernels.ops.gated_sum import IMPLS
    with pytest.raises(mmkernels.BackendError, match="backend 'cuda' cannot run.*nvcc was not found"):
        mmkernels.backend.select("gated_sum", IMPLS, "cuda", h_pre=_fake_cuda_tensor(), z=None, modality_mask=None)


def test_build_failure_is_reported_with_the_log_path(monkeypatch, tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    for name in ext.SOURCES + ext.HEADERS:
        (src / name).write_text("#error broken on purpose\n")
    monkeypatch.setenv("MMKERNELS_CUDA_SOURCES", str(src))
    monkeypatch.setenv("MMKERNELS_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(ext.builder, "_status", None)
    monkeypatch.setattr(ext.dispatch, "_warned", False)
    monkeypatch.setattr(ext.builder, "_load_prebuilt", lambda: None)
    monkeypatch.setattr(ext.builder, "_aot_library", lambda: None)
    with pytest.warns(UserWarning) as rec:
        reason = ext.why_not(_fake_cuda_tensor(), explicit=False)
    assert "build.log" in reason
    assert any("build.log" in str(w.message) and "Triton" in str(w.message) for w in rec)


def test_cpu_tensors_never_reach_the_extension():
    assert ext.why_not(torch.ones(1), explicit=True) == "needs CUDA tensors, got cpu"
    x = torch.randn(2, 3)
    with mmkernels.use_backend("cuda"), pytest.raises(mmkernels.BackendError, match="needs CUDA tensors"):
        mmkernels.norm_concat([x])


def test_fp64_is_refused_before_loading():
    assert "float64" in ext.why_not(_fake_cuda_tensor(torch.float64), explicit=True)


# --- auto: the measured table ---------------------------------------------------------------------

def _results(name, rows):
    return {"machine": {"name": name}, "rows": [dict(op=o, case=c, mode="fwd", dtype="bfloat16", provider=p, ms=ms,
                                                      error=None) for o, c, p, ms in rows]}


def test_dispatch_table_picks_the_lower_geometric_mean():
    res = _results("NVIDIA H200", [("gated_sum", "a", "cuda", 1.0), ("gated_sum", "a", "triton", 2.0),
                                   ("gated_sum", "b", "cuda", 3.0), ("gated_sum", "b", "triton", 2.0),
                                   ("norm_concat", "a", "cuda", 2.0), ("norm_concat", "a", "triton", 1.0),
                                   ("attention_pool", "a", "cuda", 1.0)])       # no triton row: no verdict
    table = ext.make_table([res])
    assert table["ops"] == {"gated_sum": {"NVIDIA H200": "cuda"}, "norm_concat": {"NVIDIA H200": "triton"}}
    assert table["evidence"]["gated_sum"]["NVIDIA H200"]["rows"] == 2


def test_table_command_writes_what_auto_reads(tmp_path):
    res = tmp_path / "results.json"
    res.write_text(json.dumps(_results("GPU X", [("gated_sum", "a", "cuda", 1.0), ("gated_sum", "a", "triton", 2.0)])))
    out = tmp_path / "table.json"
    proc = _cli("table", str(res), "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["ops"] == {"gated_sum": {"GPU X": "cuda"}}


def test_preferred_reads_the_table_per_gpu(monkeypatch, tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"ops": {"gated_sum": {"GPU X": "cuda", "*": "triton"}}}))
    monkeypatch.setattr(ext.dispatch, "TABLE", table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    assert ext.preferred("gated_sum", _fake_cuda_tensor()) == "cuda"
    assert ext.preferred("norm_concat", _fake_cuda_tensor()) == "triton"       # not measured
    assert ext.preferred("gated_sum", torch.ones(1)) == "triton"               # CPU tensors
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU Y")
    assert ext.preferred("gated_sum", _fake_cuda_tensor()) == "triton"         # the "*" entry


def test_a_gpu_without_its_own_measurement_takes_its_chip_class_verdict(monkeypatch, tmp_path):
    # an H100 where only an H200 was measured: the Hopper verdict; an A100: the "*" entry or triton
    res = _results("NVIDIA H200", [("gated_sum", "a", "cuda", 1.0), ("gated_sum", "a", "triton", 2.0)])
    res["provenance"] = {"sm": "9.0"}
    made = ext.make_table([res])
    assert made["ops"] == {"gated_sum": {"NVIDIA H200": "cuda", "class:hopper": "cuda"}}
    assert made["evidence"]["gated_sum"]["class:hopper"]["from"] == "NVIDIA H200"
    table = tmp_path / "t.json"
    table.write_text(json.dumps(made))
    monkeypatch.setattr(ext.dispatch, "TABLE", table)
    assert ext.measured_classes() == {"hopper": ["NVIDIA H200"]}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ext.preferred("gated_sum", _fake_cuda_tensor()) == "cuda"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert ext.preferred("gated_sum", _fake_cuda_tensor()) == "triton"
    assert [ext.gpu_class(*c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (7, 5))] == \
        ["ampere/ada"] * 3 + ["hopper", "blackwell", "blackwell", None]


def test_the_table_is_read_once_per_process(monkeypatch, tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"ops": {"gated_sum": {"GPU X": "cuda"}}}))
    monkeypatch.setattr(ext.dispatch, "TABLE", table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    reads = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self) or real(self, *a, **k))
    assert [ext.preferred("gated_sum", _fake_cuda_tensor()) for _ in range(5)] == ["cuda"] * 5
    table.write_text(json.dumps({"ops": {}}))        # a later change is not seen by this process
    assert ext.preferred("gated_sum", _fake_cuda_tensor()) == "cuda"
    assert reads.count(table) == 1


def test_the_committed_table_is_well_formed():
    from mmkernels.ops import OPS
    table = json.loads(ext.TABLE.read_text())
    for op, per_gpu in table["ops"].items():
        assert op in OPS
        assert set(per_gpu.values()) <= set(ext.dispatch.CANDIDATES)
        assert set(per_gpu) == set(table["evidence"][op])       # every verdict has its measurement
        if "torch" in per_gpu.values():     # a plain-formulation verdict only where auto can take it on a GPU
            assert "cuda" in OPS[op].OP.plain_devices, op


def test_dispatch_table_can_choose_the_reference_where_it_beat_the_kernels():
    # TFN on an H200: its Triton kernels lost to plain cuBLAS; a measured reference row lets auto
    # take it, and triton stays where the reference was slower or not measured
    res = _results("NVIDIA H200", [("tensor_fusion", "a", "triton", 9.8), ("tensor_fusion", "a", "reference", 1.0),
                                   ("low_rank_fusion", "a", "triton", 1.0), ("low_rank_fusion", "a", "reference", 2.0),
                                   ("latent_pool", "a", "triton", 1.0)])
    table = ext.make_table([res])
    assert table["ops"] == {"tensor_fusion": {"NVIDIA H200": "reference"}, "low_rank_fusion": {"NVIDIA H200": "triton"}}
    assert table["evidence"]["tensor_fusion"]["NVIDIA H200"]["reference_over_triton"] < 1


def test_dispatch_table_can_choose_the_plain_formulation_where_it_beat_the_kernels():
    res = _results("NVIDIA H200", [("concat_linear", "a", "triton", 2.0), ("concat_linear", "a", "torch", 1.0),
                                   ("concat_linear", "a", "reference", 1.5)])
    table = ext.make_table([res])
    assert table["ops"] == {"concat_linear": {"NVIDIA H200": "torch"}}
    assert table["evidence"]["concat_linear"]["NVIDIA H200"]["torch_over_triton"] == 0.5


def test_auto_tries_the_table_choice_first_then_the_usual_order(monkeypatch):
    from mmkernels import backend
    monkeypatch.setattr(ext.dispatch, "preferred", lambda op, t: {"a": "reference", "b": "cuda"}.get(op, "triton"))
    monkeypatch.setattr(ext, "preferred", ext.dispatch.preferred)
    assert backend.auto_order("a", {}) == ("reference", "triton", "cuda")
    assert backend.auto_order("b", {}) == ("cuda", "triton", "reference")
    assert backend.auto_order("c", {}) == ("triton", "cuda", "reference")


# --- the C++ Meta implementations -----------------------------------------------------------------

def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_meta_kernels_give_the_output_shapes(built):
    ops = torch.ops.mmkernels
    out = ops.cuda_norm_concat_fwd([_meta(4, 5, 7), _meta(4, 5, 9)], [_meta(7), None],
                                   [None, _meta(9, dtype=torch.float32)], False, 1e-5)
    assert out.shape == (4, 5, 16) and out.dtype == torch.bfloat16
    grads = ops.cuda_norm_concat_bwd(_meta(4, 5, 16), [_meta(4, 5, 7), _meta(4, 5, 9)], [_meta(7), None],
                                     [None, _meta(9, dtype=torch.float32)], False, 1e-5)
    assert [(tuple(g.shape), g.dtype) for g in grads] == [((4, 5, 7), torch.bfloat16), ((4, 5, 9), torch.bfloat16),
                                                          ((7,), torch.bfloat16), ((9,), torch.float32)]
    out, lse = ops.cuda_attention_pool_fwd(_meta(3, 10, 64), None, _meta(1, 2, 4, 16), None, None, 10, 0.25)
    assert out.shape == (3, 2, 64) and lse.shape == (3, 2, 4) and lse.dtype == torch.float32
    out, lse = ops.cuda_attention_pool_fwd(_meta(30, 64), None, _meta(1, 2, 4, 16), None,
                                           _meta(5, dtype=torch.int32), 10, 0.25)
    assert out.shape == (4, 2, 64) and lse.shape == (4, 2, 4)
    grads = ops.cuda_attention_pool_bwd(_meta(3, 2, 64), _meta(3, 10, 64), _meta(3, 10, 64), _meta(3, 2, 4, 16),
                                        None, None, out[:3], lse[:3], 10, 0.25)
    assert [tuple(g.shape) for g in grads] == [(3, 10, 64), (3, 2, 4, 16), (3, 10, 64)]
    assert ops.cuda_gated_sum_fwd(_meta(5, 6, 3, 8), _meta(5, 6, 3), None).shape == (5, 6, 8)
    grads = ops.cuda_gated_sum_bwd(_meta(5, 6, 8), _meta(5, 6, 3, 8), _meta(5, 6, 3, 8), _meta(5, 6, 3, dtype=torch.bool))
    assert [tuple(g.shape) for g in grads] == [(5, 6, 3, 8), (5, 6, 3, 8)]


def _three_ops(xs, x, q, lengths, h_pre, z, mask):
    a = mmkernels.norm_concat(xs, weights=[torch.ones_like(xs[0][0]), None])
    b = mmkernels.attention_pool(x, q, lengths)
    c = mmkernels.gated_sum(h_pre, z, mask)
    return a, b, c


def test_declared_shapes_agree_with_the_cpp_meta_kernels(built):
    # the ops declare their outputs' shapes once (their fakes); the C++ Meta implementations of the
    # cuda_* kernels must agree with them
    from mmkernels.ops import attention_pool as ap, gated_sum as gs, norm_concat as nc
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, device="meta", dtype=dtype)  # noqa: E731
    xs, w = [meta(6, 10), meta(6, 12)], [meta(10), None]
    got = torch.ops.mmkernels.cuda_norm_concat_fwd(xs, w, [None, None], False, 1e-5)
    assert got.shape == nc.OP._fake(xs, [w[0]], [], [True, False], [False, False], False, 1e-5).shape
    x, q, ln = meta(6, 9, 32), meta(1, 3, 2, 16), meta(6, dtype=torch.int64)
    got = torch.ops.mmkernels.cuda_attention_pool_fwd(x, None, q, ln, None, 9, 0.25)
    want = ap.OP._fake(x, None, q, ln, None, 9, 0.25)
    assert [(g.shape, g.dtype) for g in got] == [(t.shape, t.dtype) for t in want]
    h, z = meta(6, 3, 20), meta(6, 3)
    assert torch.ops.mmkernels.cuda_gated_sum_fwd(h, z, None).shape == gs.OP._fake(h, z, None).shape


def _inputs():
    xs = [torch.randn(6, 10), torch.randn(6, 12)]
    x, q = torch.randn(6, 9, 32), torch.randn(3, 2, 16)
    lengths = torch.tensor([0, 9, 3, 4, 5, 6])
    h_pre, z, mask = torch.randn(6, 3, 20), torch.randn(6, 3), torch.rand(6, 3) > 0.3
    return xs, x, q, lengths, h_pre, z, mask


def test_fullgraph_compile_with_the_cuda_backend_traces_one_graph(built):
    """torch.compile(fullgraph=True) with backend "cuda" selected: one graph, whose fake outputs
    (the ops' declared shapes) are right. The graph is only traced: this machine has no GPU to run
    it on."""
    graphs = []

    def shape_only(gm, example_inputs):
        graphs.append(gm)
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        shapes = [tuple(o.meta["example_value"].shape) for o in out]

        def run(*args):
            return tuple(torch.zeros(s) for s in shapes)
        return run

    torch._dynamo.reset()
    with mmkernels.use_backend("cuda"):
        a, b, c = torch.compile(_three_ops, fullgraph=True, backend=shape_only)(*_inputs())
    assert len(graphs) == 1
    assert a.shape == (6, 22) and b.shape == (6, 3, 32) and c.shape == (6, 20)
    names = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"mmkernels.norm_concat.default", "mmkernels.attention_pool.default",
            "mmkernels.gated_sum.default"} <= names
    torch._dynamo.reset()


def test_fake_tensor_backward_with_the_cuda_backend_uses_the_meta_kernels(built):
    """Forward and backward traced with fake tensors (make_fx): every registered op, forward and
    backward, runs its C++ Meta implementation when "cuda" is selected."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(xs, x, q, lengths, h_pre, z, mask):
        leaves = [*xs, x, q, h_pre, z]
        a, b, c = _three_ops(xs, x, q, lengths, h_pre, z, mask)
        loss = a.sum() + b.sum() + c.sum()
        return torch.autograd.grad(loss, leaves)

    ins = list(_inputs())
    ins[3] = None  # lengths on CPU tensors are range-checked by value: not traceable with fake tensors
    ins[0] = [t.requires_grad_() for t in ins[0]]
    for i in (1, 2, 4, 5):
        ins[i].requires_grad_()
    with mmkernels.use_backend("cuda"):
        gm = make_fx(f, tracing_mode="fake")(*ins)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("norm_concat", "attention_pool", "gated_sum"):
        assert f"mmkernels.{op}.default" in targets and f"mmkernels.{op}_backward.default" in targets
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    leaves = [*ins[0], ins[1], ins[2], ins[4], ins[5]]
    assert [tuple(o.meta["val"].shape) for o in out] == [tuple(t.shape) for t in leaves]


# --- every kernel against the reference: on the CPU emulator here, on a GPU where there is one ----

@pytest.fixture(params=["emulator", pytest.param("gpu", marks=gpu)])
def dev(request):
    """Where the csrc/ kernels run: ``"cpu"`` through the CPU emulator (csrc/emu/simt.h, built
    with g++; every CUDA thread a host thread) or ``"cuda"`` on the GPU."""
    with kernels_on("cuda" if request.param == "gpu" else "cpu") as device:
        yield device


@contextlib.contextmanager
def kernels_on(device: str):
    """The csrc/ kernels loaded for tensors on ``device``: ``"cuda"`` (the GPU) or ``"cpu"`` (the
    CPU emulator, inside this block); yields ``device``."""
    if device == "cuda":
        assert ext.load() is None, f"the CUDA extension did not build or load: {ext.load()}"
        yield "cuda"
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ext.EMULATE_VAR, "1")
        mp.setattr(ext.builder, "_status", None)
        mp.setattr(ext.dispatch, "_warned", False)
        reason = ext.load()
        assert reason is None, f"the CPU emulation of the CUDA kernels did not build or load: {reason}"
        yield "cpu"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the `dev` fixture is set up once per test, not per example: the same device for every example
SWEEP = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
# the ops' test modules (their ``check``), imported here and not inside a sweep's example: a module
# with @given tests imported while an example runs trips hypothesis's nested-@given health check
_OP_TESTS = {name: importlib.import_module(f"test_{name}") for name in ("gated_sum", "norm_concat", "attention_pool")}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims,lead", [((768, 1024, 512), (33,)), ((7, 33, 129), (5, 3)), ((4096, 300), (17,)),
                                       ((16384,), (4,)), ((64,) * 9, (11,)), ((3000,), (6,)),
                                       # per-modality launch classes: wide 16-byte, cached 16-byte,
                                       # unaligned (scalar) wide and cached, in one group
                                       ((2048, 296, 300, 5), (9,))])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", [True, False])
def test_cuda_kernel_norm_concat_matches_reference(dev, dtype, dims, lead, norm, affine):
    from test_norm_concat import check
    check("cuda", dims, lead, dtype, dev, rms=norm == "rmsnorm", affine=affine)


def test_cuda_kernel_norm_concat_fp32_params_views_and_empty(dev):
    from test_norm_concat import VIEWS, check, run
    check("cuda", (40, 24), (9,), torch.float16, dev, wdtype=torch.float32)
    check("cuda", (40, 24), (9,), torch.bfloat16, dev, wdtype=torch.float32, rms=True)
    for view in VIEWS.values():
        check("cuda", (9, 20), (4, 3), torch.bfloat16, dev, views=view)
    xs = [torch.randn(0, 8, device=dev, requires_grad=True)]
    out, grads = run("cuda", xs, [None], [None], False, torch.randn(0, 8, device=dev))
    assert out.shape == (0, 8) and grads[0].shape == (0, 8)


def test_cuda_kernel_norm_concat_takes_strided_weights_and_biases(dev):
    # parameters that are views (every other element of a buffer): the kernels get them contiguous
    from test_norm_concat import expected, run
    from mmkernels.testing import assert_close
    dims = (24, 40)
    xs = [torch.randn(6, d, device=dev, requires_grad=True) for d in dims]
    ws = [torch.randn(2 * d, device=dev)[::2].requires_grad_() for d in dims]
    bs = [torch.randn(2 * d, device=dev)[::2].requires_grad_() for d in dims]
    dy = torch.randn(6, sum(dims), device=dev)
    out, grads = run("cuda", xs, ws, bs, False, dy)
    ref, ref_grads = expected(xs, ws, bs, False, dy=dy)
    assert_close(out, ref, torch.float32, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "grad", scale=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [dict(B=4, L=37, H=2, Dh=64), dict(B=3, L=200, H=4, Dh=32, Q=5),
                                   dict(B=2, L=1000, H=1, Dh=128, Q=2, per_sample=True),
                                   dict(B=5, L=16, H=3, Dh=80, Q=3, key=True), dict(B=2, L=70, H=2, Dh=256, Q=1),
                                   dict(B=3, L=20, H=2, Dh=7, Q=64, lengths=None),
                                   dict(B=1, L=4096, H=2, Dh=128, lengths="full")])
def test_cuda_kernel_attention_pool_matches_reference(dev, dtype, shape):
    from test_attention_pool import check
    kw = dict(shape)
    check("cuda", kw.pop("B"), kw.pop("L"), kw.pop("H"), kw.pop("Dh"), kw.pop("Q", None), dtype=dtype, device=dev,
          **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("with_key", [False, True])
def test_cuda_kernel_attention_pool_varlen_matches_padded(dev, dtype, per_sample, with_key):
    from test_attention_pool import packed_from
    from mmkernels.testing import assert_close
    B, L, H, Dh, Q = 5, 90, 2, 64, 3
    x = torch.randn(B, L, H * Dh, device=dev, dtype=dtype)
    k = torch.randn_like(x) if with_key else None
    ln = torch.tensor([0, 90, 1, 45, 77], device=dev)
    q = torch.randn(*((B, Q, H, Dh) if per_sample else (Q, H, Dh)), device=dev, dtype=dtype)
    xp, cu = packed_from(x, ln)
    kp = packed_from(k, ln)[0] if with_key else None
    leaves = [t.requires_grad_() for t in (xp, q) + ((kp,) if with_key else ())]
    dy = torch.randn(B, Q, H * Dh, device=dev, dtype=dtype)
    outs = {}
    for backend in ("reference", "cuda"):
        with mmkernels.use_backend(backend):
            out = mmkernels.attention_pool_varlen(xp, cu, q, key=kp, max_seqlen=L)
        outs[backend] = (out, torch.autograd.grad(out, leaves, dy))
    assert_close(outs["cuda"][0], outs["reference"][0], dtype, "varlen out")
    for g, r in zip(outs["cuda"][1], outs["reference"][1]):
        assert_close(g, r, dtype, "varlen grad", scale=True)


def test_cuda_kernel_attention_pool_views_empty_rows_and_nan_padding(dev):
    from test_attention_pool import VIEWS, check
    for view in VIEWS.values():
        check("cuda", 3, 40, 2, 32, 2, dtype=torch.bfloat16, device=dev, views=view)
    x = torch.randn(3, 8, 64, device=dev, requires_grad=True)
    q = torch.randn(2, 32, device=dev, requires_grad=True)
    ln = torch.tensor([0, 8, 3], device=dev)
    with torch.no_grad():
        x[2, 3:] = float("nan")
    with mmkernels.use_backend("cuda"):
        out = mmkernels.attention_pool(x, q, ln)
    dx, dq = torch.autograd.grad(out.sum(), [x, q])
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()
    assert torch.equal(dx[0], torch.zeros_like(dx[0])) and torch.equal(dx[2, 3:], torch.zeros_like(dx[2, 3:]))
    assert torch.isfinite(dq).all()


def test_cuda_kernel_attention_pool_empty_batch(dev):
    x = torch.randn(0, 5, 64, device=dev, requires_grad=True)
    q = torch.randn(3, 2, 32, device=dev, requires_grad=True)
    with mmkernels.use_backend("cuda"):
        out = mmkernels.attention_pool(x, q, torch.zeros(0, dtype=torch.long, device=dev))
        packed = mmkernels.attention_pool_varlen(torch.randn(0, 64, device=dev), torch.zeros(1, dtype=torch.int32,
                                                 device=dev), q, max_seqlen=0)
    dx, dq = torch.autograd.grad(out.sum(), [x, q])
    assert out.shape == (0, 3, 64) and packed.shape == (0, 3, 64)
    assert dx.shape == x.shape and torch.equal(dq, torch.zeros_like(q))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,m,h", [((64,), 3, 1024), ((5, 7), 2, 40), ((33,), 5, 300), ((9,), 8, 96), ((4,), 32, 17),
                                      ((3,), 3, 1)])
@pytest.mark.parametrize("feature", [True, False])
@pytest.mark.parametrize("mask", [None, "random"])
def test_cuda_kernel_gated_sum_matches_reference(dev, dtype, lead, m, h, feature, mask):
    from test_gated_sum import check
    check("cuda", lead, m, h, dtype, dev, feature=feature, mask=mask)


def test_cuda_kernel_gated_sum_views_and_nan_at_absent_modalities(dev):
    from test_gated_sum import VIEWS, check
    for name, view in VIEWS.items():
        check("cuda", (11,), 3, 64, torch.bfloat16, dev, views=view)
    h, z = torch.randn(4, 3, 16, device=dev), torch.randn(4, 3, 16, device=dev)
    mask = torch.tensor([[True, False, True]] * 4, device=dev)
    h[:, 1], z[:, 1] = float("nan"), float("nan")
    h.requires_grad_(), z.requires_grad_()
    with mmkernels.use_backend("cuda"):
        out = mmkernels.gated_sum(h, z, mask)
    dh, dz = torch.autograd.grad(out.sum(), [h, z])
    assert torch.isfinite(out).all() and torch.isfinite(dh).all() and torch.isfinite(dz).all()


@SWEEP
@given(m=st.integers(1, 6), h=st.integers(1, 300), rows=st.integers(0, 40), feature=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_cuda_kernel_gated_sum_shape_sweep(dev, m, h, rows, feature, dtype):
    check = _OP_TESTS["gated_sum"].check
    check("cuda", (rows,), m, h, dtype, dev, feature=feature)


@SWEEP
@given(dims=st.lists(st.integers(1, 700), min_size=1, max_size=4), rows=st.integers(0, 50),
       norm=st.sampled_from(["layernorm", "rmsnorm"]), dtype=st.sampled_from(DTYPES))
def test_cuda_kernel_norm_concat_shape_sweep(dev, dims, rows, norm, dtype):
    check = _OP_TESTS["norm_concat"].check
    check("cuda", tuple(dims), (rows,), dtype, dev, rms=norm == "rmsnorm")


@SWEEP
@given(B=st.integers(1, 6), L=st.integers(1, 300), H=st.integers(1, 4), Dh=st.sampled_from([8, 16, 40, 64, 128]),
       Q=st.sampled_from([None, 1, 4]), per_sample=st.booleans(), key=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_cuda_kernel_attention_pool_shape_sweep(dev, B, L, H, Dh, Q, per_sample, key, dtype):
    check = _OP_TESTS["attention_pool"].check
    check("cuda", B, L, H, Dh, Q, dtype=dtype, device=dev, per_sample=per_sample and Q is not None, key=key)


def test_cuda_kernel_attention_pool_shared_memory_need_is_checked_before_launch(dev, monkeypatch):
    """A shape whose blocks need more shared memory than the GPU gives is refused by the backend's
    why_not (auto moves on, an explicit request raises with the numbers), never a launch error."""
    from mmkernels.backend import BackendError
    x = torch.randn(2, 9, 4 * 128, device=dev, dtype=torch.float16)
    q = torch.randn(64, 4, 128, device=dev, dtype=torch.float16)
    fwd, bwd = ext.ops().cuda_attention_pool_smem(64, 128, 2, False)
    assert 0 < fwd <= bwd  # the backward keeps dout and dq next to q
    fwd_k, bwd_k = ext.ops().cuda_attention_pool_smem(64, 128, 2, True)
    assert fwd_k > fwd and bwd_k > bwd  # a distinct key gets its own tile
    monkeypatch.setattr(ext, "shared_memory_per_block", lambda device: bwd)
    with mmkernels.use_backend("cuda"):
        mmkernels.attention_pool(x, q)  # exactly enough
    monkeypatch.setattr(ext, "shared_memory_per_block", lambda device: bwd - 1)
    with mmkernels.use_backend("cuda"), pytest.raises(BackendError, match=f"needs {bwd} bytes of shared memory"):
        mmkernels.attention_pool(x, q)


SANITIZE = """
import sys, torch, mmkernels
torch.manual_seed(0)
d = sys.argv[1]
with mmkernels.use_backend("cuda"):
    xs = [torch.randn(5, 24, device=d, dtype=torch.bfloat16, requires_grad=True), torch.randn(5, 9, device=d, dtype=torch.bfloat16, requires_grad=True)]
    w = [torch.randn(24, device=d, dtype=torch.bfloat16, requires_grad=True), None]
    mmkernels.norm_concat(xs, w).sum().backward()
    x = torch.randn(3, 37, 64, device=d, dtype=torch.float16, requires_grad=True)
    q = torch.randn(2, 2, 32, device=d, dtype=torch.float16, requires_grad=True)
    mmkernels.attention_pool(x, q, torch.tensor([0, 37, 5], device=d)).float().sum().backward()
    cu = torch.tensor([0, 10, 10, 37], device=d, dtype=torch.int32)
    mmkernels.attention_pool_varlen(x.detach()[0].requires_grad_(), cu, q, max_seqlen=27).float().sum().backward()
    h = torch.randn(7, 3, 40, device=d, requires_grad=True)
    z = torch.randn(7, 3, device=d, requires_grad=True)
    mmkernels.gated_sum(h, z, torch.rand(7, 3, device=d) > 0.3).sum().backward()
    if d == "cuda":
        torch.cuda.synchronize()
print("ok")
"""


def test_emulated_kernels_pass_address_sanitizer():
    """The memcheck of machines without a GPU: the emulator built with AddressSanitizer
    (MMKERNELS_CUDA_EMULATE=asan; shared memory allocated to the byte) runs one small case of
    every kernel; a read or write past a tensor or past the block's shared memory aborts it."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert Path(libasan).is_file(), f"g++ has no AddressSanitizer runtime ({libasan!r})"
    proc = subprocess.run([sys.executable, "-c", SANITIZE, "cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT), ext.EMULATE_VAR: "asan",
                                            "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0"})
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


ONE_BLOCK = """
import sys, torch
sys.path.insert(0, "tests")
import conftest  # noqa: F401  (before mmkernels: it decides TRITON_INTERPRET)
from test_norm_concat import check
check("cuda", (768, 1024, 40), (33,), torch.bfloat16, sys.argv[1])
check("cuda", (512, 256), (9,), torch.float32, sys.argv[1], rms=True)
print("ok")
"""


@pytest.mark.parametrize("where", ["emulator", pytest.param("gpu", marks=gpu)])
def test_cuda_norm_concat_backward_with_one_block_per_sm(where):
    """MMKERNELS_NORM_CONCAT_BWD_BLOCKS=1 (read once per process) launches the cached backward
    variants built with __launch_bounds__(256, 1): the same results."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMKERNELS_NORM_CONCAT_BWD_BLOCKS": "1"}
    if where == "emulator":
        env[ext.EMULATE_VAR] = "1"
    proc = subprocess.run([sys.executable, "-c", ONE_BLOCK, "cpu" if where == "emulator" else "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


@pytest.mark.usefixtures("built")
def test_gpu_compute_sanitizer_memcheck():
    from torch.utils import cpp_extension
    tool = shutil.which("compute-sanitizer") or (
        str(Path(cpp_extension.CUDA_HOME) / "bin" / "compute-sanitizer") if cpp_extension.CUDA_HOME else None)
    if tool is None or not Path(tool).exists():
        pytest.skip("compute-sanitizer is not installed on this GPU machine")
    proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", SANITIZE, "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]


# every test_gpu_* above needs a GPU
for _name, _fn in list(globals().items()):
    if _name.startswith("test_gpu_") and callable(_fn):
        for _mark in gpu:
            _fn = _mark(_fn)
        globals()[_name] = _fn
