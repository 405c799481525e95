"""torch.compile(fullgraph=True) runs through every mmkernels layer without a break: one registered
op per call, except for ``auto`` on CPU tensors, where the graph holds the CPU path's plain PyTorch
operations (so inductor fuses them as it does the same model written without mmkernels)."""
import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.nn import NormConcat
from conftest import compiled_targets

pytestmark = pytest.mark.slow


class Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 6)
        self.norm = NormConcat([6, 10])
        self.head = nn.Linear(16, 3)

    def forward(self, image, text):
        return self.head(torch.relu(self.norm([self.proj(image), text])))


def test_compile_fullgraph_forward_and_backward_match_eager():
    torch._dynamo.reset()
    model = Fusion()
    image, text = torch.randn(8, 12), torch.randn(8, 10, requires_grad=True)
    eager = model(image, text)
    g_eager = torch.autograd.grad(eager.sum(), [text, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(image, text)
    g = torch.autograd.grad(out.sum(), [text, *model.parameters()])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compiled_graph_holds_the_registered_op_except_auto_on_cpu(backend):
    a, b = torch.randn(3, 4), torch.randn(3, 5)
    got, targets = compiled_targets(lambda a, b: mmkernels.norm_concat([a, b], backend=backend), a, b)
    torch.testing.assert_close(got, mmkernels.norm_concat([a, b], backend="reference"))
    assert (torch.ops.mmkernels.norm_concat.default in targets) == (backend == "reference"), targets
    if backend == "auto":
        assert torch.cat in targets, targets


def test_changing_backend_after_compile_takes_effect():
    torch._dynamo.reset()
    f = torch.compile(lambda a: mmkernels.norm_concat([a]), fullgraph=True)
    x = torch.randn(3, 4)
    f(x)
    with mmkernels.use_backend("cuda"), pytest.raises(mmkernels.BackendError):
        f(x)  # the guard on the backend recompiles; the cuda backend refuses CPU tensors


def test_opcheck():
    xs = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    ws = [torch.randn(3, requires_grad=True), torch.randn(5, requires_grad=True)]
    bs = [torch.randn(3, requires_grad=True)]
    torch.library.opcheck(torch.ops.mmkernels.norm_concat.default,
                          (xs, ws, bs, [True, True], [True, False], False, 1e-5, "reference"))


class Pooling(nn.Module):
    """Learned-query pooling of image tokens, text-conditioned pooling of audio frames, both ragged."""

    def __init__(self):
        super().__init__()
        self.image = mmkernels.nn.AttentionPool(16, 2, num_queries=3, key_proj=True)
        self.audio = mmkernels.nn.CrossModalAttentionPool(6, 16, 4)

    def forward(self, img, img_len, aud, cu, text):
        return self.image(img, img_len).sum(1) + self.audio(aud, text, cu_seqlens=cu, max_seqlen=5)


def test_compile_fullgraph_attention_pool_layers_match_eager():
    torch._dynamo.reset()
    model = Pooling()
    img, img_len = torch.randn(3, 7, 16, requires_grad=True), torch.tensor([7, 0, 2])
    aud, cu = torch.randn(9, 16, requires_grad=True), torch.tensor([0, 5, 5, 9], dtype=torch.int32)
    text = torch.randn(3, 6, requires_grad=True)
    args = (img, img_len, aud, cu, text)
    eager = model(*args)
    leaves = [img, aud, text, *model.parameters()]
    g_eager = torch.autograd.grad(eager.sum(), leaves)
    out = torch.compile(model, fullgraph=True)(*args)
    g = torch.autograd.grad(out.sum(), leaves)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("with_key", [False, True])
def test_opcheck_attention_pool(with_key):
    x = torch.randn(3, 5, 8, requires_grad=True)
    key = torch.randn(3, 5, 8, requires_grad=True) if with_key else None
    q = torch.randn(1, 2, 2, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.attention_pool.default,
                          (x, key, q, torch.tensor([5, 0, 3]), None, 5, 0.5, "reference"))
    xp = torch.randn(6, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.attention_pool.default,
                          (xp, None, torch.randn(2, 2, 2, 4, requires_grad=True), None,
                           torch.tensor([0, 4, 6], dtype=torch.int32), 4, 0.5, "reference"))


def test_compile_fullgraph_concat_linear_matches_eager():
    torch._dynamo.reset()
    layer = mmkernels.nn.ConcatLinear([5, 7], 4, activation="gelu")
    xs = [torch.randn(6, 5, requires_grad=True), torch.randn(6, 7, requires_grad=True)]
    eager = layer(xs)
    leaves = [*xs, *layer.parameters()]
    g_eager = torch.autograd.grad(eager.sum(), leaves)
    out = torch.compile(layer, fullgraph=True)(xs)
    g = torch.autograd.grad(out.sum(), leaves)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_opcheck_concat_linear(activation):
    xs = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    w, b = torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkernels.concat_linear.default, (xs, w, b, activation, "reference"))
    torch.library.opcheck(torch.ops.mmkernels.concat_linear.default, (xs, w, None, activation, "reference"))


@pytest.mark.parametrize("gate", ["feature", "modality"])
def test_compile_fullgraph_gated_fusion_matches_eager(gate):
    torch._dynamo.reset()
    layer = mmkernels.nn.GatedFusion([5, 7, 3], 4, gate=gate)
    xs = [torch.randn(6, d, requires_grad=True) for d in (5, 7, 3)]
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    eager = layer(xs, mask)
    leaves = [*xs, *layer.parameters()]
    g_eager = torch.autograd.grad(eager.sum(), leaves)
    out = torch.compile(layer, fullgraph=True)(xs, mask)
    g = torch.autograd.grad(out.sum(), leaves)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("feature", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_opcheck_gated_sum(feature, masked):
    h = torch.randn(4, 3, 5, requires_grad=True)
    z = torch.randn(*((4, 3, 5) if feature else (4, 3)), requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool) if masked else None
    torch.library.opcheck(torch.ops.mmkernels.gated_sum.default, (h, z, mask, "reference"))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_fusion_projections(bias):
    xs = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    ws = [torch.randn(6, 3, requires_grad=True), torch.randn(6, 5, requires_grad=True)]
    bs = [torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)] if bias else []
    wz, bz = torch.randn(12, 8, requires_grad=True), (torch.randn(12, requires_grad=True) if bias else None)
    torch.library.opcheck(torch.ops.mmkernels.fusion_projections.default, (xs, ws, bs, wz, bz, "reference"))


def test_compile_fullgraph_under_autocast():
    torch._dynamo.reset()
    layer = mmkernels.nn.GatedFusion([12, 8], 6)
    xs = [torch.randn(5, 12), torch.randn(5, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.compile(layer, fullgraph=True)(xs)
        want = layer(xs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want)
