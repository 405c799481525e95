"""nn.GatedFusion and its GEMM op (fusion_projections): the layer is the GMU of Arevalo et al. for
M modalities, built from nn.Linear + cat + stack + tanh + masked softmax + sum; every backend must
match that composition forward and backward, and masked-out inputs must reach nothing."""
import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import candidates
from mmkernels.nn import GatedFusion
from mmkernels.ops.gated_fusion import fused, fusion_projections, gated_fusion
from mmkernels.ops.gated_fusion.gemms import as_batched
from mmkernels.ops.gated_fusion.reference import fusion_projections_ref, gated_fusion_ref
from mmkernels.testing import assert_close

from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_DTYPES


@pytest.fixture(params=candidates.SLOTS[fused.FWD_SLOT], ids=lambda c: f"fwd={c}")
def fwd_candidate(request):
    """The layer's tests run under each design of its forward (the GPU check's tournament picks
    one per GPU): the gate GEMM writing z then gated_sum, or the gating in the GEMM's epilogue."""
    with candidates.use(fused.FWD_SLOT, request.param):
        yield request.param


FWD = pytest.mark.usefixtures("fwd_candidate")


def layer_and_inputs(dims, hidden, gate, lead, dtype, device, bias=True, nan_absent=True):
    layer = GatedFusion(dims, hidden, gate=gate, bias=bias, device=device, dtype=dtype)
    xs = [torch.randn(*lead, d, device=device).to(dtype) for d in dims]
    mask = torch.rand(*lead, len(dims), device=device) > 0.4
    if mask.numel():
        mask.view(-1, len(dims))[0] = False
    if nan_absent:
        for i, x in enumerate(xs):
            x[~mask[..., i]] = float("nan")          # absent inputs hold garbage
    return layer, [x.requires_grad_() for x in xs], mask


def params(layer):
    bias = layer.proj[0].bias is not None
    return ([p.weight for p in layer.proj], [p.bias for p in layer.proj] if bias else None,
            layer.gate.weight, layer.gate.bias)


def expected(layer, xs, mask, dy):
    """float64 forward and gradients (xs, then the layer's parameters) of the plain composition."""
    up = [x.detach().double().requires_grad_() for x in xs]
    ps = [p.detach().double().requires_grad_() for p in layer.parameters()]
    layer64 = GatedFusion(layer.dims, layer.hidden, layer.gate_kind, bias=layer.proj[0].bias is not None,
                          dtype=torch.float64, device=xs[0].device)
    for p, v in zip(layer64.parameters(), ps):
        p.data = v
    ws, bs, wz, bz = params(layer64)
    out = gated_fusion_ref(up, ws, bs, wz, bz, mask, layer.gate_kind)
    return out, torch.autograd.grad(out, up + list(layer64.parameters()), dy.double())


def check(backend, dims, hidden, gate, lead, dtype, device, bias=True, masked=True):
    layer, xs, mask = layer_and_inputs(dims, hidden, gate, lead, dtype, device, bias, nan_absent=masked)
    mask = mask if masked else None
    dy = torch.randn(*lead, hidden, device=device).to(dtype)
    with mmkernels.use_backend(backend):
        out = layer(xs, mask)
        grads = torch.autograd.grad(out, xs + list(layer.parameters()), dy)
    ref, ref_grads = expected(layer, xs, mask, dy)
    assert out.shape == (*lead, hidden) and out.dtype == dtype
    assert_close(out, ref, dtype, f"{backend} out")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(g).all(), f"grad {i} not finite"
        assert_close(g, r, dtype, f"{backend} grad {i}", scale=True)
    if masked:
        for i, x in enumerate(xs):   # absent inputs get exactly zero gradient
            assert (grads[i][~mask[..., i]] == 0).all()
    return layer, xs, mask, out


# --- the layer is the GMU ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32)] + [("triton", d) for d in TRITON_DTYPES],
                         ids=str)
@pytest.mark.parametrize("gate", ["feature", "modality"])
@FWD
def test_layer_matches_plain_composition(backend, gate, dtype):
    check(backend, (24, 7, 40), 12, gate, (9,), dtype, TRITON_DEVICE)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@FWD
def test_layer_without_bias_and_without_mask(backend):
    check(backend, (16, 5), 8, "feature", (6,), torch.float32, TRITON_DEVICE, bias=False, masked=False)
    check(backend, (16, 5), 8, "modality", (2, 3), torch.float32, TRITON_DEVICE, masked=False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@FWD
def test_two_modalities_with_feature_gates_are_the_gmu(backend):
    # Arevalo et al. (2017): h_v = tanh(W_v x_v), h_t = tanh(W_t x_t), z = sigmoid(W_z [x_v; x_t]),
    # h = z h_v + (1 - z) h_t. Softmax over (z_1, 0) is sigmoid(z_1): zero the second gate's rows.
    dims, hidden = (20, 12), 6
    layer = GatedFusion(dims, hidden, bias=False)
    w_gmu = torch.randn(hidden, sum(dims))
    with torch.no_grad():
        layer.gate.weight.copy_(torch.cat([w_gmu, torch.zeros(hidden, sum(dims))]))
    xv, xt = torch.randn(5, 20, device=TRITON_DEVICE), torch.randn(5, 12, device=TRITON_DEVICE)
    layer.to(TRITON_DEVICE)
    with mmkernels.use_backend(backend):
        out = layer([xv, xt])
    z = torch.sigmoid(torch.cat([xv, xt], -1) @ w_gmu.to(TRITON_DEVICE).t())
    want = z * torch.tanh(xv @ layer.proj[0].weight.t()) + (1 - z) * torch.tanh(xt @ layer.proj[1].weight.t())
    torch.testing.assert_close(out, want.detach(), atol=1e-5, rtol=1e-5)


@FWD
def test_masked_modality_output_ignores_its_input():
    layer, xs, mask = layer_and_inputs((8, 6, 4), 5, "feature", (7,), torch.float32, "cpu")
    out = layer(xs, mask)
    other = [x.detach().clone() for x in xs]
    for i, x in enumerate(other):
        x[~mask[..., i]] = 123.0                         # any other value: the same output
    torch.testing.assert_close(layer(other, mask), out)
    assert torch.isfinite(out).all() and (out[0] == 0).all()  # row 0 has nothing present


def test_state_dict_maps_onto_nn_linear():
    layer = GatedFusion([6, 4], 3)
    assert set(layer.state_dict()) == {"proj.0.weight", "proj.0.bias", "proj.1.weight", "proj.1.bias",
                                       "gate.weight", "gate.bias"}
    assert layer.gate.weight.shape == (6, 10)
    assert GatedFusion([6, 4], 3, gate="modality").gate.weight.shape == (2, 10)
    lin = nn.Linear(6, 3)
    layer.proj[0].load_state_dict(lin.state_dict())
    torch.testing.assert_close(layer.proj[0].weight, lin.weight)


def test_batched_projection_path_for_slices_of_one_tensor():
    feats = torch.randn(5, 3, 8)                          # [B, M, D]: equal widths, one storage
    xs = list(feats.unbind(1))
    assert as_batched([x for x in xs]) is not None
    assert as_batched([torch.randn(5, 8) for _ in range(3)]) is None
    assert as_batched([feats[:, 0], feats[:, 2]]) is not None
    assert as_batched([feats[:, 2], feats[:, 0]]) is None  # not in storage order
    layer = GatedFusion([8, 8, 8], 4)
    ws, bs, wz, bz = params(layer)
    with mmkernels.use_backend("triton"):
        got = fusion_projections(xs, ws, bs, wz, bz)
        got_nb = fusion_projections(xs, ws, None, wz, None)
    for a, b in zip(got, fusion_projections_ref(xs, ws, bs, wz, bz)):
        torch.testing.assert_close(a, b)
    for a, b in zip(got_nb, fusion_projections_ref(xs, ws, None, wz, None)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_fusion_projections_backward_matches_reference(bias):
    dims = (9, 4, 13)
    xs = [torch.randn(6, d, device=TRITON_DEVICE, requires_grad=True) for d in dims]
    ws = [torch.randn(5, d, device=TRITON_DEVICE, requires_grad=True) for d in dims]
    bs = [torch.randn(5, device=TRITON_DEVICE, requires_grad=True) for _ in dims] if bias else None
    wz = torch.randn(7, sum(dims), device=TRITON_DEVICE, requires_grad=True)
    bz = torch.randn(7, device=TRITON_DEVICE, requires_grad=True) if bias else None
    leaves = [*xs, *ws, *(bs or []), wz] + ([bz] if bias else [])
    dh, dz = torch.randn(6, 3, 5, device=TRITON_DEVICE), torch.randn(6, 7, device=TRITON_DEVICE)
    with mmkernels.use_backend("triton"):
        h, z = fusion_projections(xs, ws, bs, wz, bz)
        got = torch.autograd.grad((h, z), leaves, (dh, dz))
    rh, rz = fusion_projections_ref(xs, ws, bs, wz, bz)
    want = torch.autograd.grad((rh, rz), leaves, (dh, dz))
    torch.testing.assert_close(h, rh)
    torch.testing.assert_close(z, rz)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # only one output used: the other's gradient is zero
    with mmkernels.use_backend("triton"):
        g_h = torch.autograd.grad(fusion_projections(xs, ws, bs, wz, bz)[0], xs, dh)
    want_h = torch.autograd.grad(fusion_projections_ref(xs, ws, bs, wz, bz)[0], xs, dh)
    for a, b in zip(g_h, want_h):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradcheck_fusion_projections_reference_fp64():
    dims = (3, 2)
    xs = [torch.randn(4, d, dtype=torch.float64, requires_grad=True) for d in dims]
    ws = [torch.randn(3, d, dtype=torch.float64, requires_grad=True) for d in dims]
    wz = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    bz = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x0, x1, w0, w1, gw, gb):
        with mmkernels.use_backend("reference"):
            return fusion_projections([x0, x1], [w0, w1], None, gw, gb)
    assert torch.autograd.gradcheck(f, (*xs, *ws, wz, bz))


@FWD
def test_layer_empty_batch():
    layer = GatedFusion([4, 3], 5)
    xs = [torch.randn(0, 4, requires_grad=True), torch.randn(0, 3, requires_grad=True)]
    out = layer(xs, torch.zeros(0, 2, dtype=torch.bool))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in layer.parameters())


# --- bad input ------------------------------------------------------------------------------------

def test_bad_construction():
    with pytest.raises(ValueError, match=r"dims: expected a non-empty list"):
        GatedFusion([], 4)
    with pytest.raises(ValueError, match=r"hidden: expected a positive int"):
        GatedFusion([3], 0)
    with pytest.raises(ValueError, match=r"gate: expected one of"):
        GatedFusion([3], 4, gate="sigmoid")


def test_bad_call():
    layer = GatedFusion([3, 4], 5)
    x3, x4 = torch.randn(2, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"xs: expected a list of 2 tensors"):
        layer([x3])
    with pytest.raises(ValueError, match=r"xs\[1\]: expected last dim 4"):
        layer([x3, torch.randn(2, 5)])
    with pytest.raises(ValueError, match=r"xs\[0\]: expected a tensor, got NoneType"):
        layer([None, x4])
    with pytest.raises(ValueError, match=r"xs\[1\]: expected leading dims \(2,\)"):
        layer([x3, torch.randn(3, 4)])
    with pytest.raises(ValueError, match=r"modality_mask: expected shape \(2, 2\)"):
        layer([x3, x4], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"modality_mask: expected a bool tensor"):
        layer([x3, x4], torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"gate_weight: expected 10 rows for 'feature' gates"):
        gated_fusion([x3, x4], [torch.randn(5, 3), torch.randn(5, 4)], None, torch.randn(2, 7), None)
    with pytest.raises(ValueError, match=r"proj_weights\[1\]: expected shape \(5, 4\)"):
        gated_fusion([x3, x4], [torch.randn(5, 3), torch.randn(6, 4)], None, torch.randn(10, 7), None)
    with pytest.raises(ValueError, match=r"gate_weight: expected shape \(10, 7\)"):
        gated_fusion([x3, x4], [torch.randn(5, 3), torch.randn(5, 4)], None, torch.randn(10, 6), None)


@pytest.mark.parametrize("change, message", [
    (dict(ws="tensor"), r"proj_weights: expected a list of 2 tensors"),
    (dict(bs="short"), r"proj_biases: expected a list of 2 tensors"),
    (dict(ws=1), r"proj_weights\[1\]: expected a tensor, got int"),
    (dict(bs=torch.float64), r"proj_biases\[1\]: expected dtype torch.float32 \(as xs\), got torch.float64"),
    (dict(bs=(6,)), r"proj_biases\[1\]: expected shape \(5,\), got \(6,\)"),
    (dict(wz=torch.float16), r"gate_weight: expected dtype torch.float32"),
    (dict(bz=(9,)), r"gate_bias: expected shape \(10,\), got \(9,\)"),
    (dict(bz="int"), r"gate_bias: expected a tensor, got int"),
    (dict(ws0=(0, 3)), r"proj_weights\[0\]: expected a tensor \[H, 3\] with H >= 1"),
])
def test_bad_parameters_are_named_past_the_quick_check(change, message):
    # every parameter goes through one quick pass on the hot path; what it does not accept gets
    # the detailed checks, which name the argument
    x3, x4 = torch.randn(2, 3), torch.randn(2, 4)
    ws, bs = [torch.randn(5, 3), torch.randn(5, 4)], [torch.randn(5), torch.randn(5)]
    wz, bz = torch.randn(10, 7), torch.randn(10)
    gated_fusion([x3, x4], ws, bs, wz, bz)                               # well-formed: accepted
    if "ws" in change:
        ws = torch.randn(5, 7) if change["ws"] == "tensor" else [ws[0], 1]
    if "ws0" in change:
        ws = [torch.randn(*change["ws0"]), ws[1]]
    if "bs" in change:
        v = change["bs"]
        bs = bs[:1] if v == "short" else [bs[0], bs[1].to(v) if isinstance(v, torch.dtype) else torch.randn(*v)]
    if "wz" in change:
        wz = wz.to(change["wz"])
    if "bz" in change:
        bz = 3 if change["bz"] == "int" else torch.randn(*change["bz"])
    with pytest.raises(ValueError, match=message):
        gated_fusion([x3, x4], ws, bs, wz, bz)


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (cuBLAS + Triton GEMMs, bf16, on real hardware)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dims,hidden,gate", [((768, 1024, 512), 1024, "feature"), ((4096, 300), 512, "feature"),
                                              ((256, 256, 256), 128, "modality")])
@FWD
def test_gpu_gated_fusion_layer(dtype, dims, hidden, gate):
    check("auto", dims, hidden, gate, (512,), dtype, "cuda")
    # equal widths as slices of one tensor: the batched projection path
    layer = GatedFusion(dims, hidden, gate=gate, device="cuda", dtype=dtype)
    if len(set(dims)) == 1:
        feats = torch.randn(64, len(dims), dims[0], device="cuda", dtype=dtype)
        ws, bs, wz, bz = params(layer)
        got = fusion_projections(list(feats.unbind(1)), ws, bs, wz, bz)
        want = fusion_projections_ref(list(feats.unbind(1)), ws, bs, wz, bz)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)


def test_cuda_backend_names_why_it_cannot_run_the_gemms():
    xs = [torch.randn(2, 3)]
    with mmkernels.use_backend("cuda"), pytest.raises(mmkernels.BackendError, match=r"no CUDA C\+\+ kernel"):
        fusion_projections(xs, [torch.randn(4, 3)], None, torch.randn(4, 3))


def test_autocast_runs_the_gemms_in_its_dtype():
    # AMP: fp32 parameters and inputs inside torch.autocast(bf16) -> bf16 GEMMs and output, fp32
    # parameter gradients, as with nn.Linear; close to the same layer computed without autocast
    layer = GatedFusion([12, 8], 6)
    xs = [torch.randn(5, 12, requires_grad=True), torch.randn(5, 8, requires_grad=True)]
    mask = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool)
    with mmkernels.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xs, mask)
        lin = torch.nn.Linear(12, 6)(xs[0])
    assert out.dtype == torch.bfloat16 == lin.dtype
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert xs[0].grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), layer(xs, mask).detach(), atol=5e-2, rtol=5e-2)


def test_autocast_concat_linear_and_attention_pool():
    # inside torch.autocast the ops compute exactly what they compute on inputs cast to its dtype
    x, q = torch.randn(3, 4, 8), torch.randn(2, 4)
    xs, w, b = [torch.randn(3, 5), torch.randn(3, 2)], torch.randn(4, 7), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mmkernels.concat_linear(xs, w, b)
        p = mmkernels.attention_pool(x, q)
    assert y.dtype == torch.bfloat16 and p.dtype == torch.bfloat16
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    torch.testing.assert_close(y, mmkernels.concat_linear([bf(t) for t in xs], bf(w), bf(b)))
    torch.testing.assert_close(p, mmkernels.attention_pool(bf(x), bf(q)))


# --- the fused candidate: the gating in the gate GEMM's epilogue ------------------------------------

def _count_fused(monkeypatch):
    calls = []
    real = fused.gate_and_sum
    monkeypatch.setattr(fused, "gate_and_sum", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


@pytest.mark.parametrize("dims,hidden,lead", [((24, 7, 40), 12, (9,)), ((5, 6, 7, 8), 17, (37,)), ((33,), 5, (2, 3))],
                         ids=["m3", "m4", "m1"])
def test_fused_candidate_runs_the_epilogue_and_matches(monkeypatch, dims, hidden, lead):
    calls = _count_fused(monkeypatch)
    with candidates.use(fused.FWD_SLOT, "fused"):
        check("triton", dims, hidden, "feature", lead, torch.float32, TRITON_DEVICE)
    assert calls == [True]            # one launch, storing z for the backward
    calls.clear()
    layer, xs, mask = layer_and_inputs(dims, hidden, "feature", lead, torch.float32, TRITON_DEVICE)
    with candidates.use(fused.FWD_SLOT, "fused"), mmkernels.use_backend("triton"), torch.no_grad():
        out = layer(xs, mask)
    assert calls == [False]           # inference: no z written
    assert_close(out, expected(layer, xs, mask, torch.zeros_like(out))[0], torch.float32, "out")


@pytest.mark.parametrize("gate,dims", [("modality", (8, 6, 4)), ("feature", (4,) * (fused.MAX_M + 1))])
def test_fused_candidate_leaves_other_layers_to_the_separate_path(monkeypatch, gate, dims):
    calls = _count_fused(monkeypatch)
    with candidates.use(fused.FWD_SLOT, "fused"):
        check("triton", dims, 5, gate, (7,), torch.float32, TRITON_DEVICE)
        check("reference", (8, 6), 5, "feature", (7,), torch.float32, TRITON_DEVICE)
    assert calls == []


_AOT_SCRIPT = r"""
import json, sys, torch
from mmkernels import runtime, testing
from mmkernels.ops.gated_fusion import fused
rows, dims, h = 512, (768, 1024, 300), 256
xs = [torch.randn(rows, d, dtype=torch.bfloat16) for d in dims]
h_pre = torch.randn(rows, len(dims), h, dtype=torch.bfloat16)
gw, gb = torch.randn(len(dims) * h, sum(dims), dtype=torch.bfloat16), torch.randn(len(dims) * h, dtype=torch.bfloat16)
mask = torch.rand(rows, len(dims)) > 0.3
out = []
for arch in map(int, sys.argv[1:]):
    with runtime.compile_target(arch), runtime.capture_launches() as launches:   # the tile that chip gets
        fused.gate_and_sum(xs, h_pre, gw, gb, mask, True)
        if arch == 90:
            fused.gate_and_sum(xs[:2], h_pre[:, :2], gw[: 2 * h, :1792], None, None, False)
    for kernel, args, meta in launches:
        c, bound = runtime.aot_compile(kernel, args, meta, arch, return_bound=True)
        testing.check_launcher(c, bound, f"fused sm_{arch}")
        ptx = c.asm["ptx"]
        out.append(dict(arch=arch, shared=int(c.metadata.shared),
                        tensor_cores=any(k in ptx for k in ("wgmma", "mma.sync", "tcgen05.mma")),
                        **testing.ptxas_report(ptx, arch)))
print(json.dumps(out))
"""

# shared memory one block may use, by target: A100, RTX 30, RTX 40 / L4, H100 / H200, B200, RTX 50
TARGET_SMEM = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@pytest.mark.slow
def test_fused_kernel_compiles_for_every_target_without_spills_and_packs_its_launch():
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, *map(str, TARGET_SMEM)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted({r["arch"] for r in rows}) == sorted(TARGET_SMEM) and len(rows) == len(TARGET_SMEM) + 1
    for r in rows:   # tensor cores (wgmma, mma.sync, tcgen05) on every target, no spill, shared memory that fits
        assert r["tensor_cores"] and r["spill_bytes"] == 0, r
        assert r["shared"] <= TARGET_SMEM[r["arch"]], r
