"""mmkernels.patch against the real modules of timm, transformers and open_clip (random weights,
built from their config classes and constructors; nothing downloads): the patched forward and
every parameter gradient equal the original's (fp64 and fp32 to rounding; bf16 as close to an
fp32 reference as the original is), with masks, in train and eval, through state dicts, unpatch,
torch.compile and DDP; every refusal is reported with its reason."""
import copy
import os

import pytest
import torch
from torch import nn

import mmkernels
import mmkernels.patch as P

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

from timm.layers import AttentionPool2d as TimmPool2d  # noqa: E402
from timm.layers import AttentionPoolLatent  # noqa: E402
from open_clip.modified_resnet import AttentionPool2d as ClipPool2d  # noqa: E402
from transformers import Siglip2VisionConfig, SiglipVisionConfig  # noqa: E402
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead  # noqa: E402
from transformers.models.siglip2.modeling_siglip2 import Siglip2MultiheadAttentionPoolingHead  # noqa: E402

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def siglip_cfg(cls=SiglipVisionConfig, impl="sdpa", **kw):
    cfg = cls(hidden_size=48, num_attention_heads=4, intermediate_size=64, **kw)
    cfg._attn_implementation = impl
    return cfg


def aimv2_head():
    aimv2 = pytest.importorskip("transformers.models.aimv2.modeling_aimv2")
    if not hasattr(aimv2, "Aimv2AttentionPoolingHead"):
        pytest.skip("this transformers has no AIMv2 head")
    return aimv2.Aimv2AttentionPoolingHead(transformers.Aimv2VisionConfig(hidden_size=48, num_attention_heads=4))


# (id, module factory, input factory(B, dtype) -> (args, kwargs))
TOKENS = lambda B, dt, N=10, D=48: ((torch.randn(B, N, D, dtype=dt),), {})
MAP2D = lambda B, dt, C=48: ((torch.randn(B, C, 3, 3, dtype=dt),), {})


def _siglip2_mask(B, dt):
    m = torch.ones(B, 10, dtype=torch.long)
    m[1, 6:] = 0
    if B > 2:
        m[2] = 0          # an all-padding row: transformers' finfo.min mask averages it uniformly
    return (torch.randn(B, 10, 48, dtype=dt), m), {}


CASES = [
    ("timm-latent", lambda: AttentionPoolLatent(48, num_heads=4, norm_layer=nn.LayerNorm), TOKENS),
    ("timm-latent-len3-pos-noq", lambda: AttentionPoolLatent(48, num_heads=4, latent_len=3, pos_embed="abs",
                                                              feat_size=10, q_proj=False, pool_type="avg"), TOKENS),
    ("timm-latent-prelogits", lambda: AttentionPoolLatent(48, out_features=0, num_heads=6, qkv_bias=False), TOKENS),
    ("siglip", lambda: SiglipMultiheadAttentionPoolingHead(siglip_cfg()), TOKENS),
    ("siglip2-mask-sdpa", lambda: Siglip2MultiheadAttentionPoolingHead(siglip_cfg(Siglip2VisionConfig)), _siglip2_mask),
    ("siglip2-mask-eager", lambda: Siglip2MultiheadAttentionPoolingHead(siglip_cfg(Siglip2VisionConfig, "eager")),
     _siglip2_mask),
    ("aimv2", aimv2_head, TOKENS),
    ("open_clip-rn", lambda: ClipPool2d(3, 48, 4, 32), MAP2D),
    ("timm-rn-qkv", lambda: TimmPool2d(48, feat_size=3, num_heads=4, out_features=32), MAP2D),
    ("timm-rn-separate-cls", lambda: TimmPool2d(48, feat_size=3, head_dim=16, qkv_separate=True, class_token=True),
     MAP2D),
]


def init_(m):
    """Random values in every parameter (several start at zero: a test would not see them)."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


def run(m, args, kwargs, dy=None):
    args = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = m(*args, **kwargs)
    if dy is None:
        dy = torch.randn_like(out)
    out.backward(dy)
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in m.named_parameters()}
    return out, args[0].grad, grads, dy


def compare(case, dtype=torch.float64, backend=None, train=False, B=3):
    _, make_module, make_input = case
    torch.manual_seed(0)
    orig = init_(make_module()).to(dtype).train(train)
    patched = copy.deepcopy(orig)
    report = P.patch(patched, **({} if backend is None else {"backend": backend}))
    assert len(report.patched) == 1, report
    args, kwargs = make_input(B, dtype)
    out0, dx0, g0, dy = run(orig, args, kwargs)
    out1, dx1, g1, _ = run(patched, args, kwargs, dy)
    tol = TOL[dtype]
    torch.testing.assert_close(out1, out0, **tol)
    torch.testing.assert_close(dx1, dx0, **tol)
    assert g1.keys() == g0.keys()
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None:
            torch.testing.assert_close(g1[n], g0[n], **tol, msg=lambda m: f"grad {n}: {m}")
    return orig, patched


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_every_gradient_equal_the_original(case, dtype):
    compare(case, dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7]], ids=["timm-latent", "siglip2", "open_clip-rn"])
def test_triton_backend_equals_the_original(case):
    compare(case, torch.float32, backend="triton", B=2)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[7]], ids=["timm-latent", "siglip", "open_clip-rn"])
def test_bf16_sits_as_close_to_fp32_as_the_original(case):
    _, make_module, make_input = case
    torch.manual_seed(0)
    ref = init_(make_module())
    args, kwargs = make_input(4, torch.float32)
    want = ref(*args, **kwargs)
    orig = copy.deepcopy(ref).bfloat16()
    patched = copy.deepcopy(orig)
    P.patch(patched)
    a16 = [a.bfloat16() if a.is_floating_point() else a for a in args]
    err = lambda m: ((m(*a16, **kwargs).float() - want).abs().max() / want.abs().max()).item()
    e_orig, e_patched = err(orig), err(patched)
    assert e_patched <= max(2 * e_orig, 1e-2), (e_orig, e_patched)


def test_train_mode_equals_and_dropout_refused_only_where_active():
    compare(CASES[0], train=True)
    compare(CASES[3], train=True)                         # nn.MultiheadAttention dropout 0: patched in training
    cfg = siglip_cfg(attention_dropout=0.0)
    head = SiglipMultiheadAttentionPoolingHead(cfg)
    head.attention.dropout = 0.1
    assert P.patch(copy.deepcopy(head).train()).reasons() == ["attention dropout active in training"]
    patched = copy.deepcopy(head).eval()
    assert len(P.patch(patched).patched) == 1             # eval: dropout off, patched ...
    patched.train()
    x = torch.randn(2, 10, 48)
    torch.manual_seed(1)
    want = head.train()(x)
    torch.manual_seed(1)
    torch.testing.assert_close(patched(x), want)          # ... and in training it runs the original forward
    drop2d = TimmPool2d(48, feat_size=3, num_heads=4, drop_rate=0.5).train()
    assert P.patch(drop2d).reasons() == ["attention dropout active in training"]


def test_timm_naflex_mask_and_fully_masked_rows_keep_the_original_behaviour():
    from timm.models.naflexvit import create_attention_mask
    torch.manual_seed(0)
    orig = init_(AttentionPoolLatent(48, num_heads=4)).double()
    patched = copy.deepcopy(orig)
    P.patch(patched)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, 4:] = False
    valid[2] = False
    x = torch.randn(3, 10, 48, dtype=torch.float64)
    fmask = create_attention_mask(valid, symmetric=False, q_len=1, dtype=x.dtype)       # finfo.min, expanded
    torch.testing.assert_close(patched(x, attn_mask=fmask), orig(x, attn_mask=fmask))    # uniform on row 2
    bmask = valid[:, None, None, :]                                                      # bool: SDPA gives zeros
    torch.testing.assert_close(patched(x, attn_mask=bmask), orig(x, attn_mask=bmask))
    imask = torch.zeros(3, 1, 1, 10, dtype=x.dtype).masked_fill(~bmask, float("-inf"))
    for fused in (True, False):                                                          # unfused softmax: NaN
        orig.fused_attn = patched.fused_attn = fused
        got, want = patched(x, attn_mask=imask), orig(x, attn_mask=imask)
        assert torch.isnan(want[2]).all() == torch.isnan(got[2]).all() == (not fused)
        torch.testing.assert_close(got, want, equal_nan=True)
    per_query = torch.randn(3, 4, 1, 10, dtype=x.dtype)                                  # per-head: original runs
    torch.testing.assert_close(patched(x, attn_mask=per_query), orig(x, attn_mask=per_query))


def test_state_dict_parameters_and_round_trip():
    m = init_(AttentionPoolLatent(48, num_heads=4, pos_embed="abs", feat_size=10))
    params = dict(m.named_parameters())
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    P.patch(m)
    assert {n: p for n, p in m.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in m.named_parameters())     # the very same tensors
    assert m.state_dict().keys() == sd.keys()
    other = init_(AttentionPoolLatent(48, num_heads=4, pos_embed="abs", feat_size=10))
    P.patch(other)
    other.load_state_dict(m.state_dict())
    x = torch.randn(2, 10, 48)
    torch.testing.assert_close(other(x), m(x))
    m2 = copy.deepcopy(m)                                            # deepcopy keeps the patch
    assert P.is_patched(m2) and torch.equal(m2(x), m(x))


def test_patch_then_unpatch_is_the_original_forward():
    m = init_(SiglipMultiheadAttentionPoolingHead(siglip_cfg()))
    x = torch.randn(2, 10, 48)
    want = m(x)
    assert len(P.patch(m).patched) == 1 and P.patch(m).patched       # patching twice is harmless
    assert P.unpatch(m) == 1 and not P.is_patched(m)
    assert "forward" not in m.__dict__
    assert torch.equal(m(x), want)


def test_whole_models_timm_transformers_open_clip():
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8,
                            embed_dim=48, depth=1, num_heads=4, num_classes=5).eval()
    img = torch.randn(2, 3, 32, 32)
    want = vit(img)
    rep = P.patch(vit)
    assert [f for _, f in rep.patched] == ["timm_latent"] and rep.patched[0][0] == "attn_pool"
    torch.testing.assert_close(vit(img), want, atol=1e-5, rtol=1e-5)
    from transformers import Siglip2VisionModel, SiglipVisionModel
    sig = SiglipVisionModel(SiglipVisionConfig(hidden_size=48, num_attention_heads=4, intermediate_size=64,
                                               num_hidden_layers=1, image_size=32, patch_size=8)).eval()
    want = sig(pixel_values=img).pooler_output
    assert [f for _, f in P.patch(sig).patched] == ["transformers_siglip"]
    torch.testing.assert_close(sig(pixel_values=img).pooler_output, want, atol=1e-5, rtol=1e-5)
    sig2 = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=48, num_attention_heads=4, intermediate_size=64,
                                                  num_hidden_layers=1, patch_size=8, num_patches=16)).eval()
    pv = torch.randn(2, 16, 3 * 8 * 8)
    pmask = torch.ones(2, 16, dtype=torch.long)
    pmask[1, 9:] = 0
    shapes = torch.tensor([[4, 4], [3, 3]])
    kw = dict(pixel_values=pv, pixel_attention_mask=pmask, spatial_shapes=shapes)
    want = sig2(**kw).pooler_output
    assert len(P.patch(sig2).patched) == 1
    torch.testing.assert_close(sig2(**kw).pooler_output, want, atol=1e-5, rtol=1e-5)
    from open_clip.modified_resnet import ModifiedResNet
    rn = ModifiedResNet([1, 1, 1, 1], output_dim=32, heads=2, image_size=64, width=16).eval()
    img = torch.randn(2, 3, 64, 64)
    want = rn(img)
    assert [n for n, _ in P.patch(rn).patched] == ["attnpool"]
    torch.testing.assert_close(rn(img), want, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_of_patched_heads():
    for case in (CASES[0], CASES[4], CASES[7]):
        torch.manual_seed(0)
        m = init_(case[1]())
        P.patch(m)
        args, kwargs = case[2](2, torch.float32)
        want = m(*args, **kwargs)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(*args, **kwargs)
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_compile_fullgraph_inductor_forward_and_backward():
    torch.manual_seed(0)
    orig = init_(AttentionPoolLatent(48, num_heads=4, pos_embed="abs", feat_size=10))
    m = copy.deepcopy(orig)
    P.patch(m)
    x = torch.randn(2, 10, 48)   # fp32: inductor's CPU code for fp64 does not build here
    out0, _, g0, dy = run(orig, (x,), {})
    out1, _, g1, _ = run(torch.compile(m, fullgraph=True), (x,), {}, dy)
    torch.testing.assert_close(out1, out0, atol=1e-4, rtol=1e-4)
    for n in g0:
        torch.testing.assert_close(g1["_orig_mod." + n], g0[n], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo")
def test_ddp_step_of_a_patched_model_equals_single_process(tmp_path):
    import _patch_ddp_worker as w
    torch.multiprocessing.spawn(w.worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y = w.batch()
    model = w.make_model(patched=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for rank in range(2):
        params = torch.load(os.path.join(tmp_path, f"{rank}.pt"))
        for n, p in model.named_parameters():
            torch.testing.assert_close(params[n], p.detach(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{rank} {n}: {m}")


# --- refusals, each with its reason -------------------------------------------------------------

class LoraLinear(nn.Module):
    """What PEFT's LoRA puts in a Linear's place: the original under ``base_layer``."""

    def __init__(self, base):
        super().__init__()
        self.base_layer, self.lora_A = base, nn.Linear(base.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features


class MyAttentionPool(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _lora_latent():
    m = AttentionPoolLatent(48, num_heads=4)
    m.kv = LoraLinear(m.kv)
    return m


def _bias_kv_siglip():
    m = SiglipMultiheadAttentionPoolingHead(siglip_cfg())
    m.attention = nn.MultiheadAttention(48, 4, batch_first=True, add_bias_kv=True)
    return m


def _bad_shape():
    m = AttentionPoolLatent(48, num_heads=4)
    m.kv = nn.Linear(40, 96)
    return m


def _hooked():
    m = AttentionPoolLatent(48, num_heads=4)
    m.kv.register_forward_hook(lambda *a: None)
    return m


REFUSALS = [
    ("qk_norm", lambda: AttentionPoolLatent(48, num_heads=4, qk_norm=True), "qk_norm/k_norm"),
    ("rotary", lambda: timm.layers.RotAttentionPool2d(48, ref_feat_size=3, num_heads=4), "rotary"),
    ("lora", _lora_latent, "LoRA/PEFT-wrapped projection (kv)"),
    ("add_bias_kv", _bias_kv_siglip, "add_bias_kv"),
    ("unrecognised", MyAttentionPool, "unrecognised attention-pooling module"),
    ("shape", _bad_shape, "shapes contradict the type: kv.in_features 40 != embed_dim 48"),
    ("pool_type", lambda: TimmPool2d(48, feat_size=3, num_heads=4, pool_type=""), "pool_type ''"),
    ("hooks", _hooked, "forward hooks on kv"),
]


@pytest.mark.parametrize("make, reason", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_each_refusal_is_reported_with_its_reason(make, reason):
    m = nn.Sequential(make())
    report = P.patch(m)
    assert not report.patched and len(report.skipped) == 1
    assert report.skipped[0][0] == "0" and report.skipped[0][2].startswith(reason), report
    assert reason in str(report) and "forward" not in m[0].__dict__


def test_bad_arguments():
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module"):
        P.patch("not a module")
    with pytest.raises(ValueError, match="options: unknown option"):
        P.patch(nn.Linear(2, 2), fast=True)
    with pytest.raises(ValueError, match="backend"):
        P.patch(nn.Linear(2, 2), backend="cudnn")
    with pytest.raises(ValueError, match="families"):
        P.patch(nn.Linear(2, 2), families=["nope"])
    with pytest.raises(ValueError, match="model: expected"):
        P.unpatch(3)
    m = nn.Sequential(AttentionPoolLatent(48, num_heads=4), ClipPool2d(3, 48, 4))
    rep = P.patch(m, families=["clip_resnet"])
    assert rep.patched == [("1", "clip_resnet")]
    assert mmkernels.unpatch is P.unpatch
    assert mmkernels.patch(nn.Sequential(ClipPool2d(3, 48, 4))).patched == [("0", "clip_resnet")]  # callable package


def test_the_bench_floor_counts_open_clips_head_without_open_clip():
    # latent_pool's rn50 case counts the head's parameters from its layout (the GPU machine has no
    # open_clip); the count must be the real module's
    from mmkernels.ops.latent_pool import bench
    case = bench.SPEC.case("rn50_clip_b1024_7x7")
    p = case.params
    real = sum(t.numel() for t in ClipPool2d(7, p["D"], p["H"], p["out"]).parameters())
    assert bench._head_params(case) == real



def test_absorbed_heads_key_bias_gets_zero_gradient_eagerly_and_under_transforms(monkeypatch):
    # eagerly the key bias enters through a Function with no forward kernel; torch.func and forward
    # AD take the plain zero term instead: the same values and gradients either way (the pooling is
    # its plain reference here: the registered ops themselves have no functorch rules)
    from mmkernels.ops.latent_pool.reference import latent_pool_ref
    from mmkernels.patch import _absorb
    from mmkernels.patch._absorb import absorbed_heads
    monkeypatch.setattr(_absorb, "latent_pool", lambda x, q, backend=None, **kw: latent_pool_ref(x, q, **kw)[0])
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(2, 5, 8, generator=g), torch.randn(1, 1, 2, 4, generator=g)
    wk, bk, wv, bv = (torch.randn(*s, generator=g) for s in ((8, 8), (8,), (8, 8), (8,)))

    def head(x, wk, bk):
        return absorbed_heads(x, q, wk, bk, wv, bv, scale=0.5, backend="reference")
    leaves = [t.clone().requires_grad_() for t in (x, wk, bk)]
    eager = torch.autograd.grad(head(*leaves).square().sum(), leaves)
    assert not eager[2].any() and eager[2].shape == bk.shape
    transformed = torch.func.grad(lambda *a: head(*a).square().sum(), argnums=(0, 1, 2))(x, wk, bk)
    for e, t in zip(eager, transformed):
        torch.testing.assert_close(e, t)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        tangent = fwad.unpack_dual(head(x, wk, fwad.make_dual(bk.clone().requires_grad_(),
                                                              torch.ones_like(bk)))).tangent
        assert tangent is not None and not tangent.any()   # the key bias does not move the output
