"""Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be
switched on before triton is imported."""
import os
import sys

import torch

if "triton" in sys.modules:
    raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET")
HAS_CUDA = torch.cuda.is_available()
# under pytest-xdist (make test: one worker per core) each worker gets its share of the cores, so
# workers' intra-op thread pools do not oversubscribe the machine
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
# on a GPU every new shape compiles kernels: fewer examples keep benchmarks/gpu_check.sh short
settings.register_profile("gpu", max_examples=12, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_reset_backend():
    import mmkernels
    from mmkernels import plans
    torch.manual_seed(0)
    before = mmkernels.get_backend()
    plans.forget()       # no call plan of an earlier test (another monkeypatched module state) replays here
    yield
    mmkernels.set_backend(before)


# Where the Triton kernels can run in this process: CUDA tensors on a GPU, else CPU tensors
# through the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
# dtypes the Triton path is tested in here (bf16 needs real hardware for its matrix products; the
# norm kernels have none, but we keep the interpreter to the dtypes it is known to get right).
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


@pytest.fixture
def tf32():
    """``tf32(on)`` sets ``torch.backends.cuda.matmul.allow_tf32``; the test's end restores it. Not
    monkeypatch: pytest >= 9.2 takes the setting (served by the module's ``__getattr__``, not in
    its ``__dict__``) for a missing attribute and deletes it on undo, which raises."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32

    def set_tf32(on: bool):
        matmul.allow_tf32 = on
    yield set_tf32
    matmul.allow_tf32 = saved


def compiled_targets(fn, *args, kinds=("call_function",)):
    """``fn(*args)`` compiled with ``fullgraph=True`` after a dynamo reset: its result, and the
    targets of the captured graphs' nodes of ``kinds`` (in order)."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    got = torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return got, [n.target for g in graphs for n in g.graph.nodes if n.op in kinds]
