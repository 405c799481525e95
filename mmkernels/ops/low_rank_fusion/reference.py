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
    """``(dxs, dfactors, drank_weights or None, dbias or None)`` by the explicit formulas, the M
    projections ``p_m = [1, x_m] @ F_m`` recomputed once (only the inputs are saved): with
    ``G_r = w_r dy``, ``dp_m = G Π_{k≠m} p_k`` (prefix and suffix products, no division),
    ``dF_m = [1, x_m]ᵀ dp_m``, ``dx_m = Σ_r dp_m[r] F_m[r, 1:]ᵀ``, ``dw_r = Σ dy · Π_m p_m[r]``,
    ``db = Σ_rows dy``."""
    r, h = factors[0].shape[0], factors[0].shape[2]
    dy = grad_out.reshape(-1, h)
    x2 = [x.reshape(-1, x.shape[-1]) for x in xs]
    ps = [torch.baddbmm(f[:, :1], x.expand(r, -1, -1), f[:, 1:]) for x, f in zip(x2, factors)]   # [R, rows, H]
    g = dy.expand(r, -1, -1) if rank_weights is None else rank_weights[:, None, None] * dy
    prefix = [None] * len(ps)      # prefix[m] = Π_{k<m} p_k (None: empty product)
    acc = None
    for m, p in enumerate(ps):
        prefix[m] = acc
        acc = p if acc is None else acc * p
    dw = None if rank_weights is None else (acc * dy).sum((1, 2))
    dxs, dfs, suffix = [None] * len(ps), [None] * len(ps), None
    for m in range(len(ps) - 1, -1, -1):
        others = prefix[m] if suffix is None else (suffix if prefix[m] is None else prefix[m] * suffix)
        dp = g if others is None else g * others                                   # [R, rows, H]
        f = factors[m]
        df = torch.empty_like(f)
        torch.sum(dp, dim=1, out=df[:, 0])                                         # the leading 1
        torch.bmm(x2[m].t().expand(r, -1, -1), dp, out=df[:, 1:])
        dfs[m] = df
        dxs[m] = torch.einsum("rnh,rdh->nd", dp, f[:, 1:]).reshape(xs[m].shape)
        suffix = ps[m] if suffix is None else ps[m] * suffix
    return dxs, dfs, dw, (dy.sum(0) if bias is not None else None)
