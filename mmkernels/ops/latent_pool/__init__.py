"""``mmkernels.latent_pool`` / ``latent_pool_varlen``: attention pooling of tokens ``[B, N, D]`` by
up to 64 full-width queries ``[Q, D]`` (shared) or ``[B, Q, D]`` (per sample), with lengths (or
packed ``cu_seqlens``), an additive score bias (a key-padding mask, 0 / finfo.min / -inf) and an
additive positional embedding ``[N, D]`` added to x as it is loaded.

This is the core of an absorbed attention-pooling head: for head h with query ``q_h`` and key
projection ``W_k,h``, the query ``W_k,h^T q_h`` scores the raw tokens exactly as ``q_h`` scores the
projected keys (``q_h . b_k,h`` is constant over tokens and cancels in the softmax), and the pooled
``p_h`` gives the head's output as ``W_v,h p_h + b_v,h``. :mod:`mmkernels.patch` builds on it.

How a call travels: the public function checks its arguments (``ValueError`` naming the argument)
and brings ``query`` to ``[1 or B, Q, D]`` -> ``torch.ops.mmkernels.latent_pool`` (returns ``out``
and the fp32 softmax statistics ``[B, Q, 2]`` the backward needs: the row maximum m and log2 l,
apart, see :func:`.reference.latent_pool_ref`) -> :func:`mmkernels.backend.select` -> that backend's
``forward``; autograd calls ``torch.ops.mmkernels.latent_pool_backward`` on the same backend.
Lengths outside ``[0, N]`` raise on CPU tensors and act clamped on CUDA tensors (no host sync).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import candidates
from .._register import Op
from .._util import FLOATS, autocast_cast, extrema
from ..attention_pool.reference import max_len, pad_packed
from . import cpu, reference
from . import triton as triton_impl

IMPLS = {"reference": reference, "triton": triton_impl}
_INTS = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _fake(x, query, lengths, bias, pos, scale):
    b, _, d = x.shape
    q = query.shape[1]
    return x.new_empty((b, q, d)), x.new_empty((b, q, 2), dtype=torch.float32)


OP = Op("latent_pool", "(Tensor x, Tensor query, Tensor? lengths, Tensor? bias, Tensor? pos, float scale) "
        "-> (Tensor, Tensor)", IMPLS, fake=_fake, differentiable=("x", "query", "pos"),
        outputs=("out", "stats"), save_outputs=("out", "stats"), non_differentiable=("stats",),
        cpu=cpu.forward, cpu_takes=cpu.takes)


# --- argument checks -----------------------------------------------------------------------------

def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")


def _same(name, t, x, what="dtype"):
    if what == "dtype" and t.dtype != x.dtype:
        raise ValueError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (as x), got {t.device}")


def _host_checkable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_inputs(x, query, lengths, bias, pos, scale):
    """Returns ``(query [1 or B, Q, D], squeeze, scale)``."""
    _tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [B, N, D], got {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"x: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    B, N, D = x.shape
    if D < 1:
        raise ValueError(f"x: expected D >= 1, got shape {tuple(x.shape)}")
    _tensor("query", query)
    if query.dim() not in (1, 2, 3) or query.shape[-1] != D or (query.dim() == 3 and query.shape[0] not in (1, B)):
        raise ValueError(f"query: expected [D], [Q, D], [1, Q, D] or [B, Q, D] with D == {D} (x's last dim) and B == {B}, "
                         f"got shape {tuple(query.shape)}")
    if query.dim() >= 2 and query.shape[-2] < 1:
        raise ValueError(f"query: expected Q >= 1 queries, got shape {tuple(query.shape)}")
    _same("query", query, x)
    if lengths is not None:
        _tensor("lengths", lengths)
        if lengths.shape != (B,):
            raise ValueError(f"lengths: expected shape ({B},) (one per row of x), got {tuple(lengths.shape)}")
        if lengths.dtype not in _INTS:
            raise ValueError(f"lengths: expected an integer dtype (int32 or int64), got {lengths.dtype}")
        _same("lengths", lengths, x, "device")
        if _host_checkable(lengths) and B > 0:
            lo, hi = extrema(lengths)
            if lo < 0 or hi > N:
                raise ValueError(f"lengths: expected values in [0, {N}] (N = x.shape[1]), got min {lo}, max {hi}")
    if bias is not None:
        _tensor("bias", bias)
        if bias.shape != (B, N):
            raise ValueError(f"bias: expected shape ({B}, {N}) (one additive score per token of x), "
                             f"got {tuple(bias.shape)}")
        if bias.dtype not in FLOATS:
            raise ValueError(f"bias: expected a floating dtype, got {bias.dtype}")
        _same("bias", bias, x, "device")
    if pos is not None:
        _tensor("pos", pos)
        if pos.shape != (N, D):
            raise ValueError(f"pos: expected shape ({N}, {D}) (x's tokens and width), got {tuple(pos.shape)}")
        _same("pos", pos, x)
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected None or a finite number, got {scale!r}")
    q3 = query.reshape((1,) * (3 - query.dim()) + tuple(query.shape))
    return q3, query.dim() == 1, float(scale)


# --- public functions ----------------------------------------------------------------------------

def latent_pool(x: torch.Tensor, query: torch.Tensor, lengths: Optional[torch.Tensor] = None, *,
                bias: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None,
                scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Full-width attention pooling of ``x`` ``[B, N, D]``.

    ``query``: ``[D]`` -> output ``[B, D]``; ``[Q, D]`` or ``[1, Q, D]`` (shared) or ``[B, Q, D]`` (per sample) ->
    output ``[B, Q, D]``: ``out[b, q] = sum_n softmax_n(scale * <query[(b,) q], x[b, n] + pos[n]>
    + bias[b, n]) * (x[b, n] + pos[n])`` over ``n < lengths[b]`` (all when None). ``scale``
    defaults to ``D ** -0.5``. ``bias`` ``[B, N]``: an additive score bias (no gradient): a mask of
    0 and ``finfo.min`` averages an all-masked row uniformly, as PyTorch's softmax does; a row with
    no valid position (length 0, or -inf everywhere) gives zeros and zero gradients (PyTorch's
    softmax gives NaN there). Differentiable in x, query and pos; fp32/fp16/bf16 (float64 on the
    reference backend), accumulated in fp32. ``backend``: this call's backend.
    """
    x, query, pos = autocast_cast([x, query, pos], x)
    q3, squeeze, scale = check_inputs(x, query, lengths, bias, pos, scale)
    if OP.cpu_path(x, backend) and cpu.takes(x, q3):
        out, _ = cpu.forward(x, q3, lengths, bias, pos, scale)
    else:
        out, _ = OP(x, q3, lengths, bias, pos, scale, backend=backend)
    return out.squeeze(1) if squeeze else out   # a view both ways: its backward copies nothing


def latent_pool_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, query: torch.Tensor, *,
                       max_seqlen: Optional[int] = None, scale: Optional[float] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
    """:func:`latent_pool` on packed sequences ``x`` ``[T, D]`` with ``cu_seqlens`` ``[B+1]``
    (flash-attention's convention). The samples are padded to ``max_seqlen`` (read from
    ``cu_seqlens`` when None: a host sync on CUDA) and pooled with lengths: one copy of x."""
    _tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [T, D], got {tuple(x.shape)}")
    _tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens: expected an int32 tensor [B + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    _same("cu_seqlens", cu_seqlens, x, "device")
    if _host_checkable(cu_seqlens):
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != x.shape[0] or \
                bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T = {x.shape[0]}")
    longest = max_len(cu_seqlens) if (max_seqlen is None or _host_checkable(cu_seqlens)) else max_seqlen
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                   or max_seqlen < longest):
        raise ValueError(f"max_seqlen: expected an int >= the longest sample ({longest}), got {max_seqlen!r}")
    xp, lengths = pad_packed(x, cu_seqlens, longest if max_seqlen is None else max_seqlen)
    return latent_pool(xp, query, lengths, scale=scale, backend=backend)


def aot_examples():
    """Representative launches for the ahead-of-time compile test (every GPU target): ``(label,
    thunk)`` pairs that call the Triton launchers (captured, not run) on CPU tensors. The forward's plan depends
    on the batch (one split per sample once B reaches the SM count): ``splits`` pins it, so small
    batches also compile the one-split path with several token blocks that real batches take."""
    def case(B, N, D, Q, dtype, lengths=False, bias=False, pos=False, per_sample=False, splits=None):
        x = torch.randn(B, N, D, dtype=dtype)
        q = torch.randn(B if per_sample else 1, Q, D, dtype=dtype)
        ln = torch.randint(0, N + 1, (B,), dtype=torch.int32) if lengths else None
        bs = torch.zeros(B, N) if bias else None
        ps = torch.randn(N, D, dtype=dtype) if pos else None
        dy = torch.randn(B, Q, D, dtype=dtype)

        def run():
            before, triton_impl.FWD_SPLITS = triton_impl.FWD_SPLITS, splits
            try:
                out, stats = triton_impl.forward(x, q, ln, bs, ps, D ** -0.5)
            finally:
                triton_impl.FWD_SPLITS = before
            triton_impl.backward(dy, x, q, ln, bs, ps, out, stats, D ** -0.5)
        return run

    def one_pass(run):
        def forced():
            with candidates.use(triton_impl.BWD_SLOT, "one_pass"):
                run()
        return forced

    # forward paths: "splits" = token splits + combine kernel; "one split, blocks" = S == 1 over
    # several token blocks (the sum in the fp32 slot between blocks); "one block" = S == 1, N <= BLOCK_N
    return [
        ("bf16 so400m B4 N729 D1152 Q16 bias, splits", case(4, 729, 1152, 16, torch.bfloat16, bias=True)),
        ("bf16 so400m N729 D1152 Q16, one split, blocks", case(2, 729, 1152, 16, torch.bfloat16, splits=1)),
        ("bf16 base B4 N196 D768 Q12 lengths, one split, blocks",
         case(4, 196, 768, 12, torch.bfloat16, lengths=True, splits=1)),
        ("bf16 RN50 B4 N50 D2048 Q32 per-sample pos, one block",
         case(4, 50, 2048, 32, torch.bfloat16, pos=True, per_sample=True)),
        ("fp16 RN50x64 B2 N50 D4096 Q64 per-sample pos, one block",
         case(2, 50, 4096, 64, torch.float16, pos=True, per_sample=True)),
        ("fp16 B2 N300 D256 Q8 lengths bias, splits", case(2, 300, 256, 8, torch.float16, lengths=True, bias=True)),
        ("fp16 B2 N300 D256 Q8, one split, blocks", case(2, 300, 256, 8, torch.float16, splits=1)),
        ("fp32 B2 N33 D100 Q3, splits", case(2, 33, 100, 3, torch.float32)),
        ("fp32 B2 N33 D100 Q3, one split, blocks", case(2, 33, 100, 3, torch.float32, splits=1)),
        ("fp32 B2 N20 D100 Q40 bias, one block", case(2, 20, 100, 40, torch.float32, bias=True)),
        # the one_pass backward candidate (the forward's walk: splits, blocks, one block; 16-bit only)
        ("bf16 so400m B4 N729 D1152 Q16 bias, one_pass backward",
         one_pass(case(4, 729, 1152, 16, torch.bfloat16, bias=True))),
        ("fp16 B2 N300 D256 Q8 lengths pos, one_pass backward",
         one_pass(case(2, 300, 256, 8, torch.float16, lengths=True, pos=True))),
        ("fp16 B2 N33 D100 Q3 per-sample, one_pass backward",
         one_pass(case(2, 33, 100, 3, torch.float16, per_sample=True))),
        ("bf16 RN50 B4 N50 D2048 Q32 per-sample pos, one_pass backward",
         one_pass(case(4, 50, 2048, 32, torch.bfloat16, pos=True, per_sample=True))),
        ("bf16 B2 N20 D100 Q16 bias, one_pass backward, one block",
         one_pass(case(2, 20, 100, 16, torch.bfloat16, bias=True))),
    ]
