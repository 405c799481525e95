"""Worker of tests/test_patch.py's DDP test (a module of its own so that spawned processes import
nothing of pytest's): a patched timm ViT with an attention-pooling head under
DistributedDataParallel, one SGD step on this rank's half of a fixed batch; saves the parameters."""
import os

import torch

GLOBAL_BATCH = 4


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def make_model(patched: bool):
    import timm

    import mmkernels.patch
    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=16, patch_size=8,
                          embed_dim=32, depth=1, num_heads=2, num_classes=5)
    if patched:
        assert len(mmkernels.patch.patch(m).patched) == 1
    return m


def worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = batch()
        n = GLOBAL_BATCH // world
        model = DistributedDataParallel(make_model(patched=True))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.nn.functional.cross_entropy(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        opt.step()
        torch.save({k: p.detach().clone() for k, p in model.module.named_parameters()},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
