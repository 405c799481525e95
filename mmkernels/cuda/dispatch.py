"""Choosing the CUDA C++ backend: the capability checks every op's ``cuda`` backend shares
(:func:`why_not`, :func:`shared_memory_per_block`) and the ``auto`` dispatch table
(``dispatch_table.json``: per op and GPU, the measured-faster of cuda and triton), read once per
process."""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import builder

TABLE = Path(__file__).resolve().parent / "dispatch_table.json"

_warned = False


def why_not(t: torch.Tensor, explicit: bool, dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> Optional[str]:
    """Common part of every op's ``cuda`` backend ``why_not``: device, dtype, then the library
    (built or loaded on the first call that gets this far)."""
    global _warned
    if t.device.type != "cuda" and not (builder.emulating() and explicit and t.device.type == "cpu"):
        return f"needs CUDA tensors, got {t.device.type}"
    if t.dtype not in dtypes:
        return f"dtype {t.dtype} is not supported (supported: {', '.join(str(d) for d in dtypes)})"
    reason = builder.load()
    if reason is None:
        return None
    reason = f"the CUDA C++ extension is unavailable: {reason}"
    if not explicit and not _warned:
        _warned = True
        warnings.warn(f"mmkernels: {reason}; 'auto' uses the Triton kernels instead", stacklevel=4)
    return reason


def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory a block may opt into on ``device`` (the emulator: an H100's)."""
    if device.type != "cuda":
        return 227 * 1024
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 * 1024)


# --- auto: the faster of cuda and triton, per op, from measurements ----------------------------

@functools.lru_cache(maxsize=None)
def _read_table(path: Path) -> Dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _table() -> Dict:
    """The dispatch table at :data:`TABLE`, parsed on first use and kept for the process."""
    return _read_table(TABLE)


def gpu_class(major: int, minor: int = 0) -> Optional[str]:
    """The chip class a measurement stands for: ``"ampere/ada"`` (sm_80, sm_86, sm_89),
    ``"hopper"`` (sm_90), ``"blackwell"`` (sm_100, sm_120), else None."""
    return {8: "ampere/ada", 9: "hopper", 10: "blackwell", 12: "blackwell"}.get(int(major))


def class_of_sm(sm) -> Optional[str]:
    """:func:`gpu_class` of a results' provenance ``sm`` (``"9.0"``); None when absent or malformed."""
    parts = str(sm or "").split(".")
    return gpu_class(*map(int, parts)) if len(parts) == 2 and all(p.isdigit() for p in parts) else None


def preferred(op: str, t) -> str:
    """``"cuda"``, ``"triton"``, ``"torch"`` or ``"reference"``: the backend ``auto`` tries first
    for ``op`` on ``t``'s GPU, from the measured table (:data:`TABLE`): the entry for this GPU's
    name, else the one for its chip class (``"class:hopper"``: measured on another GPU of the class,
    see :func:`gpu_class`), else the ``"*"`` entry; without any: ``"triton"``."""
    if getattr(getattr(t, "device", None), "type", None) != "cuda":
        return "triton"
    entry = _table().get("ops", {}).get(op)
    if not entry:
        return "triton"
    name = torch.cuda.get_device_name(t.device)
    if name in entry:
        return entry[name]
    if any(k.startswith("class:") for k in entry):
        cls = gpu_class(*torch.cuda.get_device_capability(t.device))
        if f"class:{cls}" in entry:
            return entry[f"class:{cls}"]
    return entry.get("*", "triton")


def measured_classes() -> Dict[str, List[str]]:
    """Per chip class, the GPUs whose measurements the table's class entries come from."""
    out: Dict[str, List[str]] = {}
    for per_gpu in _table().get("evidence", {}).values():
        for key, ev in per_gpu.items():
            if key.startswith("class:") and ev.get("from"):
                out.setdefault(key[len("class:"):], [])
                if ev["from"] not in out[key[len("class:"):]]:
                    out[key[len("class:"):]].append(ev["from"])
    return out


CANDIDATES = ("cuda", "triton", "torch", "reference")   # the backends auto may be told to try first


def make_table(results: List[dict]) -> Dict:
    """From mmkernels-bench ``results.json`` contents: per op and GPU name, the backend ``auto``
    tries first, and the same verdict for the GPU's chip class (``"class:hopper"``, from the
    results' ``sm``), which GPUs of the class without a measurement of their own take. Each of cuda, torch and reference is compared with triton on the (case, mode,
    dtype) rows both ran, by the geometric mean of the ms ratio; the fastest of triton and those
    measured against it wins (torch and reference only where their providers were timed: the plain
    formulation of concat_linear and TFN, their reference backends' cuBLAS GEMMs). Where torch wins,
    ``auto`` runs the plain formulation under autograd on that GPU (only for the ops whose
    ``plain_devices`` list GPUs: :mod:`mmkernels.ops._register`)."""
    ops: Dict[str, Dict[str, str]] = {}
    evidence: Dict[str, Dict[str, dict]] = {}
    for res in results:
        name = res["machine"].get("name", "?")
        cls = class_of_sm((res.get("provenance") or {}).get("sm"))
        by = {}
        for r in res["rows"]:
            ms = r.get("ms")   # null in JSON where nothing was measured
            if r["provider"] in CANDIDATES and isinstance(ms, (int, float)) and ms == ms and not r.get("error"):
                by.setdefault((r["op"], r["case"], r["mode"], r["dtype"]), {})[r["provider"]] = r["ms"]
        per_op: Dict[str, Dict[str, List[float]]] = {}
        for (op, *_), got in by.items():
            for other in ("cuda", "torch", "reference"):
                if other in got and "triton" in got:
                    per_op.setdefault(op, {}).setdefault(other, []).append(math.log(got[other] / got["triton"]))
        for op, logs in per_op.items():
            ratios = {other: math.exp(sum(v) / len(v)) for other, v in logs.items()}   # other time / triton time
            best = min(ratios, key=ratios.get)
            ops.setdefault(op, {})[name] = best if ratios[best] < 1 else "triton"
            ev = {f"{other}_over_triton": round(ratio, 4) for other, ratio in ratios.items()}
            ev["rows"] = max(len(v) for v in logs.values())
            evidence.setdefault(op, {})[name] = ev
            if cls:   # the GPUs of its class with no measurement of their own take this verdict
                ops[op][f"class:{cls}"] = ops[op][name]
                evidence[op][f"class:{cls}"] = dict(ev, **{"from": name})
    return dict(ops=ops, evidence=evidence,
                note="generated by 'python -m mmkernels.cuda table <results.json>...' from mmkernels-bench runs "
                     "with the triton provider and the cuda (or torch, or reference) provider")


def extension_why_not(tensors) -> Optional[str]:
    """``why_not`` of the ops that have no CUDA C++ kernels (concat_linear, fusion_projections)."""
    if tensors[0].device.type != "cuda":
        return f"needs CUDA tensors, got {tensors[0].device.type}"
    return "no CUDA C++ kernel for this op (csrc/ has norm_concat, attention_pool and gated_sum)"
