"""The layers under FSDP2 (``torch.distributed.fsdp.fully_shard``): two CPU processes (gloo), one
SGD step each on half of a global batch, give the gradients and updated parameters of a
single-process step on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist

import _fsdp_worker as w
from mmkernels.testing import assert_close


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_fsdp2_two_processes_equal_single_process(tmp_path):
    world = 2
    torch.multiprocessing.spawn(w.worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    model = w.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w.loss_of(model, *w.global_batch()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(want) == len(list(model.parameters()))
    opt.step()
    for rank in range(world):
        got, params = torch.load(os.path.join(tmp_path, f"fsdp-{rank}.pt"))
        assert got.keys() == want.keys(), f"rank {rank}: different parameters got gradients"
        for name, g in got.items():
            assert_close(g, want[name], torch.float32, what=f"rank {rank} grad {name}")
        for name, p in model.named_parameters():
            assert_close(params[name], p.detach(), torch.float32, what=f"rank {rank} param {name}")
