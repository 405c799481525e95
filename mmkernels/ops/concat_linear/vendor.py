"""concat_linear's ``cublas`` candidate (slot ``concat_linear.fwd``): the inputs copied once into a
reused, 16-byte aligned concatenation buffer, then one vendor GEMM (cuBLAS on GPUs) with the bias
(and relu) in its epilogue.

Bytes, forward, ``rows x K`` inputs to ``N`` outputs of ``e`` bytes each: the copy reads and writes
the inputs once (``2 * rows * K * e``), the GEMM reads the buffer and the weight and writes the
output (``rows * (K + N) * e + N * K * e``); gelu / gelu_tanh / silu also write the
pre-activation z and read it back once for the activation (``2 * rows * N * e``: the backward needs
z, which the cuBLASLt epilogue does not return). Against the in-place Triton GEMM that is one extra
pass over the inputs, paid for a vendor GEMM.

* The buffer: ``[rows, Kp]`` with ``Kp`` = K rounded up to 16 bytes (4396 -> 4400 in bf16), its
  padding columns zero (written once, when the buffer is made), kept per (device, stream, dtype,
  rows, Kp) — at most :data:`MAX_BUFFERS` of them, the least recently used dropped first. The
  caching allocator gives every buffer a 512-byte aligned base. It never leaves :func:`forward`
  (the backward reads the xs in place), so a later call may overwrite it once the GEMM that read it
  is queued on the same stream; a buffer that anything else still references (a view of it, a
  saved tensor) is never reused: a new one is made. Under CUDA-graph capture a fresh buffer is
  made each call (the graph's own memory pool), never a cached one.
* The weight: used as it is when K is aligned; else a zero-padded ``[N, Kp]`` copy, kept while
  the weight tensor lives and is not modified in place (its version counter), so an optimizer step
  makes a new one.
* The epilogue: ``torch.addmm`` with a 1-D bias runs cuBLASLt's bias epilogue;
  ``torch._addmm_activation`` adds relu there (``RELU_BIAS``). Its GELU is the tanh approximation
  on GPUs (cuBLASLt's ``GELU_BIAS``, or ``gelu_(.., "tanh")`` after the GEMM) and the erf form on
  CPUs, and it returns no pre-activation, so gelu, gelu_tanh and silu run as addmm (z) then the
  activation (out), which is what the backward needs; tanh and sigmoid run in place on the GEMM's
  output.
"""
from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from typing import Dict, Tuple

import torch

from ...runtime import _current_device, _current_stream
from .._util import rows2d
from .reference import ACT_FNS

MAX_BUFFERS = 4
_buffers: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_weights: Dict[tuple, Tuple[weakref.ref, int, torch.Tensor]] = {}
stats: Dict[str, int] = {}   # buffers made / reused, padded weights made (for the tests)
NEEDS_Z = ("gelu", "gelu_tanh", "silu")
_INPLACE = {"tanh": torch.Tensor.tanh_, "sigmoid": torch.Tensor.sigmoid_, "relu": torch.Tensor.relu_}


def padded_width(k: int, elem_bytes: int) -> int:
    per = max(1, 16 // elem_bytes)
    return -(-k // per) * per


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stream_key(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return _current_stream(device.index if device.index is not None else _current_device())


def _unshared(buf: torch.Tensor) -> bool:
    """Only the cache refers to ``buf``: no Python reference but the cache's, the caller's variable,
    this parameter and getrefcount's argument, and no other tensor on its storage (a view; the
    count includes the temporary storage object)."""
    return sys.getrefcount(buf) <= 4 and torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2


def concat_buffer(rows: int, k: int, kp: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, kp]`` buffer whose columns ``k:`` are zero, reused across calls (see the module)."""
    def make():
        buf = torch.empty((rows, kp), dtype=dtype, device=device)
        if kp > k:
            buf[:, k:].zero_()
        stats["buffers made"] = stats.get("buffers made", 0) + 1
        return buf
    if _capturing(device):
        return make()
    key = (device, _stream_key(device), dtype, rows, kp)
    buf = _buffers.get(key)
    if buf is not None and _unshared(buf):
        _buffers.move_to_end(key)
        stats["buffers reused"] = stats.get("buffers reused", 0) + 1
        return buf
    buf = _buffers[key] = make()
    _buffers.move_to_end(key)
    while len(_buffers) > MAX_BUFFERS:
        _buffers.popitem(last=False)
    return buf


def padded_weight(weight: torch.Tensor, kp: int) -> torch.Tensor:
    """``weight`` ``[N, K]`` zero-padded to ``[N, kp]``, kept while ``weight`` lives unmodified."""
    if kp == weight.shape[1]:
        return weight
    key = (weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape), weight.stride(), kp)
    hit = _weights.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    w = torch.zeros((weight.shape[0], kp), dtype=weight.dtype, device=weight.device)
    w[:, : weight.shape[1]].copy_(weight)
    stats["weights padded"] = stats.get("weights padded", 0) + 1
    if not _capturing(weight.device):
        for stale in [k_ for k_, v in _weights.items() if v[0]() is None]:
            del _weights[stale]
        _weights[key] = (weakref.ref(weight), weight._version, w)
    return w


def clear() -> None:
    """Drop every cached buffer and padded weight."""
    _buffers.clear()
    _weights.clear()


def forward(xs, weight, bias, activation):
    """``(out, z)`` as every backend returns them: z (the pre-activation) for gelu / gelu_tanh /
    silu, else an empty tensor."""
    lead = xs[0].shape[:-1]
    x2 = [rows2d(x) for x in xs]
    rows, n = x2[0].shape[0], weight.shape[0]
    dims = [x.shape[1] for x in x2]
    k = sum(dims)
    kp = padded_width(k, weight.element_size())
    buf = concat_buffer(rows, k, kp, weight.dtype, weight.device)
    if rows > 0:
        torch.cat(x2, dim=1, out=buf[:, :k] if kp > k else buf)
    wt = padded_weight(weight, kp).t()
    if activation == "relu" and bias is not None:
        out = torch._addmm_activation(bias, buf, wt)                      # RELU_BIAS epilogue
        return out.view(*lead, n), out.new_empty((0,))
    z = torch.mm(buf, wt) if bias is None else torch.addmm(bias, buf, wt)   # BIAS epilogue
    del buf
    if activation in NEEDS_Z:
        return ACT_FNS[activation](z).view(*lead, n), z.view(*lead, n)
    if activation is not None:
        _INPLACE[activation](z)
    return z.view(*lead, n), z.new_empty((0,))
