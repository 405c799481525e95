"""Training-step benchmark of the end-to-end model (mmkernels.models.MultimodalClassifier):
the same model, seed and batches with

- ``torch``            its pooling and fusion as plain PyTorch (the ops' reference compositions),
- ``torch+compile``    the same under ``torch.compile``,
- ``mmkernels``        mmkernels layers (backend ``auto``: Triton / CUDA kernels on a GPU; on a CPU
                       the CPU path, each op's fastest plain-PyTorch formulation behind its
                       argument checks),
- ``mmkernels+compile`` mmkernels layers under ``torch.compile`` (on a GPU the ops stay single nodes;
                       on a CPU the graph holds their CPU path's plain operations).

One step = forward, loss (fused + per-modality heads), backward, AdamW step. Reported: median
ms per step, timed by the benchmark harness's ``time_ms`` (``triton.testing.do_bench`` on CUDA,
``torch.utils.benchmark`` on a CPU) after ``--warmup`` steps (compilation and autotuning happen
there), and peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one untimed step of its
own after the warm-up (so the timer's 256 MiB L2-flush buffer is not counted); on a CPU the peak
resident set of the process minus its resident set just before the model was built
(each provider runs in a process of its own; for the ``+compile`` providers it includes what
compilation took). Several batches are rotated.

    python benchmarks/train_step.py                          # CPU, small model (the digits setup)
    python benchmarks/train_step.py --device cuda --size large --amp bf16
    python benchmarks/train_step.py --fusion gated,attention --providers torch,mmkernels
Writes ``results.json`` and ``results.md`` under ``--out`` (with the run's provenance; rewritten
atomically after every row, ``"complete": false`` until the last) and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import itertools
import subprocess
import sys

PROVIDERS = ("torch", "torch+compile", "mmkernels", "mmkernels+compile")
# model and batch geometry: "small" is the digits setup of mmkernels-train; "large" is a
# GPU-sized model (ViT-ish widths, long speech and text, 32x32 RGB images)
SIZES = {
    "small": dict(model=dict(dim=64, hidden=128, heads=4, image_width=32, image_downsample=1, image_channels=1),
                  batch=64, image=8, speech=(92, 13), text=40),
    "large": dict(model=dict(dim=512, hidden=1024, heads=8, image_width=64, image_downsample=2, image_channels=3,
                             text_layers=2), batch=128, image=32, speech=(400, 13), text=128),
}


def _rss_mib() -> float:
    """Current resident set size of this process (Linux), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def make_batches(size: str, n: int, device):
    import torch
    s = SIZES[size]
    g = torch.Generator().manual_seed(0)
    B, T, L = s["batch"], s["speech"][0], s["text"]
    out = []
    for _ in range(n):
        inputs = {"image": torch.rand(B, s["model"]["image_channels"], s["image"], s["image"], generator=g),
                  "speech": (torch.randn(B, T, s["speech"][1], generator=g), torch.randint(T // 4, T + 1, (B,), generator=g)),
                  "text": (torch.randint(0, 256, (B, L), generator=g), torch.randint(L // 4, L + 1, (B,), generator=g))}
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else tuple(t.to(device) for t in v))
                  for k, v in inputs.items()}
        out.append((inputs, torch.randint(0, 10, (B,), generator=g).to(device)))
    return out


def worker(provider: str, fusion: str, size: str, device_name: str, amp: str, warmup: int) -> dict:
    """Time one provider in this process; returns its row."""
    import torch

    from mmkernels.bench.timing import time_ms
    from mmkernels.models import ModelConfig, MultimodalClassifier
    from mmkernels.models.train import loss_fn
    device = torch.device(device_name)
    rss_before = _rss_mib()
    torch.manual_seed(0)
    backend = "torch" if provider.startswith("torch") else "auto"
    cfg = ModelConfig(fusion=fusion, backend=backend, modality_dropout=0.3, **SIZES[size]["model"])
    model = MultimodalClassifier(cfg).to(device).train()
    call = torch.compile(model) if provider.endswith("+compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = make_batches(size, 4, device)
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    cuda = device.type == "cuda"

    def step(i):
        inputs, labels = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(call(inputs), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if cuda:  # peak of one untimed step: do_bench's flush buffer would add 256 MiB to the timed ones
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(warmup)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    counter = itertools.count(warmup + 1)
    ms = time_ms(lambda: step(next(counter)), device)   # the harness's timer: do_bench on CUDA
    if cuda:
        kind = "cuda max allocated over one untimed step"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        kind = "process peak RSS above its RSS before the model was built (includes compilation)"
    return {"provider": provider, "fusion": fusion, "size": size, "device": str(device), "amp": amp,
            "ms_per_step": ms, "peak_mib": peak, "memory": kind, "parameters": sum(p.numel() for p in model.parameters()),
            "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__}


def table(rows) -> str:
    lines = ["| fusion | provider | ms/step | speedup vs torch | vs torch+compile | peak memory MiB |",
             "|---|---|---:|---:|---:|---:|"]
    ms = {(r["fusion"], r["provider"]): r["ms_per_step"] for r in rows if "ms_per_step" in r}
    for r in rows:
        if "ms_per_step" not in r:
            lines.append(f"| {r['fusion']} | {r['provider']} | failed: {r['error']} | | | |")
            continue
        ratio = lambda base: f"{base / r['ms_per_step']:.2f}x" if base else "-"
        lines.append(f"| {r['fusion']} | {r['provider']} | {r['ms_per_step']:.2f} | "
                     f"{ratio(ms.get((r['fusion'], 'torch')))} | {ratio(ms.get((r['fusion'], 'torch+compile')))} | "
                     f"{r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="default: small on CPU, large on CUDA")
    p.add_argument("--fusion", default="concat,gated,attention")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600, help="seconds per provider process")
    p.add_argument("--out", default="bench-out/train_step")
    p.add_argument("--worker", nargs=2, metavar=("PROVIDER", "FUSION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.size = args.size or ("large" if gpu else "small")
    args.amp = args.amp or ("bf16" if gpu else "none")
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.size, args.device, args.amp, args.warmup)))
        return 0
    providers = [x for x in args.providers.split(",") if x]
    bad = [x for x in providers if x not in PROVIDERS]
    if bad:
        p.error(f"--providers: unknown {bad}; expected a subset of {PROVIDERS}")
    import torch

    from mmkernels.bench.runner import provenance
    prov = provenance(torch.device(args.device), [sys.executable, *sys.argv] if argv is None
                      else [sys.executable, os.path.abspath(__file__), *argv])
    rows = []
    os.makedirs(args.out, exist_ok=True)
    save(args, prov, rows, complete=False)
    for fusion in [f for f in args.fusion.split(",") if f]:
        for provider in providers:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, fusion, "--device", args.device,
                   "--size", args.size, "--amp", args.amp, "--warmup", str(args.warmup)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                row = json.loads(line[-1][7:]) if line else {
                    "provider": provider, "fusion": fusion, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            except subprocess.TimeoutExpired:
                row = {"provider": provider, "fusion": fusion, "error": f"timed out after {args.timeout:.0f} s"}
            rows.append(row)
            print(f"{fusion:10s} {provider:18s} " + (f"{row['ms_per_step']:9.2f} ms/step  {row['peak_mib']:8.0f} MiB"
                                                     if "ms_per_step" in row else row["error"]), flush=True)
            save(args, prov, rows, complete=False)   # after every row: a run cut off keeps what it measured
    save(args, prov, rows, complete=True)
    print()
    print(report(args, rows, complete=True))
    return 1 if any("error" in r for r in rows) else 0


def save(args, prov, rows, complete: bool) -> None:
    from mmkernels.bench.report import provenance_line, write_json, write_text
    write_json(os.path.join(args.out, "results.json"),
               {"provenance": prov, "complete": complete, "args": vars(args), "rows": rows})
    write_text(os.path.join(args.out, "results.md"),
               report(args, rows, complete) + "\n\n" + provenance_line({"provenance": prov}) + "\n")


def report(args, rows, complete: bool = True) -> str:
    return (("INCOMPLETE RUN (cut off or still running): only the rows below were measured. " if not complete else "")
            + f"Training step, {args.size} model, device {args.device}"
            f"{' (' + rows[0]['gpu'] + ')' if rows and rows[0].get('gpu') else ''}, amp {args.amp}, "
            f"median ms/step (mmkernels.bench.timing.time_ms); memory: {rows[0].get('memory', '?') if rows else '?'}\n\n" + table(rows))


if __name__ == "__main__":
    sys.exit(main())
