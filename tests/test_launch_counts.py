"""How many GPU kernels the Triton backend's GPU path starts, per op and pass (fwd, bwd), pinned by
name in :data:`PINNED`, so that a change that adds a launch (a Triton kernel, or a torch memset,
cast, copy or reduction around the kernels) shows up in review as a diff of this file.

Counted with CPU tensors (no GPU needed) by :func:`mmkernels.testing.count_launches`: the Triton
launches are captured, not run (outputs are uninitialised memory: nothing here reads a value on the
host), and the torch ops recorded are those that would each be a device kernel (views and bare
allocations left out). One small fp32 case per op of :data:`mmkernels.ops.OPS`, plus the
:class:`mmkernels.nn.GatedFusion` layer (several ops) and the absorbed part of a patched
attention-pooling head (:func:`mmkernels.patch._absorb.absorbed_heads`); gradients of every input
and parameter.
Where the GPU path is decided by the device rather than the backend, the GPU's route is taken:
concat_linear's backward GEMMs are cuBLAS on a GPU (``vendor_backward``), the package's GEMM
under the interpreter. No ``lengths``: their values are checked on the host for CPU tensors only.
16-bit dtypes may add casts that fp32 does not show.

A deliberate change: update the pin to the observed value the failure prints.
"""
import json
import textwrap

import pytest
import torch

import mmkernels
from mmkernels import runtime
from mmkernels.ops import OPS
from mmkernels.ops.concat_linear import triton as concat_linear_triton
from mmkernels.testing import count_launches

pytestmark = pytest.mark.skipif(not (runtime.HAS_TRITON and runtime.TRITON_INTERPRET),
                                reason="counts the GPU path on CPU tensors: needs the Triton interpreter")

PINNED = {
    ("norm_concat", "fwd"): {"triton": ["_norm_concat_fwd_kernel"], "torch": []},
    # dx and per-program partial sums, then dweight and dbias summed and cast in a second kernel
    ("norm_concat", "bwd"): {"triton": ["_norm_concat_bwd_kernel", "_norm_concat_dparams_kernel"], "torch": []},
    ("attention_pool", "fwd"): {"triton": ["_attn_pool_fwd_kernel"], "torch": []},
    # dquery: the per-chunk fp32 partials summed (a cast too in 16-bit)
    ("attention_pool", "bwd"): {"triton": ["_attn_pool_bwd_kernel"], "torch": ["sum.dim_IntList"]},
    ("concat_linear", "fwd"): {"triton": ["_concat_linear_gemm_kernel"], "torch": []},
    # dbias partials summed; per modality dx_m and dW[:, seg_m] by cuBLAS (vendor_backward)
    ("concat_linear", "bwd"): {"triton": ["_concat_linear_dz_kernel"], "torch": ["sum.dim_IntList", "mm",
        "mm.out", "mm", "mm.out", "mm", "mm.out"]},
    ("gated_sum", "fwd"): {"triton": ["_gated_sum_fwd_kernel"], "torch": []},
    ("gated_sum", "bwd"): {"triton": ["_gated_sum_bwd_kernel"], "torch": []},
    ("latent_pool", "fwd"): {"triton": ["_lp_fwd_kernel"], "torch": []},
    # delta = rowsum(dout * out); dquery summed over the batch (shared latents); dx and dq are written
    # whole by the kernels (no memset)
    ("latent_pool", "bwd"): {"triton": ["_lp_bwd_kernel", "_lp_weighted_sum_kernel"], "torch": ["mul.Tensor",
        "sum.dim_IntList", "sum.dim_IntList"]},
    # no Triton kernel: the blocked cuBLAS path; this small case fits one block (under 64K elements):
    # the outer product built whole ([1, x_m]: ones + cat) and one addmm
    ("tensor_fusion", "fwd"): {"triton": [], "torch": ["new_ones", "cat", "new_ones", "cat", "new_ones", "cat",
        "mul.Tensor", "mul.Tensor", "addmm"]},
    # dweight zeroed and accumulated per block (addmm_), the block's gradient (mm) contracted with the
    # others' outer product and [1, x_0] (bmm, baddbmm_), taken apart per modality; dbias
    ("tensor_fusion", "bwd"): {"triton": [], "torch": ["zeros", "new_ones", "cat", "new_ones", "cat", "new_ones",
        "cat", "mul.Tensor", "zeros_like", "mul.Tensor", "addmm_", "mm", "bmm", "copy_", "baddbmm_", "bmm", "bmm",
        "copy_", "copy_", "copy_", "sum.dim_IntList"]},
    # the gemm design: per modality the factor copied once into its [D + 1, R·H] GEMM layout and one
    # addmm for all ranks, then the product and rank sum in one kernel
    ("low_rank_fusion", "fwd"): {"triton": ["_lmf_prod_kernel"], "torch": ["clone", "clone", "clone", "addmm.out",
        "addmm.out", "addmm.out"]},
    # the projections again; per modality dx_m (mm) and dfactor_m (augmented x: ones + cat, mm, made
    # [R, D + 1, H]); drank, dbias
    ("low_rank_fusion", "bwd"): {"triton": ["_lmf_grad_kernel"], "torch": ["clone", "clone", "clone", "addmm.out",
        "addmm.out", "addmm.out", "mm", "new_ones", "cat", "mm", "clone", "mm", "new_ones", "cat", "mm", "clone",
        "mm", "new_ones", "cat", "mm", "clone", "sum.dim_IntList", "sum.dim_IntList"]},
    # the projections by cuBLAS into h_pre, the gate by concat_linear's GEMM, then gated_sum
    ("GatedFusion", "fwd"): {"triton": ["_concat_linear_gemm_kernel", "_gated_sum_fwd_kernel"], "torch":
        ["addmm.out", "addmm.out"]},
    # fusion_projections' backward, cuBLAS on every backend: per modality dx (mm, addmm_), dW_m, dW_z's
    # columns (mm.out) and db_m; then db_z
    ("GatedFusion", "bwd"): {"triton": ["_gated_sum_bwd_kernel"], "torch": ["mm", "addmm_", "mm", "mm.out",
        "sum.dim_IntList", "mm", "addmm_", "mm", "mm.out", "sum.dim_IntList", "sum.dim_IntList"]},
    # a patched attention-pooling head (mmkernels.patch, every family), from the projected queries to
    # the heads' outputs: the absorbed queries (one bmm), the pooling kernel, the value GEMM with its
    # bias (baddbmm), the heads' layout copy; the key bias's zero gradient costs no forward kernel
    ("absorbed_head", "fwd"): {"triton": ["_lp_fwd_kernel"], "torch": ["bmm", "baddbmm", "clone"]},
    ("absorbed_head", "bwd"): {"triton": ["_lp_bwd_kernel", "_lp_weighted_sum_kernel"], "torch": ["bmm", "bmm",
        "sum.dim_IntList", "clone", "mul.Tensor", "sum.dim_IntList", "sum.dim_IntList", "zeros", "bmm", "bmm"]},
}


def _r(*shape):
    return torch.randn(*shape)


# each case: (call, leaves, grad_out); call() runs the public function on the triton backend
def _norm_concat():
    dims = (64, 32, 48)
    xs, ws, bs = [_r(8, d) for d in dims], [_r(d) for d in dims], [_r(d) for d in dims]
    return lambda: mmkernels.norm_concat(xs, ws, bs, backend="triton"), xs + ws + bs, _r(8, sum(dims))


def _attention_pool():    # B 2, L 16 (one sequence chunk), Q 4 shared queries, H 4, Dh 16
    x, query = _r(2, 16, 64), _r(4, 4, 16)
    return lambda: mmkernels.attention_pool(x, query, backend="triton"), [x, query], _r(2, 4, 64)


def _concat_linear():     # gelu: the dz kernel and the saved pre-activation; a bias
    xs, w, b = [_r(8, 64), _r(8, 32), _r(8, 48)], _r(16, 144), _r(16)
    return lambda: mmkernels.concat_linear(xs, w, b, "gelu", backend="triton"), xs + [w, b], _r(8, 16)


def _gated_sum():         # feature gates, a modality mask
    h_pre, z, mask = _r(8, 3, 32), _r(8, 3, 32), torch.rand(8, 3) > 0.3
    return lambda: mmkernels.gated_sum(h_pre, z, mask, backend="triton"), [h_pre, z], _r(8, 32)


def _latent_pool():       # B 2, N 16, D 32, Q 4 shared latents
    x, query = _r(2, 16, 32), _r(4, 32)
    return lambda: mmkernels.latent_pool(x, query, backend="triton"), [x, query], _r(2, 4, 32)


def _tensor_fusion():
    dims = (8, 4, 4)
    xs, w, b = [_r(8, d) for d in dims], _r(16, 9 * 5 * 5), _r(16)
    return lambda: mmkernels.tensor_fusion(xs, w, b, backend="triton"), xs + [w, b], _r(8, 16)


def _low_rank_fusion():   # rank 2, rank weights and a bias
    dims = (16, 8, 8)
    xs, fs, rw, b = [_r(8, d) for d in dims], [_r(2, d + 1, 16) for d in dims], _r(2), _r(16)
    return lambda: mmkernels.low_rank_fusion(xs, fs, rw, b, backend="triton"), xs + fs + [rw, b], _r(8, 16)


def _gated_fusion_layer():   # mmkernels.nn.GatedFusion: fusion_projections, then gated_sum
    layer = mmkernels.nn.GatedFusion((32, 16), 16)
    xs = [_r(8, 32), _r(8, 16)]

    def call():
        with mmkernels.use_backend("triton"):
            return layer(xs)
    return call, xs + list(layer.parameters()), _r(8, 16)


def _absorbed_head():   # the patched attention-pooling heads' part (timm, transformers, open_clip): H 4, hd 8
    from mmkernels.patch._absorb import absorbed_heads
    x, q, wk, bk, wv, bv = _r(2, 10, 32), _r(1, 1, 4, 8), _r(32, 32), _r(32), _r(32, 32), _r(32)

    def call():
        return absorbed_heads(x, q, wk, bk, wv, bv, scale=8 ** -0.5, backend="triton")
    return call, [x, q, wk, bk, wv, bv], _r(2, 1, 32)


CASES = {"norm_concat": _norm_concat, "attention_pool": _attention_pool, "concat_linear": _concat_linear,
         "gated_sum": _gated_sum, "latent_pool": _latent_pool, "tensor_fusion": _tensor_fusion,
         "low_rank_fusion": _low_rank_fusion, "GatedFusion": _gated_fusion_layer, "absorbed_head": _absorbed_head}


def test_every_op_has_a_case_and_every_pin_a_case():
    assert set(OPS) <= set(CASES)
    assert {name for name, _ in PINNED} <= set(CASES)


def test_an_autotuned_launch_counts_once(monkeypatch):
    # on a GPU with autotuning on, a capture records an autotuned launch twice (the tuned kernel,
    # then its untuned configuration): one launch; two launches of one kernel are two
    from mmkernels.ops.gated_sum import triton as gated_sum_triton
    h_pre, z = _r(8, 3, 32), _r(8, 3, 32)

    def twice():
        return [gated_sum_triton.forward(h_pre, z, None) for _ in range(2)]
    assert count_launches(twice).triton == ["_gated_sum_fwd_kernel"] * 2
    monkeypatch.setattr(runtime, "AUTOTUNE", True)
    monkeypatch.setattr(runtime, "TRITON_INTERPRET", False)
    with runtime.capture_launches() as raw:
        twice()
    assert len(raw) == 4
    assert count_launches(twice).triton == ["_gated_sum_fwd_kernel"] * 2


@pytest.mark.parametrize("name", list(CASES))
def test_launches_are_pinned(name, monkeypatch):
    monkeypatch.setattr(concat_linear_triton, "vendor_backward", lambda t: True)   # a GPU's backward GEMMs
    call, leaves, grad_out = CASES[name]()
    for t in leaves:
        t.requires_grad_(True)
    fwd = count_launches(call)
    bwd = count_launches(lambda: torch.autograd.grad(fwd.result, leaves, grad_out, allow_unused=True))
    observed = {(name, p): {"triton": got.triton, "torch": got.torch} for p, got in (("fwd", fwd), ("bwd", bwd))}
    if observed != {key: PINNED.get(key) for key in observed}:
        pytest.fail(f"{name}: the GPU path's launches changed; if deliberate, pin the observed value:\n"
                    + "\n".join(_pin_line(key, got) for key, got in observed.items()), pytrace=False)


def _pin_line(key, got) -> str:
    """One entry of :data:`PINNED`, as it is written there."""
    text = f'    ({json.dumps(key[0])}, {json.dumps(key[1])}): {{"triton": {json.dumps(got["triton"])}, ' \
           f'"torch": {json.dumps(got["torch"])}}},'
    return textwrap.fill(text, 116, subsequent_indent=" " * 8, break_long_words=False, break_on_hyphens=False)


@pytest.mark.parametrize("name", ["norm_concat", "concat_linear", "latent_pool"])
def test_buffers_left_without_memset_are_written_whole(name, monkeypatch):
    # the backward buffers these ops allocate without a zero fill (norm_concat's and concat_linear's
    # per-program partials, latent_pool's dx and dq) are written whole by the kernels: with every
    # fresh allocation full of NaN, the Triton backend's gradients still equal the reference's
    monkeypatch.setattr(concat_linear_triton, "vendor_backward", lambda t: True)
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    if name == "norm_concat":
        xs, ws, bs = [r(9, 24), r(9, 8)], [r(24), r(8)], [r(24), None]
        leaves = [*xs, ws[0], ws[1], bs[0]]
        call = lambda be: mmkernels.norm_concat(xs, ws, bs, backend=be)  # noqa: E731
    elif name == "concat_linear":
        xs, w, b = [r(9, 16), r(9, 8)], r(12, 24), r(12)
        leaves = [*xs, w, b]
        call = lambda be: mmkernels.concat_linear(xs, w, b, "gelu", backend=be)  # noqa: E731
    else:
        x, q, lengths = r(3, 20, 32), r(4, 32), torch.tensor([20, 7, 0])
        leaves = [x, q]
        call = lambda be: mmkernels.latent_pool(x, q, lengths, backend=be)  # noqa: E731
    for t in leaves:
        t.requires_grad_(True)
    want = torch.autograd.grad(call("reference").square().sum(), leaves)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))
                        if (k.get("dtype") or torch.get_default_dtype()).is_floating_point else real_empty(*a, **k))
    got = torch.autograd.grad(call("triton").square().sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
