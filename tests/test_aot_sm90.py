"""Every Triton kernel of the package compiles for Hopper (sm_90) ahead of time, without a GPU —
so a kernel that only the interpreter accepts fails here. Generic: each op folder lists
representative launches in ``aot_examples()``; a kernel with no example fails the test."""
import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("aot_sm90")]   # one worker compiles once (module fixture)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MMKERNELS_AUTOTUNE"] = "1"  # compile every configuration a GPU's autotuner may pick
    proc = subprocess.run([sys.executable, "-c", "from mmkernels.testing import aot_main; aot_main()"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_for_sm90(compiled):
    from mmkernels.ops import OPS
    assert {r["op"] for r in compiled} == set(OPS)
    for r in compiled:
        assert r["target"] == "sm_90" and r["ptx_bytes"] > 0, r


def test_triton_launcher_packs_every_kernel_and_configuration(compiled):
    # aot_compile_all built Triton's NVIDIA launcher for each compiled kernel and configuration
    # and packed the launch's arguments through it (it raises otherwise): each row records it
    assert all(r["launcher_args"] > 0 for r in compiled)
    gemm = [r for r in compiled if r["kernel"] == "_concat_linear_gemm_kernel"]
    assert gemm and all(r["tma"] for r in gemm)


def test_untuned_configurations_are_compiled_too(compiled):
    # MMKERNELS_AUTOTUNE=0 and graph capture launch the untuned configurations: the capture records
    # them beside the autotuned launch, so they pass the same compile, wgmma, spill and launcher
    # checks. (64, 64, 64) with 3 stages is in the untuned list only.
    rows = [r for r in compiled if r["kernel"] == "_concat_linear_gemm_kernel" and r["example"].startswith("bf16")]
    untuned = [r for r in rows if "BK=64, BM=64, BN=64," in r["config"] and "num_stages=3," in r["config"]]
    assert untuned and all(r["wgmma"] and r["tma"] and not r["spill_bytes"] for r in untuned), untuned


DESCRIPTOR_KERNELS = """
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from mmkernels import runtime
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
"""


def test_launcher_check_rejects_descriptors_inside_a_tuple(tmp_path):
    # the check itself: Triton 3.6's launcher packs only top-level descriptors, so a tuple of
    # descriptors (what concat_linear once passed) must fail here, not on the first GPU
    script = tmp_path / "descriptor_kernels.py"  # a file: @triton.jit reads its kernels' source
    script.write_text(DESCRIPTOR_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rejected: in a tuple: Triton's launcher cannot take this signature" in proc.stdout, proc.stdout


def _known_spill(r) -> bool:
    # the label: "(known spill in <kernel>[, <kernel>...]: <why>)"
    m = re.search(r"\(known spill in ([\w, ]+):", r["example"])
    return bool(m) and r["kernel"] in [k.strip() for k in m.group(1).split(",")]


def test_no_register_spills_except_known_ones(compiled):
    # Known limits, labelled "(known spill in <kernel>: ...)" in their example: the norm_concat
    # backward for rows of 8192+ features, the attention_pool fp32 backward for Dh > 128. Every
    # other kernel and configuration must fit its registers.
    assert all(r["n_regs"] for r in compiled)
    spills = [r for r in compiled if r["spill_bytes"] and not _known_spill(r)]
    assert not spills, spills
    known = [r for r in compiled if _known_spill(r)]
    assert known and all(r["spill_bytes"] for r in known), "a known spill is gone: drop its label"


def test_norm_concat_loads_are_16_byte_vectors(compiled):
    # 768+1024+512 bf16 rows are 16-byte aligned: the kernels must use 128-bit loads
    rows = [r for r in compiled if r["op"] == "norm_concat" and r["example"].startswith("bf16 ln 768")]
    assert {r["kernel"] for r in rows} == {"_norm_concat_fwd_kernel", "_norm_concat_bwd_kernel",
                                           "_norm_concat_dparams_kernel"}
    assert all(r["vector_loads"] for r in rows), rows


def test_attention_pool_uses_tensor_cores_and_vector_loads(compiled):
    # the bf16 Dh=128 examples: both products of the tiled kernels on the tensor cores (mma), 16-byte
    # loads of x; the 'short' forward candidate (one query per head: fp32 FMAs by design) reads x
    # with 16-byte loads too
    rows = [r for r in compiled if r["op"] == "attention_pool" and "Dh128" in r["example"]
            and r["kernel"] != "_attn_pool_combine_kernel"]
    assert {r["kernel"] for r in rows} == {"_attn_pool_fwd_kernel", "_attn_pool_bwd_kernel",
                                           "_attn_pool_fwd_short_kernel"}
    tiled = [r for r in rows if r["kernel"] != "_attn_pool_fwd_short_kernel"]
    assert all(r["tensor_cores"] and r["vector_loads"] for r in tiled), tiled
    assert all(r["vector_loads"] for r in rows), rows


def test_concat_linear_gemm_is_wgmma_with_tma_on_16_bit_types(compiled):
    # every autotune configuration of the GEMM, for bf16/fp16, issues Hopper's warpgroup MMA
    rows = [r for r in compiled if r["kernel"] == "_concat_linear_gemm_kernel" and not r["example"].startswith("fp32")]
    assert len({r["config"] for r in rows}) >= 5, rows
    assert all(r["wgmma"] and r["tma"] for r in rows), [r for r in rows if not (r["wgmma"] and r["tma"])]


def test_gated_sum_loads_are_16_byte_vectors(compiled):
    # bf16 rows of H = 512 / 1024: every configuration of every kernel (both backward candidates)
    # reads with 128-bit loads
    rows = [r for r in compiled if r["op"] == "gated_sum" and r["example"].startswith("bf16 B")
            and ("H512" in r["example"] or "H1024" in r["example"])]
    assert {r["kernel"] for r in rows} == {"_gated_sum_fwd_kernel", "_gated_sum_bwd_kernel",
                                           "_gated_sum_bwd_unrolled_kernel"}
    assert all(r["vector_loads"] for r in rows), [r for r in rows if not r["vector_loads"]]
