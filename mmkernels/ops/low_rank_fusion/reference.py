"""low_rank_fusion in plain PyTorch: the specification (LMF, Liu et al. 2018:
``Σ_r w_r Π_m ([1, x_m] @ F_m[r]) + b``), the CPU backend, and the eager baseline."""
from __future__ import annotations

from typing import Optional

import torch

from ...backend import Capabilities
from ..tensor_fusion.reference import augment


def low_rank_fusion_ref(xs, factors, rank_weights, bias):
    """The eager composition: M GEMMs into ``[R, rows, H]``, their product, the weighted sum over r."""
    lead = xs[0].shape[:-1]
    prod = None
    for x, f in zip(xs, factors):
        p = torch.matmul(augment(x.reshape(-1, x.shape[-1])), f)  # [R, rows, H]
        prod = p if prod is None else prod * p
    if rank_weights is None:
        out = prod.sum(0)
    else:
        out = torch.einsum("r,rbh->bh", rank_weights, prod)
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, factors[0].shape[-1])


CAPABILITIES = Capabilities()


def why_not(explicit: bool, **_) -> Optional[str]:
    return None


def forward(xs, factors, rank_weights, bias):
    return low_rank_fusion_ref(xs, factors, rank_weights, bias)


def backward(grad_out, xs, factors, rank_weights, bias):
    """``(dxs, dfactors, drank_weights or None, dbias or None)`` by ``torch.func.vjp``."""
    has_w, has_b = rank_weights is not None, bias is not None

    def f(xs_, fs_, *rest):
        rest = list(rest)
        w_ = rest.pop(0) if has_w else None
        b_ = rest.pop(0) if has_b else None
        return low_rank_fusion_ref(xs_, fs_, w_, b_)

    primals = (list(xs), list(factors)) + ((rank_weights,) if has_w else ()) + ((bias,) if has_b else ())
    _, vjp = torch.func.vjp(f, *primals)
    g = list(vjp(grad_out))
    dxs, dfs = list(g.pop(0)), list(g.pop(0))
    dw = g.pop(0) if has_w else None
    db = g.pop(0) if has_b else None
    return dxs, dfs, dw, db
