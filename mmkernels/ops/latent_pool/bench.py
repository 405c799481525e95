"""Benchmark cases and providers for latent_pool: attention-pooling heads of real models, head only,
as ``mmkernels.patch`` runs them (requires timm / transformers / open_clip: the ``patch`` extra).

Each case builds the library's own module with random weights (one per case, dtype and device, so
every input set shares it and the compiled baseline sees one graph) and patches it. Every provider
takes ``(module, x)``: ``eager`` runs the original module (the class's own forward), ``compile``
its ``torch.compile``, ``patched`` the absorbed forward (latent_pool on the process-wide backend:
Triton on a GPU, the CPU path on a CPU). ``probe`` cases are an attentive probe's training step on
cached features: gradients for the head's parameters only, none for x.

Traffic and FLOPs count the absorbed head (what the floor is for): one read of x; per token and
query two D-wide dot products (scores, pooling).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

import mmkernels

from ...bench.spec import BenchSpec, Case, Inputs, compiled_provider, traffic

CASES = [
    # SigLIP so400m/14 at 384 px: 729 tokens of width 1152, 16 heads, MLP 4304 (timm AttentionPoolLatent).
    Case("so400m_b256_n729", dict(kind="timm_latent", B=256, N=729, D=1152, H=16, mlp=4304), ("quick",)),
    # SigLIP base/16 at 224 px: 196 tokens of width 768, 12 heads (transformers' head).
    Case("siglip_base_b1024_n196", dict(kind="siglip", B=1024, N=196, D=768, H=12, mlp=3072), ("quick",)),
    # CLIP RN50: a 7x7 map of width 2048, 32 heads, output 1024 (open_clip AttentionPool2d; 50 tokens).
    Case("rn50_clip_b1024_7x7", dict(kind="clip_rn", B=1024, N=50, D=2048, H=32, out=1024), ("quick",)),
    # Attentive probe (MAP head + classifier) trained on cached ViT-L/14 features: 256 tokens, 16 heads.
    Case("probe_b1024_n256_d1024", dict(kind="timm_latent", B=1024, N=256, D=1024, H=16, mlp=4096, probe=True,
                                         classes=1000)),
    # CPU timings (README): the same heads at smaller batch; run them by name (--case), they are
    # too large for the Triton interpreter the "cpu" tag's tests run every provider under.
    Case("cpu_so400m_b4_n729", dict(kind="timm_latent", B=4, N=729, D=1152, H=16, mlp=4304), ("cpu-large",)),
    Case("cpu_siglip_base_b16_n196", dict(kind="siglip", B=16, N=196, D=768, H=12, mlp=3072), ("cpu-large",)),
    Case("cpu_rn50_clip_b16_7x7", dict(kind="clip_rn", B=16, N=50, D=2048, H=32, out=1024), ("cpu-large",)),
    Case("cpu_probe_b8_n256_d1024", dict(kind="timm_latent", B=8, N=256, D=1024, H=16, mlp=4096, probe=True,
                                         classes=1000), ("cpu-large",)),
    # Whole model: a random-weight SigLIP so400m/14 at 384 px (timm ViT, MAP head), patched vs not;
    # the head is under 1% of the model's FLOPs, so this shows what patching buys end to end.
    Case("model_so400m_b32_384", dict(kind="timm_vit", model="vit_so400m_patch14_siglip_384", B=32, img=384,
                                      patch=14, kwargs={})),
    # Small versions of each family, for the CPU harness tests.
    Case("tiny_latent_b2_n50_d96", dict(kind="timm_latent", B=2, N=50, D=96, H=4, mlp=192), ("cpu",)),
    Case("tiny_siglip_b2_n49_d64", dict(kind="siglip", B=2, N=49, D=64, H=4, mlp=128), ("cpu",)),
    Case("tiny_rn_b2_7x7_d64", dict(kind="clip_rn", B=2, N=50, D=64, H=4, out=32), ("cpu",)),
    Case("tiny_probe_b2_n40_d64", dict(kind="timm_latent", B=2, N=40, D=64, H=4, mlp=128, probe=True, classes=10),
         ("cpu",)),
    Case("tiny_model_b2_56", dict(kind="timm_vit", model="vit_so400m_patch14_siglip_384", B=2, img=56, patch=14,
                                  kwargs=dict(depth=1, embed_dim=64, num_heads=4, mlp_ratio=2.0)), ("cpu",)),
]


class _Pair(torch.nn.Module):
    """A whole model twice over the same parameter tensors: ``orig`` as the library builds it,
    ``patched`` through :func:`mmkernels.patch`. Calling the pair runs the patched one."""

    def __init__(self, orig: torch.nn.Module, patched: torch.nn.Module):
        super().__init__()
        self.orig, self.patched = orig, patched

    def forward(self, x):
        return self.patched(x)


def _create_vit(p, **extra):
    import timm
    return timm.create_model(p["model"], pretrained=False, img_size=p["img"], **p["kwargs"], **extra)

_MODULES: Dict[Tuple, torch.nn.Module] = {}


def build(case: Case) -> torch.nn.Module:
    """The case's module (random weights), unpatched."""
    p = case.params
    torch.manual_seed(0)
    if p["kind"] == "timm_vit":
        return _create_vit(p)
    if p["kind"] == "timm_latent":
        from timm.layers import AttentionPoolLatent
        return AttentionPoolLatent(p["D"], out_features=p.get("classes"), num_heads=p["H"],
                                   mlp_ratio=p["mlp"] / p["D"], norm_layer=torch.nn.LayerNorm)
    if p["kind"] == "siglip":
        from transformers import SiglipVisionConfig
        from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead
        return SiglipMultiheadAttentionPoolingHead(SiglipVisionConfig(
            hidden_size=p["D"], num_attention_heads=p["H"], intermediate_size=p["mlp"]))
    from open_clip.modified_resnet import AttentionPool2d
    return AttentionPool2d(7, p["D"], p["H"], p["out"])


def _module(case: Case, dtype, device):
    key = (case.name, dtype, str(device))
    if key not in _MODULES:
        import mmkernels.patch
        m = build(case).to(device=device, dtype=dtype).eval()
        orig = None
        if case.params["kind"] == "timm_vit":
            orig = build(case).to(device=device, dtype=dtype).eval()
            for mo, mp in zip(orig.modules(), m.modules()):   # the very same tensors: one set of leaves
                mo._parameters.update({k: v for k, v in mp._parameters.items() if v is not None})
                mo._buffers.update({k: v for k, v in mp._buffers.items() if v is not None})
        report = mmkernels.patch.patch(m)
        assert len(report.patched) == 1, report
        _MODULES[key] = m if orig is None else _Pair(orig, m)
    return _MODULES[key]


def make_inputs(case: Case, dtype: torch.dtype, device) -> Inputs:
    p = case.params
    m = _module(case, dtype, device)
    if p["kind"] == "timm_vit":
        B = p["B"]
        x = torch.randn(B, 3, p["img"], p["img"], dtype=dtype, device=device)
    elif p["kind"] == "clip_rn":
        B = p["B"]
        x = torch.randn(B, p["D"], 7, 7, dtype=dtype, device=device)
    else:
        B, N, D = p["B"], p["N"], p["D"]
        x = torch.randn(B, N, D, dtype=dtype, device=device)
    with torch.no_grad():
        out = m(x[:1])
    params = [t for t in (m.patched if isinstance(m, _Pair) else m).parameters()]
    leaves = params if p.get("probe") else [x] + params
    return Inputs(args=(m, x), leaves=leaves, grad_out=torch.randn((B,) + out.shape[1:], dtype=dtype, device=device))


def _queries(p) -> int:
    return p["H"]  # one latent (CLIP: the mean token's row) x heads


def traffic_of(case: Case, dtype: torch.dtype):
    """fwd reads x once and the head's weights, writes the output; bwd reads dy and x, writes dx
    (none for a probe) and the weight gradients."""
    e = torch.empty((), dtype=dtype).element_size()
    p = case.params
    if p["kind"] == "timm_vit":   # the model: images in, pooled features out, its weights once
        w = _vit_facts(p)
        sizes = dict(x=p["B"] * 3 * p["img"] ** 2 * e, w=w["params"] * e, y=p["B"] * w["width"] * e)
        sizes.update(dy=sizes["y"], dx=sizes["x"], dw=sizes["w"])
        return traffic(sizes, fwd=(("x", "w"), ("y",)), bwd=(("dy", "x", "w"), ("dx", "dw")))
    act = p["B"] * p["N"] * p["D"] * e
    weights = _head_params(case) * e
    small = p["B"] * p["D"] * e
    sizes = dict(x=act, w=weights, y=small, dy=small, dx=0 if p.get("probe") else act, dw=weights)
    return traffic(sizes, fwd=(("x", "w"), ("y",)), bwd=(("dy", "x", "w"), ("dx", "dw")))


def _head_params(case: Case) -> int:
    """Parameters of the case's head. open_clip's ``AttentionPool2d`` is counted from its layout
    (a positional embedding of 7x7 + 1 tokens, q/k/v projections D -> D and c_proj D -> out, with
    biases), so the floor needs no open_clip; the others are built on the meta device."""
    p = case.params
    if p["kind"] == "clip_rn":
        D, out = p["D"], p["out"]
        return (7 * 7 + 1) * D + 3 * (D * D + D) + D * out + out
    with torch.device("meta"):
        return sum(t.numel() for t in build(case).parameters())


def _vit_facts(p) -> Dict[str, int]:
    """Parameter count and width of a timm ViT case, from a model built on the meta device."""
    with torch.device("meta"):
        m = _create_vit(p)
    return dict(params=sum(t.numel() for t in m.parameters()), width=m.num_features)


def flops(case: Case, mode: str) -> int:
    p = case.params
    if p["kind"] == "timm_vit":   # ~2 FLOPs per weight per token (attention's own products not counted)
        fwd = 2 * _vit_facts(p)["params"] * p["B"] * (p["img"] // p["patch"]) ** 2
        return int({"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode])
    one = 2 * 2 * _queries(p) * p["B"] * p["N"] * p["D"]   # scores and pooling, D-wide, per query and token
    return int({"fwd": one, "bwd": 2 * one, "fwd+bwd": 3 * one}[mode])


def _original(m, x):
    if isinstance(m, _Pair):
        return m.orig(x)
    return type(m).forward(m, x)


def _patched(m, x):
    return m(x)


def _on(backend):
    def run(m, x):
        with mmkernels.use_backend(backend):
            return m(x)
    return run


SPEC = BenchSpec(
    op="latent_pool",
    cases=CASES,
    make_inputs=make_inputs,
    providers={
        "eager": _original,                   # the library's own forward (the original module), eager
        "compile": compiled_provider(_original),   # torch.compile of the original
        "patched": _patched,                  # mmkernels.patch: the absorbed forward, process-wide backend
        "triton": _on("triton"),              # the absorbed forward on the Triton kernels
        "cuda": _on("cuda"),                  # (no CUDA C++ latent_pool: refuses, BackendError)
    },
    traffic=traffic_of,
    flops=flops,
    baselines=("eager", "compile"),
)
