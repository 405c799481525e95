"""What the memory-bound Triton kernels read, counted under the interpreter: every load of every
program, by the tensor it reads (:func:`mmkernels.testing.count_traffic`). The floors of the
benchmarks (each op's ``traffic_of``) assume every input is read once per pass; here that is
checked for the activations (the tensors that grow with the batch): each one's bytes are fetched
once over all programs and kernels of a pass (``fetches``: each program's distinct bytes, summed),
and loaded once (``reads``: every load) unless the design re-reads a tile a program just read
(an L1/L2 hit on a GPU), written down in :data:`DESIGN` with the reason. Parameters (weights,
queries) are read by every program from L2 and are not counted. A change that reads an activation
more often, or a redesign that reads it less, fails here until :data:`DESIGN` says so."""
import contextlib

import pytest
import torch

import mmkernels
from mmkernels import candidates
from mmkernels.testing import count_traffic

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="counts loads under Triton's interpreter (CPU tensors)")

# (op, pass, tensor[, candidate]) -> (reads, fetches, why): the designs that load an activation more
# than once (an entry naming a candidate of the op's slot holds for that candidate only)
DESIGN = {
    ("gated_sum", "fwd", "z"): (2.0, 1.0, "feature gates: the logits tile is read for the maximum, then again "
                                          "with h_pre (the program's own tile: an L1 hit)"),
    ("gated_sum", "bwd", "h", "unrolled"): (2.0, 1.0, "the unrolled backward's passes over the program's "
                                                      "tile: the output, then the gradients (L1 hits)"),
    ("gated_sum", "bwd", "z", "unrolled"): (3.0, 1.0, "the logits: the maximum, the output, the gradients"),
    ("latent_pool", "fwd", "x"): (2.0, 1.0, "each BLOCK_N x D tile is read for the scores, then again D block by "
                                            "D block in reverse for p @ x (the blocks just read: L2 hits)"),
    ("latent_pool", "bwd", "x", "two_kernels"): (2.0, 2.0, "two kernels read x: ds and dx, then dquery = ds @ x"),
    ("latent_pool", "bwd", "x", "one_pass"): (2.0, 1.0, "the forward's walk: the tile for the scores, then "
                                                        "again in reverse for dquery (L2 hits)"),
    ("latent_pool", "bwd", "dy"): (6.0, 3.0, "each program of sample b (three here: one per 64-token block or "
                                             "split) reads dy[b] ([Q, D], small beside x) for dp, then for dx"),
}


def _r(*shape, **kw):
    return torch.randn(*shape, **kw)


def _norm_concat(norm):
    x0, x1 = _r(37, 96), _r(37, 40)
    w, b = [_r(96), _r(40)], ([_r(96), _r(40)] if norm == "layernorm" else None)
    return (lambda: mmkernels.norm_concat([x0, x1], w, b, norm=norm, backend="triton"),
            dict(x0=x0, x1=x1), [*w, *(b or [])], 1.0)


def _gated_sum(feature, masked):
    h, z = _r(37, 3, 64), _r(37, 3, 64) if feature else _r(37, 3)
    mask = torch.rand(37, 3) > 0.3 if masked else None
    named = dict(h=h, z=z) if feature else dict(h=h)
    live = 1.0 if mask is None else mask.double().mean().item()     # absent modalities are never read
    return lambda: mmkernels.gated_sum(h, z, mask, backend="triton"), named, [] if feature else [z], live


def _attention_pool(q_shape, lengths=False, key=False):
    x, q = _r(5, 40, 128), _r(*q_shape)
    k = _r(5, 40, 128) if key else None
    n = torch.tensor([40, 1, 17, 33, 8]) if lengths else None
    named = dict(x=x) if k is None else dict(x=x, key=k)
    live = 1.0 if n is None else n.sum().item() / (5 * 40)          # tokens past a length are never read
    return lambda: mmkernels.attention_pool(x, q, n, key=k, backend="triton"), named, [q], live


def _attention_pool_varlen():
    x, q = _r(90, 128), _r(4, 32)
    cu = torch.tensor([0, 40, 41, 58, 90])
    return lambda: mmkernels.attention_pool_varlen(x, cu, q, backend="triton"), dict(x=x), [q], 1.0


def _latent_pool(per_sample=False, lengths=False):    # fp16: the one_pass backward takes 16-bit types
    x, q = _r(3, 150, 96, dtype=torch.float16), _r(*((3, 4, 96) if per_sample else (4, 96)), dtype=torch.float16)
    n = torch.tensor([150, 7, 70]) if lengths else None
    live = 1.0 if n is None else n.sum().item() / (3 * 150)
    return lambda: mmkernels.latent_pool(x, q, n, backend="triton"), dict(x=x), [q], live


CASES = {
    "norm_concat-layernorm": ("norm_concat", lambda: _norm_concat("layernorm")),
    "norm_concat-rmsnorm": ("norm_concat", lambda: _norm_concat("rmsnorm")),
    "gated_sum-feature-masked": ("gated_sum", lambda: _gated_sum(True, True)),
    "gated_sum-modality": ("gated_sum", lambda: _gated_sum(False, False)),   # (its backward has one design)
    "attention_pool-one-query": ("attention_pool", lambda: _attention_pool((4, 32))),
    "attention_pool-latents-lengths": ("attention_pool", lambda: _attention_pool((2, 4, 32), lengths=True)),
    "attention_pool-key": ("attention_pool", lambda: _attention_pool((4, 32), key=True)),
    "attention_pool-varlen": ("attention_pool", _attention_pool_varlen),
    "latent_pool-shared": ("latent_pool", lambda: _latent_pool()),
    "latent_pool-per-sample-lengths": ("latent_pool", lambda: _latent_pool(per_sample=True, lengths=True)),
}
SLOTS_OF = {"norm_concat": ("norm_concat.bwd",), "gated_sum": ("gated_sum.bwd",),
            "attention_pool": ("attention_pool.fwd", "attention_pool.bwd"),
            "latent_pool": ("latent_pool.fwd", "latent_pool.bwd")}


def _params():
    for case, (op, _) in CASES.items():
        slots = SLOTS_OF.get(op, ()) if case != "gated_sum-modality" else ()
        for slot, name in [(slot, name) for slot in slots for name in candidates.SLOTS[slot]] or [(None, None)]:
            yield pytest.param(case, slot, name, id=case if name is None else f"{case}-{name}")


def _expected(op, pass_, tensor, chosen):
    """The design's (reads, fetches) with the candidates ``chosen`` (every slot of the op)."""
    for name in chosen:
        if (op, pass_, tensor, name) in DESIGN:
            return DESIGN[op, pass_, tensor, name][:2]
    return DESIGN.get((op, pass_, tensor), (1.0, 1.0, ""))[:2]


@pytest.mark.parametrize("case,slot,candidate", list(_params()))
def test_each_activation_is_read_once_per_pass(case, slot, candidate):
    op, make = CASES[case]
    fn, activations, params, live = make()
    for t in (*activations.values(), *params):
        t.requires_grad_()
    with candidates.use(slot, candidate) if candidate else contextlib.nullcontext():
        out = {}
        moved = {"fwd": count_traffic(lambda: out.setdefault("y", fn()), activations)}
        dy = torch.randn_like(out["y"])
        moved["bwd"] = count_traffic(lambda: out["y"].backward(dy), dict(activations, dy=dy))
    # ratios to the bytes a pass must read: the live part of x / h_pre / z (dy: all of it)
    part = lambda t: 1.0 if t == "dy" else live
    got = {(p, t): (round(m.reads / part(t), 3), round(m.fetches / part(t), 3))
           for p, per in moved.items() for t, m in per.items()}
    chosen = [candidate if s == slot else candidates.SLOTS[s][0] for s in SLOTS_OF.get(op, ())]
    want = {(p, t): _expected(op, p, t, chosen) for p, t in got}
    assert got == want


def test_every_design_entry_is_exercised():
    # an entry for an op, pass or tensor no case measures would hide nothing: keep the table honest
    ops = {op for op, _ in CASES.values()}
    assert all(k[0] in ops and k[1] in ("fwd", "bwd") for k in DESIGN), DESIGN
    assert all(any(k[3] in candidates.SLOTS[slot] for slot in SLOTS_OF[k[0]]) for k in DESIGN if len(k) == 4), DESIGN
    assert all(r >= f >= 1.0 and why for r, f, why in DESIGN.values())
