"""The ``tournament`` step: every design candidate of the Triton kernels (:mod:`mmkernels.candidates`)
checked against the float64 reference and timed, and the winner per (slot, GPU) recorded.

For each slot, each candidate in turn is forced process-wide (backward passes included) and:

* checked: the ``correct`` step's cases of its op (a representative and an odd shape, masks with
  an all-absent row, ...) in fp32, fp16 and bf16, forward and backward, against the float64
  reference; a candidate that fails never wins;
* timed with the benchmark harness (heuristic configurations, bf16): the slot's cases — the
  headline ones, one small and one ragged (masked) shape — in the mode that shows its pass
  (``bwd`` for a backward slot: the backward alone).

The winner is the correct candidate with the lowest geometric mean of kernel ms (device time;
wall ms where the device time is missing) over the cases every candidate timed; ``record``
writes it to :data:`mmkernels.candidates.TABLE` for that GPU and its chip class, and the rows to
``benchmarks/RESULTS.md``. Cost: per candidate, one ``correct`` line per dtype (~3 s) and 4 cases
x 1 mode (~1.5 s each, the inputs' allocation included): ~10 s per candidate, 10 s to start;
ten slots of two candidates today: ~210 s.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

# slot -> (op folder, the ``correct`` step's op, bench cases, mode); the dry run replaces the cases
# by two tiny ones (``DRY``: a small and a ragged one)
SLOTS = {
    "norm_concat.bwd": ("norm_concat", "norm_concat",
                        ("b32768_768+1024+512", "b8192_4096+300",                  # the headline cases
                         "cpu_b256_768+1024+512",                                  # small
                         "b64xt577_1024+768"),                                     # ragged: 36928 token rows
                        "bwd"),
    "gated_sum.bwd": ("gated_sum", "gated_sum",
                      ("b16384_m3_h1024_feature", "b8192_m2_h512_feature",       # the headline cases
                       "cpu_b256_m3_h96_feature_masked",                        # small (and masked)
                       "b16384_m3_h1024_feature_masked"),                       # ragged: 20% absent
                      "bwd"),
    "attention_pool.fwd": ("attention_pool", "attention_pool",
                           ("b4096_l64_d768_h12", "b512_l576_d1024_h8",             # the headline cases
                            "tiny_b4_l16_d64_h4",                                   # small
                            "varlen_b1024_l512_d768_h12"),                          # ragged
                           "fwd"),
    "attention_pool.bwd": ("attention_pool", "attention_pool",
                           ("b4096_l64_d768_h12", "b512_l576_d1024_h8",             # the headline cases
                            "tiny_b4_l16_d64_h4",                                   # small
                            "varlen_b1024_l512_d768_h12"),                          # ragged
                           "bwd"),
    "latent_pool.fwd": ("latent_pool", "latent_pool",
                        ("so400m_b256_n729", "siglip_base_b1024_n196",           # the headline cases
                         "cpu_so400m_b4_n729",                                   # small: many splits
                         "probe_b1024_n256_d1024"),                              # another head, 1024 rows
                        "fwd"),
    "latent_pool.bwd": ("latent_pool", "latent_pool",
                        ("so400m_b256_n729", "siglip_base_b1024_n196",           # the headline cases
                         "cpu_so400m_b4_n729",                                   # small: many splits
                         "probe_b1024_n256_d1024"),                              # another head, 1024 rows
                        "bwd"),
    "concat_linear.fwd": ("concat_linear", "concat_linear",
                          ("b32768_768+1024+512_n1024_gelu", "b8192_4096+300_n512_tanh",  # the headline cases
                           "b65536_3x768_n10",
                           "tiny_b8_64+32+48_n16_gelu",                                  # small
                           "b4099_300+33+129_n77_silu"),                                 # ragged: odd widths
                          "fwd"),
    "low_rank_fusion.fwd": ("low_rank_fusion", "low_rank_fusion",
                            ("lmf_b16384_768+1024+512_r8_h512", "lmf_mosi_b4096",       # the headline cases
                             "cpu_lmf_b64_16+8+8_r2_h16",                               # small
                             "lmf_b4099_300+33+129_r5_h77"),                            # odd: rows, widths, H
                            "fwd"),
    "low_rank_fusion.bwd": ("low_rank_fusion", "low_rank_fusion",
                            ("lmf_b16384_768+1024+512_r8_h512", "lmf_mosi_b4096",
                             "cpu_lmf_b64_16+8+8_r2_h16", "lmf_b4099_300+33+129_r5_h77"),
                            "bwd"),
    # the layer's forward design, timed fwd+bwd (training: the fused epilogue also writes z there)
    "gated_fusion.fwd": ("gated_fusion", "gated_fusion",
                         ("b16384_768+1024+512_h1024_feature", "b8192_4096+300_h512_feature",   # the headline cases
                          "tiny_b8_32+16_h16_feature",                                          # small
                          "b4099_300+33+129_h77_feature_masked"),                               # ragged, masked
                         "fwd+bwd"),
}
_GS = dict(rows=16, m=3, h=32, gate="feature", mask=False)
_AP = dict(B=4, L=16, D=64, H=4, Q=1)
_LP = dict(kind="timm_latent", B=2, N=50, D=96, H=4, mlp=192)
DRY = {"norm_concat": (dict(lead=(16,), dims=(16, 24)), dict(lead=(3, 13), dims=(7, 9, 3))),
       "gated_sum": (_GS, dict(_GS, mask=True)), "attention_pool": (_AP, dict(_AP, ragged=True)),
       "latent_pool": (_LP, dict(_LP, kind="siglip", N=49, D=64, mlp=128)),
       "concat_linear": (dict(rows=16, dims=(16, 24), n=16, act="gelu"), dict(rows=13, dims=(7, 9, 3), n=5, act="tanh")),
       "low_rank_fusion": (dict(rows=16, dims=(16, 8, 8), r=2, h=16), dict(rows=13, dims=(7, 5, 3), r=3, h=9)),
       "gated_fusion": (dict(rows=16, dims=(16, 24), h=16, gate="feature", mask=False),
                        dict(rows=13, dims=(7, 9, 3), h=5, gate="feature", mask=True))}
SECTION = "## Kernel candidates (the tournament)"


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _time(row: Dict) -> Optional[float]:
    k = row.get("kernel_ms")
    return k if _num(k) and k > 0 else (row["ms"] if _num(row.get("ms")) and row["ms"] > 0 else None)


def score(candidate: Dict) -> str:
    """A candidate's geometric-mean time over the cases it timed, as text (for the summary)."""
    times = [t for t in (_time(r) for r in candidate.get("rows", [])) if t]
    if not times:
        return "n/a"
    return f"{math.exp(sum(math.log(t) for t in times) / len(times)):.4f}"


def winner(entry: Dict) -> Optional[str]:
    """The correct candidate with the lowest geometric mean time over the cases every correct
    candidate timed (ties: the earlier candidate, i.e. the default); None if none qualifies."""
    ok = {name: {r["case"]: _time(r) for r in c["rows"]} for name, c in entry["candidates"].items()
          if c.get("correct")}
    common = set.intersection(*[{case for case, t in times.items() if t} for times in ok.values()]) if ok else set()
    if not common:
        return None
    score = {name: math.exp(sum(math.log(times[case]) for case in common) / len(common)) for name, times in ok.items()}
    return min(score, key=lambda n: (score[n], list(entry["candidates"]).index(n)))


def step(out: Path, only, device: torch.device, dry: bool, write) -> Dict:
    from .. import candidates
    from ..bench import runner
    from ..bench.spec import Case
    from ..ops import bench_specs
    from . import correct

    specs = bench_specs()
    dtype = torch.float32 if dry else torch.bfloat16
    # the interpreter's bf16 is not trusted (tests/conftest.py): fp32 and fp16 there
    check_dtypes = [torch.float32, torch.float16] + ([] if dry else [torch.bfloat16])
    result: Dict = dict(ok=True, slots={})
    for slot, (op, correct_op, names, mode) in SLOTS.items():
        if only and op not in only:
            continue
        spec = specs[op]
        cases = ([Case("dry_small", dict(DRY[op][0])), Case("dry_ragged", dict(DRY[op][1]))] if dry
                 else [spec.case(n) for n in names])
        spec = dataclasses.replace(spec, cases=cases, providers={"triton": spec.providers["triton"]})
        entry = result["slots"][slot] = dict(op=op, mode=mode, dtype=str(dtype)[6:], candidates={})
        for name in candidates.SLOTS[slot]:
            candidates.force(slot, name)
            try:
                checks = [correct.check(correct_op, "triton", dt, device, small=dry) for dt in check_dtypes]
                res = runner.run([spec], lambda c: True, {"triton"}, [mode], [dtype], device,
                                 argv=["bash", "benchmarks/gpu_check.sh", "tournament"])
            finally:
                candidates.force(slot, None)
            rows = [dict(case=r["case"], ms=r.get("ms"), kernel_ms=r.get("kernel_ms"), floor_ms=r.get("floor_ms"),
                         error=r.get("error")) for r in res["rows"]]
            entry["candidates"][name] = dict(correct=all(c["ok"] for c in checks),
                                             checks=[correct.line(c) for c in checks], rows=rows)
            result.setdefault("provenance", res["provenance"])
            result.setdefault("machine", res["machine"])
            for c in checks:
                print(f"{slot} {name}: {correct.line(c)}", flush=True)
            for r in rows:
                t = _time(r)
                print(f"{slot} {name:10s} {r['case'][:36]:36s} {mode:4s} "
                      + (f"{t:.4f} ms" if t else f"n/a ({r['error']})"), flush=True)
            write(result)
        entry["winner"] = winner(entry)
        print(f"{slot}: winner {entry['winner'] or 'none (no correct candidate timed every case)'}", flush=True)
        result["ok"] = result["ok"] and entry["winner"] is not None
        write(result)
    return result


# --- record --------------------------------------------------------------------------------------

def verdict(tournament: Dict, prov: Dict) -> Dict:
    """``{"winners": {gpu: {slot: name}, "class:<chip class>": {...}}, "evidence": {...}}`` from a
    tournament's results."""
    from ..cuda.dispatch import class_of_sm
    gpu = prov.get("gpu") or "?"
    won = {slot: e["winner"] for slot, e in tournament.get("slots", {}).items() if e.get("winner")}
    if not won:
        return {}
    ev = {slot: dict(date=(prov.get("date") or "?")[:10], commit=(prov.get("commit") or "?")[:7],
                     ms={name: [_time(r) for r in c["rows"]] for name, c in e["candidates"].items()},
                     correct={name: c["correct"] for name, c in e["candidates"].items()})
          for slot, e in tournament["slots"].items() if slot in won}
    out = {"winners": {gpu: won}, "evidence": {gpu: ev}}
    cls = class_of_sm(prov.get("sm"))
    if cls:
        out["winners"][f"class:{cls}"] = dict(won)
        out["evidence"][f"class:{cls}"] = {slot: dict(v, **{"from": gpu}) for slot, v in ev.items()}
    return out


def merge(old: Dict, new: Dict) -> Dict:
    """The table with ``new``'s winners over ``old``'s, per GPU and slot (slots not timed keep theirs)."""
    out = {}
    for key in ("winners", "evidence"):
        merged = {gpu: dict(v) for gpu, v in (old.get(key) or {}).items()}
        for gpu, v in (new.get(key) or {}).items():
            merged.setdefault(gpu, {}).update(v)
        out[key] = merged
    out["note"] = ("written by 'python -m mmkernels.gpucheck record' from the GPU check's tournament step: per GPU "
                   "(and chip class) and slot, the correct candidate with the lowest geometric-mean kernel ms")
    return out


def rows_md(tournament: Dict, prov: Dict, columns: List[str]) -> List[List[str]]:
    """RESULTS.md rows: one per (slot, candidate, case)."""
    commit = (prov.get("commit") or "?")[:7] + (" (dirty)" if prov.get("dirty") else "")
    rows = []
    for slot, e in tournament.get("slots", {}).items():
        for name, c in e["candidates"].items():
            for r in c["rows"]:
                t = _time(r)
                values = {"date": (prov.get("date") or "?")[:10], "card": prov.get("gpu") or "?", "commit": commit,
                          "command": "`bash benchmarks/gpu_check.sh tournament`", "slot": slot, "candidate": name,
                          "case": r["case"], "mode": e["mode"], "kernel ms": f"{t:.4f}" if t else "n/a",
                          "x floor": (f"{t / r['floor_ms']:.2f}x" if t and _num(r.get("floor_ms")) and r["floor_ms"]
                                      else "n/a"),
                          "correct": "yes" if c["correct"] else "no", "winner": "yes" if e.get("winner") == name else ""}
                rows.append([values.get(col, "n/a") for col in columns])
    return rows
