"""Worker of tests/test_models_ddp.py (a module of its own so that spawned processes import
nothing of pytest's): one DistributedDataParallel training step (forward, backward, SGD step)
per fusion on this rank's half of a fixed global batch; saves the gradients and the parameters."""
import os

import torch

FUSIONS = ("concat", "gated", "attention", "tfn", "lmf")   # every fusion of mmkernels.models
GLOBAL_BATCH = 8


def global_batch():
    """A fixed ragged tri-modal batch and its labels."""
    g = torch.Generator().manual_seed(1)
    B, T, L = GLOBAL_BATCH, 13, 10
    inputs = {"image": torch.rand(B, 1, 8, 8, generator=g),
              "speech": (torch.randn(B, T, 13, generator=g), torch.randint(3, T + 1, (B,), generator=g)),
              "text": (torch.randint(0, 256, (B, L), generator=g), torch.randint(1, L + 1, (B,), generator=g))}
    return inputs, torch.randint(0, 10, (B,), generator=g)


def shard(inputs, labels, rank, world):
    """Rank ``rank``'s contiguous slice, with its own (shorter) padding: ragged rows are re-padded
    to the local maximum, as a per-rank data loader would."""
    n = len(labels) // world
    sl = slice(rank * n, (rank + 1) * n)
    out = {"image": inputs["image"][sl]}
    for k in ("speech", "text"):
        x, lengths = inputs[k][0][sl], inputs[k][1][sl]
        out[k] = (x[:, :int(lengths.max())].contiguous(), lengths)
    return out, labels[sl]


def make_model(fusion, backend):
    from mmkernels.models import ModelConfig, MultimodalClassifier
    torch.manual_seed(0)
    return MultimodalClassifier(ModelConfig(fusion=fusion, backend=backend, dropout=0.0, modality_dropout=0.0,
                                            augment=False))


def worker(rank, world, init_file, out_dir, backend):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mmkernels.models.train import loss_fn
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        inputs, labels = shard(*global_batch(), rank, world)
        for fusion in FUSIONS:
            model = DistributedDataParallel(make_model(fusion, backend).train())
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            loss_fn(model(inputs), labels).backward()
            grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
            opt.step()
            params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
            torch.save((grads, params), os.path.join(out_dir, f"{fusion}-{rank}.pt"))
    finally:
        dist.destroy_process_group()
