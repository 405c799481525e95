"""tensor_fusion's GPU implementation (the ``triton`` backend): the blocked cuBLAS formulation,
:func:`reference.blocked_forward` / :func:`reference.blocked_backward` with the GPU's blocks
(:func:`reference.gpu_budget`: 1/32 of the outer product, 64K to 64M elements), under one
``torch.autograd.Function`` eagerly and the registered custom op when traced. It has no Triton
kernel.

Why no kernel. K = Π(D_m + 1) is large (140,481 on tfn_mosi_b1024, 274,625 on tfn_b4096) and H
small (128, 256): the work is one GEMM ``[rows, K] @ [K, H]`` forward (36.8 and 576 GFLOP)
and two backward, whose A operand is the outer product. The implicit-GEMM Triton kernels this
package had (the A tile built in registers from the modalities, never stored) ran at 178-220x
their FLOP floor on tfn_mosi_b1024 and 16-29x on tfn_b4096 on the H200 (2026-12-04,
benchmarks/RESULTS.md): 9.78 ms against eager's 0.88 ms forward on tfn_mosi_b1024, 36.1 ms
fwd+bwd; 14.1 against 7.55 ms forward on tfn_b4096. Their grid had one
program per 64-row tile (16 programs for 1024 rows on 132 SMs, no split of K), and the K loop
walked 4257 outer indices with the last modality's 33 columns in 32-wide tiles (two tiles, the
second one column wide). A kernel that loses 11x stays out of the package.

The blocked path builds one column block of the outer product at a time (a slice of ``[1, x_0]``
times the other modalities' outer product: an elementwise kernel writing ``rows x block`` elements)
and multiplies it with cuBLAS (``mm``; 16-bit inputs summed over blocks in fp32 via ``out_dtype``).
Per forward it writes and reads the outer product once in blocks, as eager does, but never more
than 1/32 of it at once (fwd+bwd peak memory 0.06-0.08 of eager's at the headline cases'
proportions, measured on CPU by tests/test_tensor_fusion.py); eager writes the whole product
(288 MB and 2.2 GB in bf16) before its one GEMM.
"""
from __future__ import annotations

from typing import Optional

from ...backend import KERNEL_CAPABILITIES
from . import reference

CAPABILITIES = KERNEL_CAPABILITIES


def why_not(explicit: bool, xs, **_) -> Optional[str]:
    if xs[0].device.type == "cpu" and not explicit:
        return "CPU tensors run the GPU implementation only when 'triton' is requested by name"
    return None


def _blocks(xs, weight) -> int:
    return reference.gpu_budget(reference.rows_of(xs), weight.shape[1])


def forward(xs, weight, bias):
    return reference.tensor_fusion_chunked(xs, weight, bias, _blocks(xs, weight))


def backward(grad_out, xs, weight, bias):
    """``(dxs, dweight, dbias or None)``: :func:`reference.blocked_backward` in the forward's blocks."""
    return reference.backward_in_blocks(grad_out, xs, weight, bias, _blocks(xs, weight))
