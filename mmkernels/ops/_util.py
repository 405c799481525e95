"""Small helpers shared by the op folders' registration code."""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch


def fresh_outputs(outputs: Iterable[torch.Tensor], inputs: Iterable) -> List[torch.Tensor]:
    """What a custom op may return: contiguous (the layout every fake promises) and sharing no
    storage with its inputs or with each other (torch.library forbids aliases; a reference
    backend's ``torch.func`` gradients can be views of ``grad_out`` or slices of one tensor). No copy for fresh contiguous tensors (Triton's)."""
    storages = {t.untyped_storage()._cdata for t in inputs if isinstance(t, torch.Tensor)}
    out = []
    for o in outputs:
        if o.numel() == 0 or o.untyped_storage()._cdata in storages:
            o = o.clone(memory_format=torch.contiguous_format)
        o = o.contiguous()
        storages.add(o.untyped_storage()._cdata)  # nor with each other (slices of one gradient)
        out.append(o)
    return out


FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` as ``[rows, D]``: a view when the leading dims collapse, else a copy; a 2-D
    tensor itself (a reshape would make a view of it, for a microsecond on every call)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def dense(params) -> List:
    """``params`` (tensors or None) as the kernels read them: contiguous vectors. A view (e.g.
    every other element of a buffer) is copied, a small ``[D]`` vector; autograd gives its gradient
    the view's shape."""
    return [p if p is None or p.is_contiguous() else p.contiguous() for p in params]


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` of the Triton kernels' ``tl.dot``: fp32 inputs use TF32 only where
    PyTorch's own matmuls would (``torch.backends.cuda.matmul.allow_tf32``), else exact fp32
    products ("ieee", on the FMA units); 16-bit inputs run on the tensor cores either way."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_modalities(xs) -> Tuple[List[torch.Tensor], List[int]]:
    """The ``xs`` argument of the multi-input ops: a non-empty list of floating tensors ``[..., D_m]``
    (D_m >= 1) with one dtype, one device and identical leading dims. ``ValueError`` naming the
    entry otherwise; returns ``xs`` as a list and their widths ``[D_m]``.

    This runs on every call, so well-formed input is accepted in as few tensor accesses as
    possible (each costs a fraction of a microsecond); anything the quick pass does not accept
    goes through :func:`_check_modalities`, which names what is wrong (or accepts it)."""
    if type(xs) is list or type(xs) is tuple:
        try:
            x0 = xs[0]
            dtype, device, shape0 = x0.dtype, x0.device, x0.shape
            if dtype in FLOATS:     # a torch dtype: whatever matches it below is a tensor
                dims = []
                if len(shape0) == 2:     # [rows, D_m], the common case: no torch.Size slices
                    n0 = shape0[0]
                    for x in xs:
                        shape = x.shape
                        if not (x.dtype is dtype and len(shape) == 2 and shape[0] == n0 and shape[1]
                                and x.device == device):
                            break
                        dims.append(shape[1])
                    else:
                        return (xs if type(xs) is list else list(xs)), dims
                else:
                    lead = shape0[:-1]
                    for x in xs:
                        shape = x.shape
                        d = shape[-1]
                        if not (d and x.dtype is dtype and shape[:-1] == lead and x.device == device):
                            break
                        dims.append(d)
                    else:
                        return (xs if type(xs) is list else list(xs)), dims
        except (AttributeError, IndexError, TypeError):
            pass
    return _check_modalities(xs)


def _check_modalities(xs) -> Tuple[List[torch.Tensor], List[int]]:
    """:func:`check_modalities` entry by entry: the first problem raises ``ValueError`` naming it."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise ValueError(f"xs: expected a non-empty list of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError("xs: expected a non-empty list of tensors, got an empty list")
    xs = list(xs)
    dtype = device = lead = None
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"xs[{i}]: expected a tensor, got {type(x).__name__}")
        shape = x.shape
        if not shape or shape[-1] == 0:
            raise ValueError(f"xs[{i}]: expected shape [..., D] with D >= 1, got {tuple(shape)}")
        if i == 0:
            dtype, device, lead = x.dtype, x.device, shape[:-1]
            if dtype not in FLOATS:
                raise ValueError(f"xs[0]: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
            continue
        if x.dtype != dtype:
            if x.dtype not in FLOATS:
                raise ValueError(f"xs[{i}]: expected a floating dtype (float16, bfloat16, float32, float64), "
                                 f"got {x.dtype}")
            raise ValueError(f"xs[{i}]: expected dtype {dtype} (as xs[0]), got {x.dtype}")
        if x.device != device:
            raise ValueError(f"xs[{i}]: expected device {device} (as xs[0]), got {x.device}")
        if shape[:-1] != lead:
            raise ValueError(f"xs[{i}]: expected leading dims {tuple(lead)} (as xs[0]), got {tuple(shape[:-1])}")
    return xs, [x.shape[-1] for x in xs]


def extrema(t: torch.Tensor):
    """``(min, max)`` of a non-empty integer CPU tensor as Python ints, the cheapest way per size:
    a short one through a list (one conversion), a long one by ``torch.aminmax`` (one pass)."""
    if t.numel() <= 256:
        values = t.tolist()
        return min(values), max(values)
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def linear_params_ok(weight, bias, k: int, like: torch.Tensor) -> bool:
    """The quick pass over a ``weight`` ``[N, k]`` (N >= 1) and an optional ``bias`` ``[N]`` in
    ``like``'s dtype and device: True when well-formed (a torch dtype there is a tensor's); False,
    or an ``AttributeError`` / ``TypeError``, sends the caller to its detailed checks."""
    ws = weight.shape
    dtype, device = like.dtype, like.device
    return (weight.dtype is dtype and len(ws) == 2 and ws[1] == k and ws[0] >= 1 and weight.device == device
            and (bias is None or (bias.dtype is dtype and bias.shape == (ws[0],) and bias.device == device)))


def check_like(name: str, t, like: torch.Tensor, optional: bool = False) -> None:
    """A parameter argument: a tensor (or None where ``optional``) of ``like``'s dtype and device
    (``like`` is ``xs[0]``). ``ValueError`` naming ``name`` otherwise."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.dtype is not like.dtype:
        raise ValueError(f"{name}: expected dtype {like.dtype} (as xs), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (as xs), got {t.device}")


def check_bias(bias, rows: int, like: torch.Tensor) -> None:
    """An optional bias ``[rows]`` (the weight's rows) in ``like``'s dtype and device."""
    if bias is not None:
        check_like("bias", bias, like, optional=True)
        if bias.shape != (rows,):
            raise ValueError(f"bias: expected shape ({rows},) (weight's rows), got {tuple(bias.shape)}")


try:
    autocasting = torch._C._is_any_autocast_enabled   # one C call: is any device's autocast on?
except AttributeError:   # pragma: no cover - older torch
    def autocasting() -> bool:
        return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def autocast_cast(tensors, like):
    """What ``torch.autocast`` does for a lower-precision op (as for ``F.linear`` or SDPA): inside
    an autocast region for ``like``'s device type, floating tensors other than float64 (entries of
    ``tensors`` may be tensors, lists of tensors or None) are cast, with autograd, to the region's
    dtype, so fp32 parameters meet the bf16/fp16 activations of the layers before them. Outside a
    region (or when ``like`` is not a tensor) ``tensors`` come back unchanged. Callers on the hot
    path ask :func:`autocasting` first (one C call) and skip this outside any region."""
    if not autocasting() or not isinstance(like, torch.Tensor) or not torch.is_autocast_enabled(like.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(like.device.type)

    def cast(t):
        if isinstance(t, (list, tuple)):
            return [cast(u) for u in t]
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
            return t.to(dtype)
        return t
    return [cast(t) for t in tensors]
