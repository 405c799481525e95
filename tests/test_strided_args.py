"""Every tensor argument of every op may be a view: each backend gives the float64 reference's
forward and backward whatever the argument's layout.

One parametrized sweep, op x backend x argument: the argument (an input, a parameter, a query, an
index tensor, a mask, or the gradient of the output) is passed as each of these views of the same
values, the other arguments contiguous:

* ``strided``: every other element of a wider buffer, from element 1 (last-dim stride 2, a
  storage offset, padded rows);
* ``offset``: contiguous, but starting one element into its storage (unaligned for vector loads);
* ``transposed``: the last two dims stored column-major (tensors of two dims or more);
* ``expanded``: the first dim broadcast with stride 0 (values: the first entry repeated; not for
  ``cu_seqlens``, whose offsets must grow).

Backends: ``reference`` (float64), ``torch`` (the plain formulation), ``triton`` (the interpreter
without a GPU; every design candidate of :mod:`mmkernels.candidates` a case reaches) and ``cuda``
(the CPU emulator of the CUDA C++ kernels without a GPU) where the op has them; fp32 against the
float64 reference on contiguous copies. Tiny shapes: the sweep takes seconds under the interpreter.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Tuple

import pytest
import torch

import mmkernels
from mmkernels import candidates
from mmkernels.ops.gated_fusion import fusion_projections, gated_fusion
from mmkernels.testing import assert_close
from conftest import HAS_CUDA, TRITON_DEVICE

ALL = ("reference", "torch", "triton", "cuda")
NO_CUDA = ("reference", "torch", "triton")


def _ints(*values, dtype=torch.int64):
    return lambda: torch.tensor(values, dtype=dtype)


def _randn(*shape):
    return lambda: torch.randn(*shape, dtype=torch.float64)


@dataclasses.dataclass
class Case:
    """``args``: name -> maker of a float64 (or integer / bool) value; ``call(a, backend)`` runs the
    op on the dict of (possibly viewed) tensors and returns its output or a tuple of outputs."""
    call: Callable
    args: Dict[str, Callable]
    backends: Tuple[str, ...] = ALL
    no_expand: Tuple[str, ...] = ()
    swept: Tuple[str, ...] = ()     # the arguments viewed (default: all, and grad_out); a variant
    # of another case sweeps only what it adds
    slots: str = ""     # the op whose Triton design candidates (mmkernels.candidates) the case reaches


def _mask():
    m = torch.tensor([[True, False, True], [True, True, True], [False, False, False], [False, True, True],
                      [True, True, False]])
    return m


CASES = {
    "norm_concat": Case(
        lambda a, b: mmkernels.norm_concat([a["xs0"], a["xs1"]], [a["weights0"], a["weights1"]],
                                           [a["biases0"], a["biases1"]], backend=b),
        dict(xs0=_randn(5, 8), xs1=_randn(5, 12), weights0=_randn(8), weights1=_randn(12), biases0=_randn(8),
             biases1=_randn(12))),
    "norm_concat_rms": Case(
        lambda a, b: mmkernels.norm_concat([a["xs0"], a["xs1"]], [a["weights0"], None], norm="rmsnorm", backend=b),
        dict(xs0=_randn(5, 8), xs1=_randn(5, 12), weights0=_randn(8)), swept=("weights0",)),
    "attention_pool": Case(
        lambda a, b: mmkernels.attention_pool(a["x"], a["query"], a["lengths"], key=a["key"], backend=b),
        dict(x=_randn(3, 7, 16), query=_randn(2, 2, 8), lengths=_ints(7, 2, 4), key=_randn(3, 7, 16))),
    "attention_pool_one_query": Case(
        lambda a, b: mmkernels.attention_pool(a["x"], a["query"], a["lengths"], backend=b),
        dict(x=_randn(3, 7, 16), query=_randn(2, 8), lengths=_ints(7, 0, 4, dtype=torch.int32)),
        swept=("query", "lengths", "grad_out"), slots="attention_pool"),
    "attention_pool_varlen": Case(
        lambda a, b: mmkernels.attention_pool_varlen(a["x"], a["cu_seqlens"], a["query"], key=a["key"],
                                                     max_seqlen=7, backend=b),
        dict(x=_randn(12, 16), cu_seqlens=_ints(0, 5, 5, 12, dtype=torch.int32), query=_randn(3, 2, 2, 8),
             key=_randn(12, 16)), no_expand=("cu_seqlens",)),
    "concat_linear": Case(
        lambda a, b: mmkernels.concat_linear([a["xs0"], a["xs1"]], a["weight"], a["bias"], "gelu", backend=b),
        dict(xs0=_randn(5, 8), xs1=_randn(5, 12), weight=_randn(6, 20), bias=_randn(6)), NO_CUDA),
    "gated_sum": Case(
        lambda a, b: mmkernels.gated_sum(a["h_pre"], a["z"], a["modality_mask"], backend=b),
        dict(h_pre=_randn(5, 3, 8), z=_randn(5, 3, 8), modality_mask=_mask), slots="gated_sum"),
    "gated_sum_modality_gates": Case(
        lambda a, b: mmkernels.gated_sum(a["h_pre"], a["z"], a["modality_mask"], backend=b),
        dict(h_pre=_randn(5, 3, 8), z=_randn(5, 3), modality_mask=_mask), swept=("z", "grad_out")),
    "fusion_projections": Case(
        lambda a, b: fusion_projections([a["xs0"], a["xs1"]], [a["proj_weights0"], a["proj_weights1"]],
                                        [a["proj_biases0"], a["proj_biases1"]], a["gate_weight"], a["gate_bias"],
                                        backend=b),
        dict(xs0=_randn(5, 8), xs1=_randn(5, 12), proj_weights0=_randn(6, 8), proj_weights1=_randn(6, 12),
             proj_biases0=_randn(6), proj_biases1=_randn(6), gate_weight=_randn(12, 20), gate_bias=_randn(12)),
        NO_CUDA),
    "gated_fusion": Case(
        lambda a, b: gated_fusion([a["xs0"], a["xs1"]], [a["proj_weights0"], a["proj_weights1"]],
                                  [a["proj_biases0"], a["proj_biases1"]], a["gate_weight"], a["gate_bias"],
                                  a["modality_mask"], gate="modality", backend=b),
        dict(xs0=_randn(5, 8), xs1=_randn(5, 12), proj_weights0=_randn(6, 8), proj_weights1=_randn(6, 12),
             proj_biases0=_randn(6), proj_biases1=_randn(6), gate_weight=_randn(2, 20), gate_bias=_randn(2),
             modality_mask=lambda: _mask()[:, :2]), NO_CUDA, swept=("modality_mask", "grad_out")),
    "latent_pool": Case(
        lambda a, b: mmkernels.latent_pool(a["x"], a["query"], a["lengths"], bias=a["bias"], pos=a["pos"],
                                           backend=b),
        dict(x=_randn(3, 7, 16), query=_randn(2, 16), lengths=_ints(7, 0, 4), bias=_randn(3, 7),
             pos=_randn(7, 16)), NO_CUDA),
    "latent_pool_per_sample": Case(
        lambda a, b: mmkernels.latent_pool(a["x"], a["query"], backend=b),
        dict(x=_randn(3, 7, 16), query=_randn(3, 2, 16)), NO_CUDA, swept=("query",)),
    "latent_pool_varlen": Case(
        lambda a, b: mmkernels.latent_pool_varlen(a["x"], a["cu_seqlens"], a["query"], max_seqlen=7, backend=b),
        dict(x=_randn(12, 16), cu_seqlens=_ints(0, 5, 5, 12, dtype=torch.int32), query=_randn(16)), NO_CUDA,
        no_expand=("cu_seqlens",)),
    "tensor_fusion": Case(
        lambda a, b: mmkernels.tensor_fusion([a["xs0"], a["xs1"]], a["weight"], a["bias"], backend=b),
        dict(xs0=_randn(5, 3), xs1=_randn(5, 4), weight=_randn(6, 20), bias=_randn(6)), NO_CUDA),
    "low_rank_fusion": Case(
        lambda a, b: mmkernels.low_rank_fusion([a["xs0"], a["xs1"]], [a["factors0"], a["factors1"]],
                                               a["rank_weights"], a["bias"], backend=b),
        dict(xs0=_randn(5, 3), xs1=_randn(5, 4), factors0=_randn(3, 4, 6), factors1=_randn(3, 5, 6),
             rank_weights=_randn(3), bias=_randn(6)), NO_CUDA),
}


# --- the views -----------------------------------------------------------------------------------

def _strided(t):
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    buf[..., 1::2] = t
    return buf[..., 1::2]


def _offset(t):
    buf = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


def _transposed(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _expanded(t):
    return t[:1].expand(t.shape)


VIEWS = {"strided": _strided, "offset": _offset, "transposed": _transposed, "expanded": _expanded}


def _views(case: Case, name: str, t: torch.Tensor):
    for view, make in VIEWS.items():
        if view == "transposed" and t.dim() < 2:
            continue
        if view == "expanded" and (t.shape[0] < 2 or name in case.no_expand):
            continue
        v = make(t)
        assert not (v.is_contiguous() and v.storage_offset() == 0), view
        yield view, v


# --- the sweep -----------------------------------------------------------------------------------

@pytest.fixture
def device(backend):
    """Where ``backend`` runs: CPU tensors for the plain backends; the interpreter or the GPU for
    Triton; the CPU emulator of the CUDA C++ kernels (or the GPU) for ``cuda``."""
    if backend == "cuda":
        if not HAS_CUDA:
            # the CPU emulator's strided-parameter case is tests/test_cuda.py's; loading the emulator
            # from this module's workers aborted the process once in the full suite (not in this
            # module with test_cuda.py alone), so here the cuda backend runs on a GPU only
            pytest.skip("needs a CUDA GPU (the emulator's strided case runs in tests/test_cuda.py)")
        from test_cuda import kernels_on
        with kernels_on("cuda") as dev:
            yield dev
    else:
        yield TRITON_DEVICE if backend == "triton" else "cpu"


def _run(case: Case, backend: str, args: Dict[str, torch.Tensor], grads_out):
    """The outputs and the gradients of every floating argument."""
    leaves = {k: v.detach().requires_grad_() if v.is_floating_point() else v for k, v in args.items()}
    # a leaf that is a view keeps its layout: detach() shares the storage and strides
    outs = case.call(leaves, backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [k for k, v in leaves.items() if v.is_floating_point()]
    if grads_out is None:
        grads_out = [torch.randn_like(o, dtype=torch.float64) for o in outs]
    grads = torch.autograd.grad(outs, [leaves[k] for k in diff], [g.to(o) for g, o in zip(grads_out, outs)],
                                allow_unused=True)
    return outs, dict(zip(diff, grads)), grads_out


def _expected(case: Case, values, grads_out):
    """The float64 reference on contiguous copies."""
    args = {k: v.detach().cpu().contiguous() for k, v in values.items()}
    return _run(case, "reference", args, [g.detach().cpu().double().contiguous() for g in grads_out])


def _params():
    for op, case in CASES.items():
        for backend in case.backends:
            # the Triton kernels' other design candidates (the GPU check's tournament may pick them)
            variants = [None] + [(slot, name) for slot, names in candidates.SLOTS.items()
                                 if backend == "triton" and slot.split(".")[0] == case.slots for name in names[1:]]
            for cand in variants:
                label = backend if cand is None else f"{backend}[{cand[0]}={cand[1]}]"
                for arg in case.swept or (*case.args, "grad_out"):
                    yield pytest.param(op, backend, cand, arg, id=f"{op}-{label}-{arg}")


@pytest.mark.parametrize("op,backend,cand,arg", list(_params()))
def test_argument_views_match_the_reference(op, backend, cand, arg, device):
    with contextlib.nullcontext() if cand is None else candidates.use(*cand):
        _sweep(op, backend, arg, device)


def _sweep(op, backend, arg, device):
    case = CASES[op]
    torch.manual_seed(0)
    dtype = torch.float64 if backend == "reference" else torch.float32
    base = {}
    for k, make in case.args.items():
        t = make()
        base[k] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    if arg == "grad_out":
        outs = case.call(base, "reference")        # (for the shapes)
        outs = outs if isinstance(outs, tuple) else (outs,)
        plain = [torch.randn(o.shape, dtype=dtype, device=device) for o in outs]
        variants = [(view, [VIEWS[view](g) for g in plain]) for view in VIEWS
                    if view != "transposed" or all(g.dim() >= 2 for g in plain)]
        for view, dys in variants:
            got_out, got, _ = _run(case, backend, base, dys)
            want_out, want, _ = _expected(case, base, dys)
            _compare(got_out, got, want_out, want, f"{op} {backend} grad_out {view}")
        return
    for view, v in _views(case, arg, base[arg]):
        args = dict(base, **{arg: v})
        got_out, got, dys = _run(case, backend, args, None)
        want_out, want, _ = _expected(case, args, dys)
        _compare(got_out, got, want_out, want, f"{op} {backend} {arg} {view}")


def _compare(got_out, got, want_out, want, what):
    for i, (o, r) in enumerate(zip(got_out, want_out)):
        assert_close(o.detach().cpu(), r.detach(), o.dtype, f"{what}: output {i}")
    for k, r in want.items():
        g = got[k]
        if r is None:     # not differentiable (latent_pool's bias)
            continue
        assert g is not None, f"{what}: no gradient for {k}"
        assert_close(g.cpu(), r, g.dtype, f"{what}: d{k}", scale=True)


def test_attention_pool_torch_backend_with_an_overlapping_query():
    # PyTorch's CPU scaled_dot_product_attention reads a query whose elements overlap in memory
    # wrongly (torch 2.11): the torch backend hands it a contiguous copy
    # query[q, h, :] = buf[8 q + h : ...]: heads overlapping in memory (e.g. a sliding-window view)
    x = torch.randn(3, 7, 16)
    query = torch.randn(64).as_strided((2, 2, 8), (8, 1, 1))
    got = mmkernels.attention_pool(x, query, backend="torch")
    want = mmkernels.attention_pool(x.double(), query.double(), backend="reference")
    assert_close(got, want, torch.float32, "out")
