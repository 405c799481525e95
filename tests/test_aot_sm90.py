"""Every Triton kernel of the package compiles for Hopper (sm_90) ahead of time, without a GPU —
so a kernel that only the interpreter accepts fails here. Generic: each op folder lists
representative launches in ``aot_examples()``; a kernel with no example fails the test."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


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


def _known_spill(r) -> bool:
    return f"(known spill in {r['kernel']}" in r["example"]


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
    assert {r["kernel"] for r in rows} == {"_norm_concat_fwd_kernel", "_norm_concat_bwd_kernel"}
    assert all(r["vector_loads"] for r in rows), rows


def test_attention_pool_uses_tensor_cores_and_vector_loads(compiled):
    # the bf16 Dh=128 examples: both products on the tensor cores (mma), 16-byte loads of x
    rows = [r for r in compiled if r["op"] == "attention_pool" and "Dh128" in r["example"]
            and r["kernel"] != "_attn_pool_combine_kernel"]
    assert {r["kernel"] for r in rows} == {"_attn_pool_fwd_kernel", "_attn_pool_bwd_kernel"}
    assert all(r["tensor_cores"] and r["vector_loads"] for r in rows), rows


def test_concat_linear_gemm_is_wgmma_with_tma_on_16_bit_types(compiled):
    # every autotune configuration of the GEMM, for bf16/fp16, issues Hopper's warpgroup MMA
    rows = [r for r in compiled if r["kernel"] == "_concat_linear_gemm_kernel" and not r["example"].startswith("fp32")]
    assert len({r["config"] for r in rows}) >= 5, rows
    assert all(r["wgmma"] and r["tma"] for r in rows), [r for r in rows if not (r["wgmma"] and r["tma"])]


def test_gated_sum_loads_are_16_byte_vectors(compiled):
    # bf16 rows of H = 512 / 1024: every configuration of both kernels reads with 128-bit loads
    rows = [r for r in compiled if r["op"] == "gated_sum" and r["example"].startswith("bf16 B")
            and ("H512" in r["example"] or "H1024" in r["example"])]
    assert {r["kernel"] for r in rows} == {"_gated_sum_fwd_kernel", "_gated_sum_bwd_kernel"}
    assert all(r["vector_loads"] for r in rows), [r for r in rows if not r["vector_loads"]]
