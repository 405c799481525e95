"""Every Triton kernel of the package compiles ahead of time, without a GPU, for every GPU target
the package supports (:data:`mmkernels.runtime.AOT_TARGETS`: A100 sm_80, RTX 30 / A10 sm_86,
RTX 40 / L4 sm_89, H100 / H200 sm_90, B200 sm_100, RTX 50 sm_120) with the configurations a GPU of
that class would launch (its shared memory, :data:`mmkernels.runtime.SHARED_MEMORY_PER_BLOCK`):
a kernel that only the interpreter accepts, or only Hopper, fails here. Generic: each op folder
lists representative launches in ``aot_examples()``; a kernel with no example fails the test.

Each target is compiled once, in a subprocess, by the first test that needs it; each target is an
xdist group of its own, so the workers share the targets out."""
import functools
import json
import os
import re
import resource
import subprocess
import sys
import time

import pytest

from mmkernels import runtime

TARGETS = runtime.AOT_TARGETS
AMPERE_ADA = (80, 86, 89)          # no TMA, no wgmma: tensor descriptors lowered to plain loads


def _target(arch):
    return pytest.param(arch, id=f"sm_{arch}", marks=pytest.mark.xdist_group(f"aot_sm{arch}"))


pytestmark = pytest.mark.slow
ALL = pytest.mark.parametrize("arch", [_target(a) for a in TARGETS], scope="module")
sm90 = pytest.mark.xdist_group("aot_sm90")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@functools.lru_cache(maxsize=None)
def _compile(arch: int):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MMKERNELS_AUTOTUNE"] = "1"  # compile every configuration a GPU's autotuner may pick
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.run([sys.executable, "-c", "from mmkernels.testing import aot_main; aot_main()", str(arch)],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout)
    print(f"sm_{arch}: {len(rows)} configurations compiled in {time.perf_counter() - start:.0f} s "
          f"({_children_cpu() - cpu:.0f} s of CPU)")
    return rows


@pytest.fixture(scope="module")
def compiled(arch):
    return _compile(arch)


def _compiled_ok(rows):
    return [r for r in rows if "error" not in r]


def test_every_target_has_its_shared_memory_limit():
    assert set(TARGETS) == {80, 86, 89, 90, 100, 120}
    assert runtime.SHARED_MEMORY_PER_BLOCK[86] == runtime.SHARED_MEMORY_PER_BLOCK[120] == 101376
    assert runtime.SHARED_MEMORY_PER_BLOCK[90] == runtime.SHARED_MEMORY_PER_BLOCK[100] == 232448
    with runtime.compile_target(86):
        assert runtime.shared_memory_limit(None) == 101376
    assert runtime.shared_memory_limit(None) is None     # no chip: nothing to fit


@ALL
def test_every_kernel_and_configuration_compiles(compiled, arch):
    from mmkernels.ops import OPS
    with_kernels = {name for name, op in OPS.items() if runtime.kernels_of(op.triton_impl)}
    assert set(OPS) - with_kernels == {"tensor_fusion"}      # the blocked cuBLAS path: no Triton kernel
    assert {r["op"] for r in compiled} == with_kernels
    failed = [(r["op"], r["example"], r["kernel"], r["config"], r["error"][-600:]) for r in compiled if "error" in r]
    assert not failed, failed
    assert all(r["target"] == f"sm_{arch}" and r["ptx_bytes"] > 0 for r in compiled)


@ALL
def test_triton_launcher_packs_every_kernel_and_configuration(compiled, arch):
    # aot_compile_all built Triton's NVIDIA launcher for each compiled kernel and configuration
    # and packed the launch's arguments through it (it raises otherwise): each row records it.
    # Off-Hopper the GEMM's tensor descriptors become plain loads, and the launcher still takes them.
    rows = _compiled_ok(compiled)
    assert rows and all(r["launcher_args"] > 0 for r in rows)
    gemm = [r for r in rows if r["kernel"] == "_concat_linear_gemm_kernel"]
    assert gemm
    if arch in AMPERE_ADA:
        assert not any(r["tma"] for r in gemm), [r for r in gemm if r["tma"]]
    if arch == 90:
        assert all(r["tma"] for r in gemm)


@ALL
def test_every_configuration_fits_the_chips_shared_memory(compiled, arch):
    # the configuration lists and pruning leave out, per chip class, what does not fit its shared
    # memory (sm_86 / sm_89 / sm_120: 99 KB a block; sm_80: 163 KB; sm_90 / sm_100: 227 KB)
    limit = runtime.SHARED_MEMORY_PER_BLOCK[arch]
    over = [(r["op"], r["example"], r["kernel"], r["config"], r["shared"]) for r in _compiled_ok(compiled)
            if r["shared"] > limit]
    assert not over, over


def _known_spill(r) -> bool:
    # the label: "(known spill in <kernel>[, <kernel>...]: <why>)"
    m = re.search(r"\(known spill in ([\w, ]+):", r["example"])
    return bool(m) and r["kernel"] in [k.strip() for k in m.group(1).split(",")]


# Spills off Hopper, per target: kernel -> (most bytes seen, why it stays). Those kernels compile
# and pack there and are checked like every other; the spills cost speed on chips none of these
# kernels has been timed on (the GPU check runs on H100/H200). An entry whose kernel no longer
# spills on its target fails the test: drop it.
_GEMM_OFF_HOPPER = ("the TMA GEMM's configurations below sm_90 (descriptor loads become loads staged in "
                    "registers); auto takes cuBLAS for concat_linear on every GPU")
_SMALL = "a few bytes in one configuration of a memory-bound kernel"
OFF_HOPPER_SPILLS = {
    80: {"_concat_linear_gemm_kernel": (1224, _GEMM_OFF_HOPPER), "_gated_sum_bwd_kernel": (12, _SMALL),
         "_gated_sum_fwd_kernel": (16, _SMALL), "_lp_fwd_kernel": (20, _SMALL),
         "_lp_bwd_kernel": (48, "the fp32 64-query tile (FMA products)")},
    86: {"_concat_linear_gemm_kernel": (808, _GEMM_OFF_HOPPER), "_gated_sum_bwd_kernel": (12, _SMALL),
         "_lp_fwd_kernel": (32, _SMALL)},
    89: {"_concat_linear_gemm_kernel": (808, _GEMM_OFF_HOPPER), "_gated_sum_bwd_kernel": (12, _SMALL),
         "_lp_fwd_kernel": (32, _SMALL)},
    100: {"_concat_linear_gemm_kernel": (24, _SMALL), "_attn_pool_bwd_kernel": (16, "the fp32 Dh 256 tile")},
    120: {"_concat_linear_gemm_kernel": (120, _GEMM_OFF_HOPPER), "_gated_sum_bwd_kernel": (8, _SMALL),
          "_lp_fwd_kernel": (8, _SMALL)},
}


# Spills of newer Triton releases than the pinned one (the newest-release check, tools/newest.sh),
# per (major, minor) and target: kernel -> (most bytes seen, why it stays). Checked like
# OFF_HOPPER_SPILLS, with the release's own compiler.
NEWER_TRITON_SPILLS = {
    (3, 9): {90: {"_gated_sum_bwd_kernel": (8, "one modality-gate configuration (BLOCK_H 128, 8 rows, 8 warps), "
                                               "allocated 64 registers by this release"),
                  "_lp_fwd_kernel": (72, "the fp16 per-sample example's tile (255 registers), in this release")}},
}


def _triton_release():
    import triton
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def _listed_spills(arch):
    return {**OFF_HOPPER_SPILLS.get(arch, {}), **NEWER_TRITON_SPILLS.get(_triton_release(), {}).get(arch, {})}


@ALL
def test_no_register_spills_except_known_ones(compiled, arch):
    # Known limits, labelled "(known spill in <kernel>: ...)" in their example: the norm_concat
    # backward for rows of 8192+ features, the attention_pool fp32 backward for Dh > 128; and, off
    # Hopper, OFF_HOPPER_SPILLS, and under a newer Triton than the pin, NEWER_TRITON_SPILLS (no more
    # bytes than listed). Every other kernel and configuration must fit its registers, on every target.
    rows = _compiled_ok(compiled)
    assert all(r["n_regs"] for r in rows)
    listed = _listed_spills(arch)
    spills = [(r["op"], r["example"], r["kernel"], r["config"], r["spill_bytes"]) for r in rows
              if r["spill_bytes"] and not _known_spill(r)
              and not (r["kernel"] in listed and r["spill_bytes"] <= listed[r["kernel"]][0])]
    assert not spills, spills
    gone = [k for k in listed if not any(r["spill_bytes"] for r in rows if r["kernel"] == k and not _known_spill(r))]
    assert not gone, f"sm_{arch}: no longer spills, drop from OFF_HOPPER_SPILLS / NEWER_TRITON_SPILLS: {gone}"
    if arch == 90:
        known = [r for r in rows if _known_spill(r)]
        assert known and all(r["spill_bytes"] for r in known), "a known spill is gone: drop its label"


@ALL
def test_16_bit_products_use_the_tensor_cores(compiled, arch):
    # every tl.dot on bf16 / fp16 operands is an MMA of the chip's tensor cores: mma.sync on
    # sm_80 / 86 / 89 / 120, wgmma (or mma.sync for small tiles) on sm_90, tcgen05 (or mma.sync) on
    # sm_100 — not the FMA units
    rows = [r for r in _compiled_ok(compiled) if set(r["dot_dtypes"]) & {"bf16", "f16"}]
    assert {r["op"] for r in rows} >= {"attention_pool", "concat_linear", "latent_pool"}
    assert all(r["tensor_cores"] for r in rows), [(r["example"], r["kernel"], r["config"]) for r in rows
                                                  if not r["tensor_cores"]]
    if arch in AMPERE_ADA or arch == 120:
        assert all(r["mma"] and not r["wgmma"] and not r["tcgen05"] for r in rows)


@ALL
def test_norm_concat_loads_are_16_byte_vectors(compiled, arch):
    # 768+1024+512 bf16 rows are 16-byte aligned: the kernels must use 128-bit loads
    rows = [r for r in _compiled_ok(compiled) if r["op"] == "norm_concat" and r["example"].startswith("bf16 ln 768")]
    assert {r["kernel"] for r in rows} == {"_norm_concat_fwd_kernel", "_norm_concat_bwd_kernel",
                                           "_norm_concat_dparams_kernel"}
    assert all(r["vector_loads"] for r in rows), rows


@ALL
def test_attention_pool_uses_tensor_cores_and_vector_loads(compiled, arch):
    # the bf16 Dh=128 examples: both products of the tiled kernels on the tensor cores (mma), 16-byte
    # loads of x; the 'short' forward and 'fma' backward candidates (one query per head: fp32 FMAs
    # by design) read x with 16-byte loads too
    rows = [r for r in _compiled_ok(compiled) if r["op"] == "attention_pool" and "Dh128" in r["example"]
            and r["kernel"] != "_attn_pool_combine_kernel"]
    short = {"_attn_pool_fwd_short_kernel", "_attn_pool_bwd_fma_kernel"}
    assert {r["kernel"] for r in rows} == {"_attn_pool_fwd_kernel", "_attn_pool_bwd_kernel"} | short
    tiled = [r for r in rows if r["kernel"] not in short]
    assert all(r["tensor_cores"] and r["vector_loads"] for r in tiled), tiled
    assert all(r["vector_loads"] for r in rows), rows


@ALL
def test_gated_sum_loads_are_16_byte_vectors(compiled, arch):
    # bf16 rows of H = 512 / 1024: every configuration of every kernel (both backward candidates)
    # reads with 128-bit loads
    rows = [r for r in _compiled_ok(compiled) if r["op"] == "gated_sum" and r["example"].startswith("bf16 B")
            and ("H512" in r["example"] or "H1024" in r["example"])]
    assert {r["kernel"] for r in rows} == {"_gated_sum_fwd_kernel", "_gated_sum_bwd_kernel",
                                           "_gated_sum_bwd_unrolled_kernel"}
    assert all(r["vector_loads"] for r in rows), [r for r in rows if not r["vector_loads"]]


@ALL
def test_concat_linear_gemm_uses_the_tensor_cores_on_16_bit_types(compiled, arch):
    # every configuration of the GEMM for bf16 / fp16: Hopper's warpgroup MMA with TMA on sm_90,
    # the tensor cores (mma.sync over plain loads) on sm_80 / 86 / 89
    rows = [r for r in _compiled_ok(compiled) if r["kernel"] == "_concat_linear_gemm_kernel"
            and not r["example"].startswith("fp32")]
    assert len({r["config"] for r in rows}) >= (5 if arch == 90 else 2), rows
    if arch == 90:
        assert all(r["wgmma"] and r["tma"] for r in rows), [r for r in rows if not (r["wgmma"] and r["tma"])]
    else:
        assert all(r["tensor_cores"] for r in rows), [r for r in rows if not r["tensor_cores"]]


@sm90
def test_untuned_configurations_are_compiled_too():
    # MMKERNELS_AUTOTUNE=0 and graph capture launch the untuned configurations: the capture records
    # them beside the autotuned launch, so they pass the same compile, wgmma, spill and launcher
    # checks. (64, 64, 64) with 3 stages is in the untuned list only.
    rows = [r for r in _compiled_ok(_compile(90)) if r["kernel"] == "_concat_linear_gemm_kernel"
            and r["example"].startswith("bf16")]
    untuned = [r for r in rows if "BK=64, BM=64, BN=64," in r["config"] and "num_stages=3," in r["config"]]
    assert untuned and all(r["wgmma"] and r["tma"] and not r["spill_bytes"] for r in untuned), untuned


DESCRIPTOR_KERNELS = """
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from mmkernels import runtime
from triton.backends.nvidia import driver as nv
from mmkernels.testing import check_launcher

@triton.jit
def in_tuple_kernel(A, B, OUT, BM: tl.constexpr):
    acc = tl.zeros([BM, BM], dtype=tl.float32)
    for i in tl.static_range(len(A)):
        acc += A[i].load([0, 0]).to(tl.float32)
    acc += B.load([0, 0]).to(tl.float32)
    r = tl.arange(0, BM)
    tl.store(OUT + r[:, None] * BM + r[None, :], acc)

@triton.jit
def top_level_kernel(A0, A1, B, OUT, BM: tl.constexpr):
    A = (A0, A1)
    acc = B.load([0, 0]).to(tl.float32)
    for i in tl.static_range(2):
        acc += A[i].load([0, 0]).to(tl.float32)
    r = tl.arange(0, BM)
    tl.store(OUT + r[:, None] * BM + r[None, :], acc)

t = torch.randn(64, 64, dtype=torch.float16)
out = torch.empty(64, 64)
d = lambda: TensorDescriptor(t, list(t.shape), list(t.stride()), [64, 64])
ok = runtime.aot_compile(top_level_kernel, (d(), d(), d(), out), {"BM": 64}, return_bound=True)
check_launcher(*ok, "top level")
bad = runtime.aot_compile(in_tuple_kernel, ((d(), d()), d(), out), {"BM": 64}, return_bound=True)
try:
    check_launcher(*bad, "in a tuple")
except AssertionError as exc:
    print("rejected:", exc)
else:
    print("accepted")
print("launcher:", "per kernel" if hasattr(nv, "make_launcher") else "generic")
"""


def test_launcher_check_takes_descriptors_inside_a_tuple_as_the_launcher_does(tmp_path):
    # the check itself, as each Triton launcher behaves. Triton 3.6 generates a launcher per kernel
    # (make_launcher) that packs only top-level descriptors: a tuple of descriptors (what
    # concat_linear once passed) must fail here, not on the first GPU. Triton 3.9's one generic
    # launcher packs descriptors at any depth (wrap_handle_tensordesc walks tuples): accepted.
    script = tmp_path / "descriptor_kernels.py"  # a file: @triton.jit reads its kernels' source
    script.write_text(DESCRIPTOR_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if "launcher: per kernel" in proc.stdout:
        assert "rejected: in a tuple: Triton's launcher cannot take this signature" in proc.stdout, proc.stdout
    else:
        assert "launcher: generic" in proc.stdout and "accepted" in proc.stdout, proc.stdout
