"""The model's layers under torch.nn.parallel.DistributedDataParallel: two CPU processes (gloo),
one training step each on half of a global batch, give the gradients and updated weights of a
single-process step on the whole batch. (SGD, whose step is linear in the gradients: Adam's
first step, about lr * sign(g), amplifies rounding in near-zero gradients. Dropout, modality
dropout and SpecAugment are off: their random draws differ between one process and two.)"""
import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchvision")
pytest.importorskip("torchaudio")

import _ddp_worker as w  # noqa: E402
from mmkernels.models.train import loss_fn  # noqa: E402
from mmkernels.testing import assert_close  # noqa: E402


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_ddp_two_processes_equal_single_process(tmp_path, backend):
    world = 2
    torch.multiprocessing.spawn(w.worker, args=(world, str(tmp_path / "init"), str(tmp_path), backend),
                                nprocs=world, join=True)
    from mmkernels.models import FUSIONS
    assert w.FUSIONS == FUSIONS   # every fusion of the model
    inputs, labels = w.global_batch()
    for fusion in w.FUSIONS:
        model = w.make_model(fusion, backend).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn(model(inputs), labels).backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        for rank in range(world):
            got, params = torch.load(os.path.join(tmp_path, f"{fusion}-{rank}.pt"))
            assert got.keys() == want.keys(), f"{fusion} rank {rank}: different parameters got gradients"
            for name, g in got.items():
                assert_close(g, want[name], torch.float32, what=f"{fusion} rank {rank} grad {name}")
            for name, p in model.named_parameters():   # and the optimizer step lands on the same weights
                assert_close(params[name], p.detach(), torch.float32, what=f"{fusion} rank {rank} param {name}")
