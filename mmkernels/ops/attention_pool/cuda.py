"""attention_pool on the CUDA C++ backend: ``torch.ops.mmkernels.cuda_attention_pool_{fwd,bwd}``
(csrc/attention_pool.cu; registered by csrc/attention_pool_ops.cpp), built or loaded by :mod:`mmkernels.cuda`.
Both layouts (padded + lengths, packed + cu_seqlens) and every query form."""
from __future__ import annotations

from typing import Optional

from ... import cuda as _ext
from ...backend import KERNEL_CAPABILITIES, Capabilities, Limit

MAX_Q = 64         # queries per block: scores [Q, tile] and q, acc [Q, Dh] live in shared memory
MAX_Q_DH = 8192


CAPABILITIES = Capabilities(dtypes=KERNEL_CAPABILITIES.dtypes, devices=KERNEL_CAPABILITIES.devices, limits=(
    Limit("queries per head", lambda query, **_: query.shape[-3], MAX_Q, "kept in shared memory"),
    Limit("queries x head dim", lambda query, **_: query.shape[-3] * query.shape[-1], MAX_Q_DH,
          "kept in shared memory"),
))


def why_not(explicit: bool, x, query, key=None, **_) -> Optional[str]:
    q, dh = query.shape[-3], query.shape[-1]
    reason = _ext.why_not(x, explicit)
    if reason is not None:
        return reason
    if q > MAX_Q or q * dh > MAX_Q_DH:
        return None  # declared limits: their reasons are listed
    # the forward and the backward must both fit (autograd's backward selects the same way)
    need = max(_ext.ops().cuda_attention_pool_smem(q, dh, x.element_size(), key is not None))
    have = _ext.shared_memory_per_block(x.device)
    if need > have:
        return (f"Q = {q}, Dh = {dh}, {x.dtype}{' with a key' if key is not None else ''} needs {need} bytes of "
                f"shared memory per block; this GPU gives {have}")
    return None


def forward(x, key, query, lengths, cu_seqlens, max_seqlen: int, scale: float):
    return _ext.ops().cuda_attention_pool_fwd(x, key, query, lengths, cu_seqlens, max_seqlen, scale)


def backward(grad_out, x, key, query, lengths, cu_seqlens, out, lse, max_seqlen: int, scale: float):
    grads = _ext.ops().cuda_attention_pool_bwd(grad_out, x, key, query, lengths, cu_seqlens, out, lse,
                                                        max_seqlen, scale)
    return grads[0], (grads[2] if key is not None else None), grads[1]
