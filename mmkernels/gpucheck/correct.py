"""The correctness step of the GPU check: every kernel of every op and backend once, forward and
backward, per dtype, on one representative and one odd shape, against the op's reference backend
computed in float64 on the same inputs. On a GPU each case is then called again until its calls
replay their call plans (:mod:`mmkernels.plans`), and the last call is checked too: a replayed
call must give what the backend's own Python gives.

Each case is ``make(dtype, device, small) -> (call, args, leaves)``: ``call(*args)`` runs the public
op under the backend in force, ``leaves`` are the tensors gradients are taken for. The reference
runs the same call on float64 copies under the ``reference`` backend."""
from __future__ import annotations

import math
import traceback
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import mmkernels
from .. import plans
from ..testing import TOLERANCES

SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _g(device):
    return torch.Generator(device="cpu").manual_seed(0)


def _rand(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


# --- the cases: (representative, odd) per op -------------------------------------------------------

def _norm_concat(odd: bool):
    def make(dtype, device, small):
        g = _g(device)
        if odd:   # non-power-of-two widths, RMSNorm, weights only, two leading dims
            lead, dims, norm = (5, 3), ((7, 33, 5) if small else (7, 33, 129)), "rmsnorm"
        else:
            lead, dims, norm = ((8,), (24, 40, 8), "layernorm") if small else ((512,), (768, 1024, 512), "layernorm")
        xs = [_rand(g, *lead, d, dtype=dtype, device=device) for d in dims]
        ws = [_rand(g, d, dtype=dtype, device=device) for d in dims]
        bs = None if odd else [_rand(g, d, dtype=dtype, device=device) for d in dims]
        leaves = xs + ws + (bs or [])

        def call(xs, ws, bs):
            return mmkernels.norm_concat(xs, ws, bs, norm=norm)
        return call, (xs, ws, bs), leaves
    return make


def _lengths(B, L, device, gen):
    ln = torch.randint(1, L + 1, (B,), generator=gen)
    ln[0] = 0           # an empty row
    ln[-1] = L          # a full one
    return ln.to(device)


def _attention_pool(odd: bool):
    def make(dtype, device, small):
        g = _g(device)
        if odd:   # ragged lengths with an empty row, per-sample queries, a separate key, odd head dim
            B, L, H, Dh, Q = (3, 9, 2, 8, 2) if small else (5, 37, 3, 40, 3)
            x = _rand(g, B, L, H * Dh, dtype=dtype, device=device)
            key = _rand(g, B, L, H * Dh, dtype=dtype, device=device)
            q = _rand(g, B, Q, H, Dh, dtype=dtype, device=device)
            ln = _lengths(B, L, device, g)

            def call(x, q, ln, key):
                return mmkernels.attention_pool(x, q, ln, key=key)
            return call, (x, q, ln, key), [x, q, key]
        B, L, H, Dh = (4, 16, 2, 32) if small else (32, 576, 8, 128)
        x = _rand(g, B, L, H * Dh, dtype=dtype, device=device)
        q = _rand(g, 1, H, Dh, dtype=dtype, device=device)

        def call(x, q):
            return mmkernels.attention_pool(x, q)
        return call, (x, q), [x, q]
    return make


def _attention_pool_short():
    """One query per head over rows of at most 128 tokens, lengths with an empty row: the shape
    class the ``short`` forward candidate takes (mmkernels.candidates)."""
    def make(dtype, device, small):
        g = _g(device)
        B, L, H, Dh = (3, 20, 4, 16) if small else (6, 100, 12, 64)
        x = _rand(g, B, L, H * Dh, dtype=dtype, device=device)
        q = _rand(g, H, Dh, dtype=dtype, device=device)
        ln = _lengths(B, L, device, g)

        def call(x, q, ln):
            return mmkernels.attention_pool(x, q, ln)
        return call, (x, q, ln), [x, q]
    return make


def _attention_pool_varlen(odd: bool):
    def make(dtype, device, small):
        g = _g(device)
        B, L, H, Dh, Q = ((3, 9, 2, 8, 2) if small else (5, 37, 3, 40, 3)) if odd else \
            ((4, 16, 2, 32, 1) if small else (64, 300, 8, 64, 1))
        ln = _lengths(B, L, "cpu", g)
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = ln.cumsum(0)
        x = _rand(g, int(cu[-1]), H * Dh, dtype=dtype, device=device)
        q = _rand(g, Q, H, Dh, dtype=dtype, device=device)
        cu = cu.to(device)

        def call(x, cu, q):
            return mmkernels.attention_pool_varlen(x, cu, q, max_seqlen=L)
        return call, (x, cu, q), [x, q]
    return make


def _concat_linear(odd: bool):
    def make(dtype, device, small):
        g = _g(device)
        if odd:   # unaligned widths (16-byte TMA rows need padding), a tiny N, tanh
            rows, dims, n, act = (5, (7, 9), 5, "tanh") if small else (37, (300, 5, 64), 10, "tanh")
        else:
            rows, dims, n, act = (8, (16, 24), 16, "gelu") if small else (1024, (768, 1024, 512), 1024, "gelu")
        xs = [_rand(g, rows, d, dtype=dtype, device=device) for d in dims]
        w = _rand(g, n, sum(dims), dtype=dtype, device=device, scale=sum(dims) ** -0.5)
        b = _rand(g, n, dtype=dtype, device=device)

        def call(xs, w, b):
            return mmkernels.concat_linear(xs, w, b, activation=act)
        return call, (xs, w, b), xs + [w, b]
    return make


def _gated_sum(odd: bool):
    def make(dtype, device, small):
        g = _g(device)
        if odd:   # modality gates, a mask with an all-absent (empty) row, odd H
            lead, m, h = ((3, 2), 3, 7) if small else ((5, 7), 5, 300)
            hp = _rand(g, *lead, m, h, dtype=dtype, device=device)
            z = _rand(g, *lead, m, dtype=dtype, device=device)
            mask = torch.rand(*lead, m, generator=g) > 0.4
            mask[0, 0] = False
            mask.view(-1, m)[1:, 0] = True   # every other row has something present
            mask = mask.to(device)
        else:
            lead, m, h = ((8,), 3, 32) if small else ((4096,), 3, 1024)
            hp = _rand(g, *lead, m, h, dtype=dtype, device=device)
            z = _rand(g, *lead, m, h, dtype=dtype, device=device)
            mask = None

        def call(hp, z, mask):
            return mmkernels.gated_sum(hp, z, mask)
        return call, (hp, z, mask), [hp, z]
    return make


def _fusion_projections(odd: bool):
    def make(dtype, device, small):
        from ..ops.gated_fusion import fusion_projections
        g = _g(device)
        if odd:   # modality gates, unaligned widths
            rows, dims, h, gate = (5, (7, 9), 6, "modality") if small else (37, (300, 33), 40, "modality")
        else:
            rows, dims, h, gate = (8, (16, 24), 16, "feature") if small else (1024, (768, 1024, 512), 512, "feature")
        k = sum(dims)
        xs = [_rand(g, rows, d, dtype=dtype, device=device) for d in dims]
        pw = [_rand(g, h, d, dtype=dtype, device=device, scale=d ** -0.5) for d in dims]
        pb = [_rand(g, h, dtype=dtype, device=device) for _ in dims]
        gw = _rand(g, len(dims) * h if gate == "feature" else len(dims), k, dtype=dtype, device=device,
                   scale=k ** -0.5)
        gb = _rand(g, gw.shape[0], dtype=dtype, device=device)

        def call(xs, pw, pb, gw, gb):
            return fusion_projections(xs, pw, pb, gw, gb)
        return call, (xs, pw, pb, gw, gb), xs + pw + pb + [gw, gb]
    return make


def _gated_fusion(odd: bool):
    """The whole layer (its forward design is the slot gated_fusion.fwd's): feature gates, where
    the fused candidate applies; the odd shape unaligned, masked, with an all-absent row."""
    def make(dtype, device, small):
        from ..ops.gated_fusion import gated_fusion
        g = _g(device)
        rows, dims, h = ((5, (7, 9, 3), 6) if small else (37, (300, 33, 129), 40)) if odd else \
            ((8, (16, 24), 16) if small else (1024, (768, 1024, 512), 512))
        m, k = len(dims), sum(dims)
        xs = [_rand(g, rows, d, dtype=dtype, device=device) for d in dims]
        pw = [_rand(g, h, d, dtype=dtype, device=device, scale=d ** -0.5) for d in dims]
        pb = [_rand(g, h, dtype=dtype, device=device) for _ in dims]
        gw = _rand(g, m * h, k, dtype=dtype, device=device, scale=k ** -0.5)
        gb = _rand(g, m * h, dtype=dtype, device=device)
        mask = None
        if odd:
            mask = torch.rand(rows, m, generator=g) > 0.4
            mask[0] = False
            mask[1:, 0] = True
            mask = mask.to(device)

        def call(xs, pw, pb, gw, gb, mask):
            return gated_fusion(xs, pw, pb, gw, gb, mask, "feature")
        return call, (xs, pw, pb, gw, gb, mask), xs + pw + pb + [gw, gb]
    return make


def _latent_pool(odd: bool):
    def make(dtype, device, small):
        g = _g(device)
        if odd:   # per-sample queries, lengths with an empty row, a -inf mask (one row masked everywhere),
            # a positional embedding, unaligned N and D
            B, N, D, Q = (3, 9, 12, 2) if small else (5, 37, 100, 3)
            x = _rand(g, B, N, D, dtype=dtype, device=device)
            q = _rand(g, B, Q, D, dtype=dtype, device=device)
            pos = _rand(g, N, D, dtype=dtype, device=device, scale=0.5)
            ln = _lengths(B, N, device, g)
            bias = torch.where(torch.rand(B, N, generator=g) < 0.3, float("-inf"), 0.0)
            bias[1] = float("-inf")
            bias = bias.to(device)

            def call(x, q, ln, bias, pos):
                return mmkernels.latent_pool(x, q, ln, bias=bias, pos=pos)
            return call, (x, q, ln, bias, pos), [x, q, pos]
        # SigLIP so400m/14 at 384 px as mmkernels.patch absorbs its head: 729 tokens of width 1152,
        # one latent x 16 heads = 16 shared full-width queries
        B, N, D, Q = (2, 50, 96, 4) if small else (32, 729, 1152, 16)
        x = _rand(g, B, N, D, dtype=dtype, device=device)
        q = _rand(g, Q, D, dtype=dtype, device=device)

        def call(x, q):
            return mmkernels.latent_pool(x, q)
        return call, (x, q), [x, q]
    return make


def _tensor_fusion(odd: bool):
    def make(dtype, device, small):
        from ..ops.tensor_fusion import fused_width
        g = _g(device)
        if odd:   # four modalities of odd widths, two leading dims, an odd H, no bias
            lead, dims, h, bias = ((3, 2), (3, 2, 4, 1), 5, False) if small else ((5, 7), (7, 3, 5, 2), 19, False)
        else:     # CMU-MOSI as in the paper: text 128, audio 32, video 32 -> 128
            lead, dims, h, bias = ((8,), (8, 4, 4), 16, True) if small else ((512,), (128, 32, 32), 128, True)
        k = fused_width(dims)
        xs = [_rand(g, *lead, d, dtype=dtype, device=device) for d in dims]
        w = _rand(g, h, k, dtype=dtype, device=device, scale=k ** -0.5)
        b = _rand(g, h, dtype=dtype, device=device) if bias else None

        def call(xs, w, b):
            return mmkernels.tensor_fusion(xs, w, b)
        return call, (xs, w, b), xs + [w] + ([b] if bias else [])
    return make


def _low_rank_fusion(odd: bool):
    def make(dtype, device, small):
        g = _g(device)
        if odd:   # unaligned widths, two leading dims, an odd H, no rank weights (all ones), no bias
            lead, dims, r, h, extras = ((3, 2), (5, 3), 3, 7, False) if small else ((5, 7), (300, 5, 33), 3, 37, False)
        else:     # CMU-MOSI as in the paper: (128, 32, 32), rank 4 -> 64
            lead, dims, r, h, extras = ((8,), (16, 8, 8), 2, 16, True) if small else \
                ((1024,), (128, 32, 32), 4, 64, True)
        xs = [_rand(g, *lead, d, dtype=dtype, device=device) for d in dims]
        fs = [_rand(g, r, d + 1, h, dtype=dtype, device=device, scale=(d + 1) ** -0.5) for d in dims]
        w = _rand(g, r, dtype=dtype, device=device) if extras else None
        b = _rand(g, h, dtype=dtype, device=device) if extras else None

        def call(xs, fs, w, b):
            return mmkernels.low_rank_fusion(xs, fs, w, b)
        return call, (xs, fs, w, b), xs + fs + ([w, b] if extras else [])
    return make


# op -> (backends that have kernels for it, {shape label: make})
CASES: Dict[str, Tuple[Tuple[str, ...], Dict[str, Callable]]] = {
    "norm_concat": (("triton", "cuda"), {"rep": _norm_concat(False), "odd": _norm_concat(True)}),
    "attention_pool": (("triton", "cuda"), {"rep": _attention_pool(False), "odd": _attention_pool(True),
                                            "short": _attention_pool_short()}),
    "attention_pool_varlen": (("triton", "cuda"), {"rep": _attention_pool_varlen(False),
                                                   "odd": _attention_pool_varlen(True)}),
    "concat_linear": (("triton",), {"rep": _concat_linear(False), "odd": _concat_linear(True)}),
    "gated_sum": (("triton", "cuda"), {"rep": _gated_sum(False), "odd": _gated_sum(True)}),
    "fusion_projections": (("triton",), {"rep": _fusion_projections(False), "odd": _fusion_projections(True)}),
    "gated_fusion": (("triton",), {"rep": _gated_fusion(False), "odd": _gated_fusion(True)}),
    # the newer ops last: a run cut off by its budget loses them first (latent_pool_varlen pads and calls
    # latent_pool's kernels: no kernel of its own to check)
    "latent_pool": (("triton",), {"rep": _latent_pool(False), "odd": _latent_pool(True)}),
    "tensor_fusion": (("triton",), {"rep": _tensor_fusion(False), "odd": _tensor_fusion(True)}),
    "low_rank_fusion": (("triton",), {"rep": _low_rank_fusion(False), "odd": _low_rank_fusion(True)}),
}
# which op folder (for --only) each checked op belongs to
FOLDER = {"attention_pool_varlen": "attention_pool", "fusion_projections": "gated_fusion"}


# --- running and comparing ---------------------------------------------------------------------------

def _flat(out) -> List[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out]


def _to64(a, copies: Dict[int, torch.Tensor]):
    """``a`` with every floating tensor replaced by a float64 copy (recorded in ``copies`` by the
    original's id)."""
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            return a
        copies[id(a)] = a.detach().double()
        return copies[id(a)]
    if isinstance(a, (list, tuple)):
        return type(a)(_to64(v, copies) for v in a)
    return a


def run_case(call, args, leaves, backend: str):
    """Forward and backward of ``call(*args)`` under ``backend``: ``(outputs, grads)``."""
    for t in leaves:
        t.requires_grad_(True)
    with mmkernels.use_backend(backend):
        outs = _flat(call(*args))
        gen = torch.Generator(device="cpu").manual_seed(1)
        dys = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o) for o in outs]
        grads = torch.autograd.grad(outs, leaves, dys, allow_unused=True)
    return [o.detach() for o in outs], [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def compare(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], dtype) -> Tuple[float, List[str]]:
    """Max relative error (``|a - r|`` over the largest ``|r|``, per tensor) and the tensors outside
    the dtype's tolerance (:data:`mmkernels.testing.TOLERANCES`, scaled by the reference's largest
    magnitude) or holding NaN/inf."""
    tol = TOLERANCES[dtype]
    worst, bad = 0.0, []
    for i, (a, r) in enumerate(zip(actual, expected)):
        a, r = a.double().cpu(), r.double().cpu()
        if a.shape != r.shape:
            bad.append(f"tensor {i}: shape {tuple(a.shape)} != {tuple(r.shape)}")
            continue
        if not torch.isfinite(a).all():
            bad.append(f"tensor {i}: non-finite values")
            worst = math.inf
            continue
        if not a.numel():
            continue
        mag = max(r.abs().max().item(), 1e-30)
        err = (a - r).abs().max().item() / mag
        worst = max(worst, err)
        if not ((a - r).abs() <= tol.atol * max(1.0, mag) + tol.rtol * r.abs()).all():
            bad.append(f"tensor {i}: max rel err {err:.2e}")
    return worst, bad


def check(op: str, backend: str, dtype, device, small: bool) -> Dict:
    """One line of the step: every shape of ``op`` under ``backend`` in ``dtype``."""
    worst, problems = 0.0, []
    on_gpu = str(device).startswith("cuda")
    replayed = plans.stats.get("replayed", 0)
    for label, make in CASES[op][1].items():
        try:
            call, args, leaves = make(dtype, device, small)
            outs, grads = run_case(call, args, leaves, backend)
            copies: Dict[int, torch.Tensor] = {}
            args64 = _to64(args, copies)
            ref_leaves = [copies[id(t)] for t in leaves]
            ref_outs, ref_grads = run_case(call, args64, ref_leaves, "reference")
            if on_gpu:
                torch.cuda.synchronize()
            err, bad = compare(outs + grads, ref_outs + ref_grads, dtype)
            worst = max(worst, err)
            problems += [f"{label}: {b}" for b in bad]
            if on_gpu:         # the same call again until it replays its plan: the last one checked too
                for _ in range(plans.ATTEMPTS + 1):
                    outs, grads = run_case(call, args, leaves, backend)
                torch.cuda.synchronize()
                err, bad = compare(outs + grads, ref_outs + ref_grads, dtype)
                worst = max(worst, err)
                problems += [f"{label}, replayed: {b}" for b in bad]
        except Exception as exc:  # every line is reported, never raised
            last = traceback.extract_tb(exc.__traceback__)[-1]
            problems.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                            f"({last.filename.rsplit('/', 1)[-1]}:{last.lineno})")
    return dict(op=op, backend=backend, dtype=SHORT[dtype], ok=not problems, max_rel_err=worst,
                problems=problems, replayed=plans.stats.get("replayed", 0) - replayed)


def line(r: Dict) -> str:
    head = f"{r['op']:22s} {r['backend']:7s} {r['dtype']:5s}"
    if r["ok"]:
        return f"{head} ok {r['max_rel_err']:.2e}" + (f" ({r['replayed']} calls replayed)" if r.get("replayed") else "")
    return f"{head} FAIL " + "; ".join(r["problems"])[:400]
