"""``mmkernels.attention_pool`` / ``attention_pool_varlen``: multi-head attention pooling of a token
sequence by a few learned or per-sample queries, padded (``[B, L, D]`` + lengths) or packed
(``[T, D]`` + ``cu_seqlens``).

How a call travels: the public function checks its arguments (``ValueError`` naming the argument)
and brings ``query`` to ``[1 or B, Q, H, Dh]`` -> ``torch.ops.mmkernels.attention_pool`` (one
custom op for both layouts; returns ``out`` and the fp32 log-sum-exp the backward needs) ->
:func:`mmkernels.backend.select` -> that backend's ``forward``; autograd calls
``torch.ops.mmkernels.attention_pool_backward`` on the same backend.

Lengths outside ``[0, L]``: on CPU tensors they raise ``ValueError``; on CUDA tensors they are not
checked (that would cost a host sync per call) and act clamped: a negative length is 0 (zeros
out), a length past L is L. ``cu_seqlens`` values are checked on CPU tensors; on CUDA tensors they
are trusted (must start at 0, not decrease, end at T). Without ``max_seqlen`` the packed op reads
the longest sample from ``cu_seqlens`` once per forward and once per backward (a host sync on
CUDA); pass ``max_seqlen`` (as flash-attention does) to avoid it — it must be at least the longest
sample.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import candidates
from .._register import Op
from .._util import FLOATS, autocast_cast, autocasting, extrema
from . import cpu, cuda, reference
from . import triton as triton_impl

IMPLS = {"reference": reference, "triton": triton_impl, "cuda": cuda}
_INTS = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _known_max(cu_seqlens, max_seqlen: int) -> int:
    return reference.max_len(cu_seqlens) if (cu_seqlens is not None and max_seqlen < 0) else max_seqlen


def _to_backend(a):
    """``max_seqlen`` < 0: read it from cu_seqlens."""
    return dict(a, max_seqlen=_known_max(a["cu_seqlens"], a["max_seqlen"]))


def _fake(x, key, query, lengths, cu_seqlens, max_seqlen, scale):
    b = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    _, q, h, dh = query.shape
    return x.new_empty((b, q, h * dh)), x.new_empty((b, q, h), dtype=torch.float32)


# one op for both layouts; returns ``out [B, Q, D]`` and the fp32 log-sum-exp ``lse [B, Q, H]``
OP = Op("attention_pool", "(Tensor x, Tensor? key, Tensor query, Tensor? lengths, Tensor? cu_seqlens, int max_seqlen, "
        "float scale) -> (Tensor, Tensor)", IMPLS, fake=_fake, differentiable=("x", "key", "query"),
        outputs=("out", "lse"), save_outputs=("out", "lse"), non_differentiable=("lse",), to_backend=_to_backend,
        cpu=cpu.forward, cpu_takes=cpu.takes, cpu_traced=cpu.forward_traced,
        cpu_traced_takes=cpu.traced_takes)


# --- argument checks -----------------------------------------------------------------------------

def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")


def _host_checkable(t: torch.Tensor) -> bool:
    """Values can be read without a device sync, and we are not tracing with fake tensors."""
    return t.is_cpu and not torch.compiler.is_compiling()


def _check_query(query, d: int, dtype, device, batch: int) -> int:
    """``query``'s rank (2: ``[H, Dh]``, 3: ``[Q, H, Dh]``, 4: ``[B, Q, H, Dh]``) for x of width ``d``,
    ``dtype`` and ``device``; ``ValueError`` naming what is wrong."""
    _tensor("query", query)
    qs = query.shape
    nd = len(qs)
    if nd not in (2, 3, 4):
        raise ValueError(f"query: expected [H, Dh], [Q, H, Dh] or [B, Q, H, Dh], got shape {tuple(qs)}")
    h, dh = qs[-2], qs[-1]
    if h < 1 or dh < 1 or h * dh != d:
        raise ValueError(f"query: expected its last two dims [H, Dh] with H * Dh == D == {d} (x's last dim), "
                         f"got shape {tuple(qs)}")
    if nd == 4 and qs[0] != batch:
        raise ValueError(f"query: per-sample queries [B, Q, H, Dh] need B == {batch} (x's batch), "
                         f"got shape {tuple(qs)}")
    if nd >= 3 and qs[-3] < 1:
        raise ValueError(f"query: expected Q >= 1 queries, got shape {tuple(qs)}")
    if query.dtype is not dtype:
        raise ValueError(f"query: expected dtype {dtype} (as x), got {query.dtype}")
    if query.device != device:
        raise ValueError(f"query: expected device {device} (as x), got {query.device}")
    return nd


def _as4(query: torch.Tensor) -> torch.Tensor:
    """A checked query as ``[1 or B, Q, H, Dh]``: the registered op's layout."""
    nd = query.dim()
    return query if nd == 4 else query.view((1,) * (4 - nd) + tuple(query.shape))


def _check_x(x, name="x", rank=3):
    """x's ``(shape, dtype, device)``; ``ValueError`` naming what is wrong."""
    _tensor(name, x)
    shape = x.shape
    if len(shape) != rank:
        want = "[B, L, D]" if rank == 3 else "[T, D]"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(shape)}")
    dtype = x.dtype
    if dtype not in FLOATS:
        raise ValueError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    if shape[-1] < 1:
        raise ValueError(f"{name}: expected D >= 1, got shape {tuple(shape)}")
    return shape, dtype, x.device


def _check_key(key, shape, dtype, device):
    if key is None:
        return
    _tensor("key", key)
    if key.shape != shape:
        raise ValueError(f"key: expected shape {tuple(shape)} (as x), got {tuple(key.shape)}")
    if key.dtype is not dtype:
        raise ValueError(f"key: expected dtype {dtype} (as x), got {key.dtype}")
    if key.device != device:
        raise ValueError(f"key: expected device {device} (as x), got {key.device}")


def _check_scale(scale, dh: int) -> float:
    if scale is None:
        return dh ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected None or a finite number, got {scale!r}")
    return float(scale)


def check_inputs(x, query, lengths, key, scale):
    """``(whether the output drops Q, scale, the least length or None)``; ``ValueError`` naming the
    argument. The least length is read where the lengths are checked (CPU tensors): the CPU path
    needs it too."""
    shortest = None
    shape, dtype, device = _check_x(x)
    B, L, D = shape
    _check_key(key, shape, dtype, device)
    nd = _check_query(query, D, dtype, device, B)
    if lengths is not None:
        _tensor("lengths", lengths)
        if lengths.shape != (B,):
            raise ValueError(f"lengths: expected shape ({B},) (one per row of x), got {tuple(lengths.shape)}")
        if lengths.dtype not in _INTS:
            raise ValueError(f"lengths: expected an integer dtype (int32 or int64), got {lengths.dtype}")
        if lengths.device != device:
            raise ValueError(f"lengths: expected device {device} (as x), got {lengths.device}")
        if _host_checkable(lengths) and B > 0:
            lo, hi = extrema(lengths)
            if lo < 0 or hi > L:
                raise ValueError(f"lengths: expected values in [0, {L}] (L = x.shape[1]), got min {lo}, max {hi}")
            shortest = lo
    return nd == 2, _check_scale(scale, query.shape[-1]), shortest


def check_varlen_inputs(x, cu_seqlens, query, key, scale, max_seqlen):
    shape, dtype, device = _check_x(x, rank=2)
    _check_key(key, shape, dtype, device)
    _tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens: expected shape [B + 1] (offsets into x's rows), got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected dtype torch.int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected device {device} (as x), got {cu_seqlens.device}")
    B = cu_seqlens.shape[0] - 1
    squeeze = _check_query(query, shape[1], dtype, device, B) == 2
    q4 = _as4(query)
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen: expected None or an int >= 0, got {max_seqlen!r}")
    if _host_checkable(cu_seqlens):
        T = x.shape[0]
        if int(cu_seqlens[0]) != 0:
            raise ValueError(f"cu_seqlens: expected to start at 0, got {int(cu_seqlens[0])}")
        if B > 0 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens: expected non-decreasing offsets, got a decrease")
        if int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens: expected to end at T = {T} (x's rows), got {int(cu_seqlens[-1])}")
        longest = reference.max_len(cu_seqlens)
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"max_seqlen: expected at least the longest sample ({longest}), got {max_seqlen}")
        max_seqlen = longest if max_seqlen is None else max_seqlen
    return q4, squeeze, _check_scale(scale, q4.shape[-1]), (-1 if max_seqlen is None else max_seqlen)


# --- public functions ----------------------------------------------------------------------------

def attention_pool(x: torch.Tensor, query: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                   key: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head attention pooling of ``x`` ``[B, L, D]`` (the values; also the keys unless ``key``
    ``[B, L, D]`` is given), ``D = H * Dh``.

    ``query``: ``[H, Dh]`` -> output ``[B, D]``; ``[Q, H, Dh]`` (shared latents) or ``[B, Q, H, Dh]``
    (per-sample) -> output ``[B, Q, D]``. For head h, ``out[b, q, h*Dh:(h+1)*Dh] = sum_l
    softmax_l(scale * <query[(b,) q, h], key[b, l, h]>) * x[b, l, h*Dh:(h+1)*Dh]`` over positions
    ``l < lengths[b]`` (all when None). ``scale`` defaults to ``Dh ** -0.5``. A row with length 0
    gives zeros and zero gradients; padded positions never reach the output or any gradient.
    Differentiable in x, key and query; fp32/fp16/bf16 (float64 on the reference backend). Inside
    ``torch.autocast`` x, key and query are cast to its dtype, as for SDPA. ``backend``: this
    call's backend (default: :func:`mmkernels.get_backend`).
    """
    if autocasting():
        x, query, key = autocast_cast([x, query, key], x)
    squeeze, scale, shortest = check_inputs(x, query, lengths, key, scale)
    if OP.cpu_path(x, backend) and cpu.takes(x, query, None):
        return cpu.pool(x, key, query, lengths, scale, shortest)
    out, _ = OP(x, key, _as4(query), lengths, None, x.shape[1], scale, backend=backend)
    return out.squeeze(1) if squeeze else out   # a view both ways: its backward copies nothing


def attention_pool_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, query: torch.Tensor, *,
                          key: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                          max_seqlen: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """:func:`attention_pool` on packed sequences: ``x`` (and ``key``) ``[T, D]`` holding B samples
    back to back, sample b in rows ``cu_seqlens[b]:cu_seqlens[b+1]`` (``cu_seqlens`` ``[B+1]`` int32,
    starting at 0, ending at T; flash-attention's convention). No padding is read. Per-sample queries
    are ``[B, Q, H, Dh]``. ``max_seqlen`` (the longest sample) saves a host sync on CUDA tensors.
    """
    if autocasting():
        x, query, key = autocast_cast([x, query, key], x)
    q4, squeeze, scale, max_seqlen = check_varlen_inputs(x, cu_seqlens, query, key, scale, max_seqlen)
    if OP.cpu_path(x, backend) and cpu.takes(x, q4, cu_seqlens):
        out, _ = cpu.forward(x, key, q4, None, cu_seqlens, _known_max(cu_seqlens, max_seqlen), scale)
    else:
        out, _ = OP(x, key, q4, None, cu_seqlens, max_seqlen, scale, backend=backend)
    return out.squeeze(1) if squeeze else out   # a view both ways: its backward copies nothing


def aot_examples():
    """Representative launches for the ahead-of-time compile test (every GPU target): ``(label,
    thunk)`` pairs that call the Triton launchers (captured, not run) on CPU tensors."""
    def case(B, L, H, Dh, Q, dtype, lengths=False, varlen=False, key=False, per_sample=False):
        D = H * Dh
        q = torch.randn(B if per_sample else 1, Q, H, Dh, dtype=dtype)
        if varlen:
            lens = torch.randint(1, L + 1, (B,))
            cu = torch.zeros(B + 1, dtype=torch.int32)
            cu[1:] = lens.cumsum(0)
            x = torch.randn(int(cu[-1]), D, dtype=dtype)
            ln, ml = None, L
        else:
            x = torch.randn(B, L, D, dtype=dtype)
            cu, ml = None, L
            ln = torch.randint(0, L + 1, (B,), dtype=torch.int32) if lengths else None
        k = torch.randn_like(x) if key else None
        dy = torch.randn(B, Q, D, dtype=dtype)

        def run():
            for name in candidates.SLOTS[triton_impl.FWD_SLOT]:       # every forward candidate
                with candidates.use(triton_impl.FWD_SLOT, name):
                    out, lse = triton_impl.forward(x, k, q, ln, cu, ml, Dh ** -0.5)
            for name in candidates.SLOTS[triton_impl.BWD_SLOT]:       # every backward candidate
                with candidates.use(triton_impl.BWD_SLOT, name):
                    triton_impl.backward(dy, x, k, q, ln, cu, out, lse, ml, Dh ** -0.5)
        return run

    def off64():  # a batch-first view of a sequence-first buffer past 2^31 elements (reserved, untouched)
        buf = torch.empty(2 ** 26 * 40 + 64, dtype=torch.float16)
        x = buf.as_strided((2, 40, 32), (32, 2 ** 26, 1))
        q = torch.randn(1, 1, 2, 16, dtype=torch.float16)
        out, lse = triton_impl.forward(x, None, q, None, None, 40, 0.25)
        triton_impl.backward(torch.randn(2, 1, 32, dtype=torch.float16), x, None, q, None, None, out, lse, 40, 0.25)

    return [
        ("fp16 64-bit offsets inside a sample", off64),
        ("bf16 B8 L576 H8 Dh128 lengths", case(8, 576, 8, 128, 1, torch.bfloat16, lengths=True)),
        ("bf16 B1 L4096 H2 Dh128 split", case(1, 4096, 2, 128, 1, torch.bfloat16)),
        ("bf16 B4 L100 H2 Dh256", case(4, 100, 2, 256, 2, torch.bfloat16)),
        ("fp16 B16 L64 H12 Dh64 Q16 per-sample", case(16, 64, 12, 64, 16, torch.float16, per_sample=True)),
        ("bf16 varlen B8 L300 H4 Dh80 key", case(8, 300, 4, 80, 4, torch.bfloat16, varlen=True, key=True)),
        ("fp32 B4 L33 H2 Dh256 (known spill in _attn_pool_bwd_kernel: fp32, Dh > 128)", case(4, 33, 2, 256, 2, torch.float32)),
        # the widest forward tiles with a key of its own: fitted to 99 KB of shared memory (sm_86/89/120)
        ("fp32 B2 L40 H2 Dh256 key", case(2, 40, 2, 256, 2, torch.float32, key=True)),
        ("fp16 B32 L100 H16 Dh16", case(32, 100, 16, 16, 1, torch.float16)),
        # the short forward candidate's headline shape (one query per head, L <= 128), with lengths,
        # packed with a key, and fp32
        ("bf16 B64 L64 H12 Dh64", case(64, 64, 12, 64, 1, torch.bfloat16)),
        ("bf16 B16 L128 H8 Dh128 lengths", case(16, 128, 8, 128, 1, torch.bfloat16, lengths=True)),
        ("fp16 varlen B8 L77 H6 Dh24 key per-sample", case(8, 77, 6, 24, 1, torch.float16, varlen=True, key=True,
                                                          per_sample=True)),
        ("fp32 B8 L50 H4 Dh64", case(8, 50, 4, 64, 1, torch.float32)),
    ]
