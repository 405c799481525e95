"""torch.compile(fullgraph=True) runs through every mmkernels layer: one registered op, no break."""
import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.nn import NormConcat

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


def test_compiled_graph_holds_the_registered_op():
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda a, b: mmkernels.norm_concat([a, b]), backend=capture, fullgraph=True)
    f(torch.randn(3, 4), torch.randn(3, 5))
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.mmkernels.norm_concat.default in targets


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
