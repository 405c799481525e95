"""The steps of the GPU check, each run in its own process by the orchestrator
(``python -m mmkernels.gpucheck --step NAME --out DIR``). Each writes ``DIR/NAME.json`` (``ok``
plus what it found) as soon as it has something, and prints one line per result."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from . import OPS, ROOT, is_dry

# The cases behind the targets of benchmarks/RESULTS.md, with the providers of the headline step:
# mmkernels' kernels, eager and the op's strongest baseline that needs no compilation. In the dry
# run each op keeps its first case (and attention_pool its ragged one) at the tiny sizes given.
HEADLINE = {
    "norm_concat": (("b32768_768+1024+512",), ("triton", "cuda", "eager"),
                    dict(lead=(8,), dims=(24, 40, 8))),
    "attention_pool": (("b512_l576_d1024_h8", "b4096_l64_d768_h12", "varlen_b1024_l512_d768_h12"),
                       ("triton", "cuda", "eager", "sdpa", "triton_varlen", "cuda_varlen"),
                       dict(B=4, L=16, D=64, H=2, Q=1)),
    "concat_linear": (("b32768_768+1024+512_n1024_gelu", "b8192_4096+300_n512_tanh", "b65536_3x768_n10"),
                      ("triton", "eager", "torch", "auto", "cublas_premade", "cublas_premade_aligned"),
                      dict(rows=16, dims=(16, 24), n=16, act="gelu")),
    "gated_sum": (("b16384_m3_h1024_feature", "b8192_m2_h512_feature"), ("triton", "cuda", "eager"),
                  dict(rows=16, m=3, h=32, gate="feature", mask=False)),
    "gated_fusion": (("b16384_768+1024+512_h1024_feature", "b8192_4096+300_h512_feature"),
                     ("triton", "eager", "auto", "cublas_gemms", "cublas_gemms_aligned"),
                     dict(rows=16, dims=(16, 24), h=16, gate="feature", mask=False)),
    # the newer ops last (a step cut off by the budget keeps the rows measured before them). Triton
    # only; eager is the one baseline without compilation their bench.py defines (latent_pool's is
    # the model library's original head, TFN's materialises the outer product for one cuBLAS GEMM).
    # LMF also times its reference backend (cuBLAS GEMMs), concat_linear and TFN their torch backend
    # (the plain formulation under autograd): the first H200 runs found their Triton paths slower
    # than eager, and the table lets auto run the winner.
    # concat_linear, gated_fusion and TFN also time ``auto``, what users get there: the hand-set
    # torch verdicts, and GatedFusion's two ops as the table routes them (its Triton path measured
    # slower than eager at 92f9909)
    "latent_pool": (("so400m_b256_n729", "siglip_base_b1024_n196", "rn50_clip_b1024_7x7", "probe_b1024_n256_d1024"),
                    ("triton", "eager"), dict(kind="timm_latent", B=2, N=50, D=96, H=4, mlp=192)),
    "tensor_fusion": (("tfn_mosi_b1024", "tfn_b4096_64+64+64_h256"), ("triton", "eager", "torch", "auto"),
                      dict(rows=16, dims=(8, 4, 4), h=16)),
    "low_rank_fusion": (("lmf_mosi_b4096", "lmf_b16384_768+1024+512_r8_h512"), ("triton", "eager", "reference"),
                        dict(rows=16, dims=(16, 8, 8), r=2, h=16)),
}
# ops whose Triton kernels use fixed heuristic tiles (no autotune space): the tuned step would only
# repeat their headline rows, so it leaves them out
FIXED_TILES = ("latent_pool", "tensor_fusion", "low_rank_fusion")
COMMAND = "bash benchmarks/gpu_check.sh"


def _device() -> torch.device:
    return torch.device("cpu" if is_dry() else "cuda")


def _write(out: Path, name: str, obj: Dict) -> None:
    from ..bench.report import write_json
    write_json(str(out / f"{name}.json"), obj)


class TritonCompiles:
    """Counts Triton compilations in this process: compiled here vs found in the cache
    (``TRITON_CACHE_DIR``), through Triton's compilation listener."""

    def __init__(self):
        self.compiled: List[str] = []
        self.cache_hit: List[str] = []
        self.available = False
        try:
            from triton import knobs
            knobs.compilation.listener = self
            self.available = True
        except Exception:  # an older Triton without knobs: counts stay unknown
            pass

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit):
        name = getattr(getattr(src, "fn", None), "__name__", None) or metadata.get("name", "?")
        (self.cache_hit if cache_hit else self.compiled).append(name)

    def summary(self) -> Dict:
        if not self.available:
            return dict(counted=False)
        return dict(counted=True, compiled=len(self.compiled), cache_hit=len(self.cache_hit),
                    cache_dir=os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache (default)"))


# --- env ---------------------------------------------------------------------------------------

def step_env(out: Path, only) -> Dict:
    import triton
    from .. import cuda as ext
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                python=sys.version.split()[0], dry=is_dry(), gpu=None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
    print(f"torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, python {info['python']}, "
          f"GPU {info['gpu'] or 'none'}")
    lib, why = ext.prebuilt_library()
    t0 = time.monotonic()
    reason = ext.load()
    lib_info = ext.library_info()
    info["cuda_library"] = dict(lib_info, load_s=round(time.monotonic() - t0, 1), unavailable=reason,
                                registered=ext.registered_ops())
    if lib_info.get("source") not in ("prebuilt", "emulator"):
        print(f"CUDA library: not prebuilt ({lib_info.get('prebuilt') or why}); "
              f"{'built/loaded from ' + str(lib_info.get('source')) if reason is None else 'unavailable: ' + reason}")
    else:
        print(f"CUDA library: {lib_info['source']} {lib_info.get('path')} ({info['cuda_library']['load_s']} s)")
    print(f"CUDA ops registered: {len(info['cuda_library']['registered'])}")
    cache = os.environ.get("TRITON_CACHE_DIR")
    n = sum(1 for _ in Path(cache).glob("*/*.json")) if cache and Path(cache).is_dir() else None
    info["triton_cache"] = dict(dir=cache, entries=n)
    print(f"Triton cache: {cache or 'default (~/.triton/cache)'}" + (f", {n} entries carried" if n is not None else ""))
    stamp = Path(cache) / "LIBTRITON_SHA256" if cache else None
    if stamp is not None and stamp.is_file():
        from . import libtriton_sha256
        mine, theirs = libtriton_sha256(), stamp.read_text().strip()
        info["triton_cache"].update(libtriton_here=mine, libtriton_keyed=theirs, keys_match=mine == theirs)
        print("Triton cache keyed for this libtriton" if mine == theirs else
              f"Triton cache keyed for libtriton {theirs[:16]}..., this one is {mine[:16]}...: no entry can hit "
              "(prepare --triton-wheel <this machine's Triton wheel>)")
    info["ok"] = reason is None
    _write(out, "env", info)
    return info


# --- correct -----------------------------------------------------------------------------------

def step_correct(out: Path, only) -> Dict:
    from . import correct
    device = _device()
    counts = TritonCompiles()
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    lines: List[Dict] = []
    result = dict(ok=True, lines=lines)
    for op, (backends, _) in correct.CASES.items():
        if only and correct.FOLDER.get(op, op) not in only:
            continue
        for backend in backends:
            for dtype in dtypes:
                if is_dry() and backend == "triton" and dtype == torch.bfloat16:
                    continue   # the interpreter's bf16 matrix products are not trusted (tests/conftest.py)
                r = correct.check(op, backend, dtype, device, small=is_dry())
                lines.append(r)
                print(correct.line(r), flush=True)
                result.update(ok=all(x["ok"] for x in lines), triton=counts.summary())
                _write(out, "correct", result)
    result["triton"] = counts.summary()
    _write(out, "correct", result)
    return result


# --- headline, compile, tuned: the benchmark harness ------------------------------------------------

def _specs(only, skip=()):
    from ..bench.spec import Case
    from ..ops import bench_specs
    specs = bench_specs()
    chosen = []
    for op, (names, _, tiny) in HEADLINE.items():
        if (only and op not in only) or op in skip:
            continue
        spec = specs[op]
        if is_dry():
            first = spec.case(names[0])
            cases = [Case(f"dry_{first.name}", dict(tiny))]
            ragged = [n for n in names if spec.case(n).params.get("ragged")]
            if ragged:
                cases.append(Case(f"dry_{ragged[0]}", dict(tiny, ragged=True)))
            spec = dataclasses.replace(spec, cases=cases)
        else:
            spec = dataclasses.replace(spec, cases=[spec.case(n) for n in names])
        chosen.append(spec)
    return chosen


def _bench(out: Path, name: str, only, providers: Callable[[str], tuple], modes=("fwd", "fwd+bwd"),
           max_specs=None, skip=()) -> Dict:
    from ..bench import report, runner
    device = _device()
    counts = TritonCompiles()
    # each op keeps only its own providers of this step (e.g. no "cuda" row for concat_linear)
    specs = [dataclasses.replace(s, providers={k: v for k, v in s.providers.items() if k in providers(s.op)})
             for s in _specs(only, skip)[:max_specs]]
    wanted = {p for s in specs for p in s.providers}
    dtype = torch.float32 if is_dry() else torch.bfloat16
    folder = out / name
    argv = COMMAND.split() + [name] + [a for op in (only or []) for a in ("--only", op)]
    res = runner.run(specs, lambda c: True, wanted, list(modes), [dtype], device,
                     on_rows=lambda partial: report.write_all(partial, str(folder), png=False), argv=argv)
    report.write_all(res, str(folder), png=False)
    errors = [f"{r['op']} {r['case']} {r['mode']} {r['provider']}: {r['error']}" for r in res["rows"] if r.get("error")]
    for r in res["rows"]:
        ms = r.get("ms")
        shown = f"{ms:.4f} ms" if isinstance(ms, float) and ms == ms else f"n/a ({r.get('error')})"
        xf = r.get("x_floor")
        print(f"{r['op']:15s} {r['case'][:34]:34s} {r['mode']:7s} {r['provider']:22s} {shown}"
              + (f"  {xf:.2f}x floor" if isinstance(xf, float) and xf == xf else ""), flush=True)
    summary = dict(ok=not errors, rows=len(res["rows"]), errors=errors, results=str(folder / "results.json"),
                   triton=counts.summary())
    _write(out, name, summary)
    return summary


def step_headline(out: Path, only) -> Dict:
    return _bench(out, "headline", only, lambda op: HEADLINE[op][1])


def step_compile(out: Path, only) -> Dict:
    # the dry run compiles one graph (norm_concat, forward): inductor on a 2-core CPU is slow
    if is_dry():
        return _bench(out, "compile", only, lambda op: ("compile",), modes=("fwd",), max_specs=1)
    return _bench(out, "compile", only, lambda op: ("compile",))


def step_tuned(out: Path, only) -> Dict:
    if only and all(op in FIXED_TILES for op in only):
        print(f"tuned: nothing to tune in {', '.join(only)} (fixed tiles)", flush=True)
        result = dict(ok=True, rows=0, errors=[], note="fixed tiles only")
        _write(out, "tuned", result)
        return result
    return _bench(out, "tuned", only, lambda op: tuple(p for p in HEADLINE[op][1] if p.startswith("triton")),
                  skip=FIXED_TILES)


def step_tournament(out: Path, only) -> Dict:
    from . import tournament
    return tournament.step(out, only, _device(), is_dry(), lambda result: _write(out, "tournament", result))


# --- steps that run other programs -------------------------------------------------------------------

def _program(out: Path, name: str, cmd: List[str], ok_codes=(0,)) -> Dict:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (out / f"{name}-output.log").write_text(proc.stdout)
    tail = proc.stdout.strip().splitlines()[-12:]
    for ln in tail:
        print(ln)
    result = dict(ok=proc.returncode in ok_codes, rc=proc.returncode, tail=tail)
    _write(out, name, result)
    return result


def _pytest(out: Path, name: str, args: List[str], ok_codes=(0,)) -> Dict:
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if is_dry():   # the GPU tests skip on a CPU: check that the selection exists and imports
        return _program(out, name, base + args + ["--collect-only"], ok_codes)
    return _program(out, name, base + args, ok_codes)


def _kexpr(only) -> List[str]:
    return ["-k", " or ".join(only)] if only else []


def step_configs(out: Path, only) -> Dict:
    # pytest's 5 (nothing selected) is an answer under --only: that op has no autotune space to check
    return _pytest(out, "configs", ["tests", "-m", "gpu_configs"] + _kexpr(only), ok_codes=(0, 5) if only else (0,))


def step_tests(out: Path, only) -> Dict:
    k = f"({' or '.join(list(only) + ['backend', 'nn', 'runtime'])}) and " if only else ""
    return _pytest(out, "tests", ["tests", "-m", "not slow and not gpu_configs",
                                  "-k", k + "not emulator and not emulated"])


def step_cuda(out: Path, only) -> Dict:
    return _pytest(out, "cuda", ["tests/test_cuda.py", "-m", "not slow", "-k", "not emulator and not emulated"])


def step_risks(out: Path, only) -> Dict:
    cmd = [sys.executable, "benchmarks/gpu_risks.py", "--out", str(out / "risks-answers.json")]
    return _program(out, "risks", cmd + (["--help"] if is_dry() else []))


def step_per_call(out: Path, only) -> Dict:
    cmd = [sys.executable, "benchmarks/per_call.py", "--backends", "--json", str(out / "per_call" / "results.json")]
    if is_dry():   # the CPU: one op, one round (the kernel backends are not served there)
        cmd += ["--device", "cpu", "--rounds", "1", "gated_sum"]
    else:
        cmd += ["--device", "cuda", "--rounds", "3", *[o for o in only if o in OPS]]
    return _program(out, "per_call", cmd)


def step_train(out: Path, only) -> Dict:
    if is_dry():
        cmd = [sys.executable, "benchmarks/train_step.py", "--help"]
    else:
        cmd = [sys.executable, "benchmarks/train_step.py", "--device", "cuda", "--fusion", "gated", "--timeout", "100",
               "--out", str(out / "train")]
    return _program(out, "train", cmd)


STEP_FUNCS = {"env": step_env, "correct": step_correct, "headline": step_headline, "compile": step_compile,
              "configs": step_configs, "tuned": step_tuned, "tournament": step_tournament, "risks": step_risks, "per_call": step_per_call, "train": step_train,
              "tests": step_tests, "cuda": step_cuda}


def run_step(name: str, out: Path, only) -> int:
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = STEP_FUNCS[name](out, list(only or []))
    except Exception as exc:
        import traceback
        traceback.print_exc()
        _write(out, name, dict(ok=False, error=f"{type(exc).__name__}: {exc}"))
        return 1
    return 0 if result.get("ok", True) else 1
