"""Worker of tests/test_fsdp.py (a module of its own so that spawned processes import nothing of
pytest's): the layers under FSDP2 (``fully_shard``), one training step on this rank's half of a
fixed global batch; saves the full (unsharded) gradients and parameters."""
import os

import torch
from torch import nn

GLOBAL_BATCH = 8


class Model(nn.Module):
    """Every mmkernels layer on a small tri-modal input: per-modality norm + concat, attention
    pooling over ragged tokens, gated fusion and concat + linear."""

    def __init__(self):
        super().__init__()
        import mmkernels.nn as mn
        self.norm = mn.NormConcat([6, 10])
        self.pool = mn.AttentionPool(8, 2, num_queries=1, key_proj=True)
        self.gmu = mn.GatedFusion([16, 8], 12)
        self.head = mn.ConcatLinear([12, 16], 5, activation="gelu")

    def forward(self, a, b, tokens, lengths):
        nc = self.norm([a, b])
        pooled = self.pool(tokens, lengths)
        return self.head([self.gmu([nc, pooled]), nc])


def make_model():
    torch.manual_seed(0)
    return Model()


def global_batch():
    g = torch.Generator().manual_seed(1)
    B = GLOBAL_BATCH
    return (torch.randn(B, 6, generator=g), torch.randn(B, 10, generator=g), torch.randn(B, 7, 8, generator=g),
            torch.randint(0, 8, (B,), generator=g), torch.randint(0, 5, (B,), generator=g))


def loss_of(model, a, b, tokens, lengths, labels):
    return nn.functional.cross_entropy(model(a, b, tokens, lengths), labels, reduction="sum") / GLOBAL_BATCH


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = make_model()
        for layer in (model.norm, model.pool, model.gmu, model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        n = GLOBAL_BATCH // world
        batch = [t[rank * n:(rank + 1) * n] for t in global_batch()]
        # FSDP averages gradients over ranks; the loss is a sum over the global batch: scale back
        (loss_of(model, *batch) * world).backward()
        grads = {k: p.grad.full_tensor().clone() for k, p in model.named_parameters() if p.grad is not None}
        opt.step()
        params = {k: p.detach().full_tensor().clone() for k, p in model.named_parameters()}
        torch.save((grads, params), os.path.join(out_dir, f"fsdp-{rank}.pt"))
    finally:
        dist.destroy_process_group()
