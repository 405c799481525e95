"""The GPU check (``bash benchmarks/gpu_check.sh`` = ``python -m mmkernels.gpucheck``): one command
that spends a bounded GPU budget on what it tells us, in that order.

Steps, each in its own process under its own time limit (a hang or a crashed CUDA context costs
that step only), each writing its results under ``--out`` as soon as they exist:

``env``       versions, GPU, where the CUDA C++ library came from (the prebuilt folder, or why
              not and then a build), the Triton cache in use;
``correct``   every kernel of every op and backend, fwd+bwd, fp32/fp16/bf16, a representative and
              an odd shape, heuristic configurations, vs the float64 reference, then again until
              the call replays its call plan (mmkernels/plans.py): one line each;
``per_call``  host µs per call on each op's tiny case (the GPU idles: the Python around the
              kernels sets the time): ``auto``, triton under each launch mode (``jit``, ``prepared``,
              ``static``: :mod:`mmkernels.runtime`; ``unplanned``: prepared launches without call
              plans), cuda, beside the plain PyTorch composition;
``headline``  the RESULTS.md target cases, bf16, fwd and fwd+bwd: triton (heuristic configuration),
              cuda, eager and the strongest baseline that needs no compilation, with the copy
              bandwidth and matmul rate measured in the same run (the mmkernels.bench harness);
``tournament`` every design candidate of the Triton kernels (:mod:`mmkernels.candidates`) checked
              against the reference and timed at the headline, a small and a ragged shape;
              ``record`` makes the winners the defaults on that GPU and its chip class;
``compile``   the torch.compile baselines on the same cases;
``configs``   every autotune configuration against the reference (``pytest -m gpu_configs``);
``tuned``     the Triton kernels with autotuning on, on the headline cases (ops with fixed tiles left out);
``risks``     benchmarks/gpu_risks.py;
``train``     the end-to-end training step (benchmarks/train_step.py; not in the default run);
``tests``     the GPU test suite; ``cuda``: tests/test_cuda.py on the GPU (compute-sanitizer
              included), not in the default run.

``--budget SECONDS`` (default 400) bounds the run: a step whose estimate (:data:`STEPS`) does not fit
in what is left is skipped with that reason, a running step is stopped when the budget ends, and
the summary table is printed last whatever happened. ``GPU_CHECK_DRY=1`` (or ``--dry``) walks every
step on the CPU: tiny cases, the Triton interpreter, the CUDA emulator.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent.parent
OPS = ("norm_concat", "attention_pool", "concat_linear", "gated_sum", "gated_fusion", "latent_pool", "tensor_fusion",
       "low_rank_fusion")


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    gpu_s: float      # estimated wall seconds on one H100/H200, process start included (unmeasured)
    dry_s: float      # estimated seconds of the dry run on a 2-core CPU
    default: bool = True
    what: str = ""
    env: tuple = ()   # (name, value) pairs set for the step's process (before mmkernels is imported)


_OFF = ("MMKERNELS_AUTOTUNE", "0")   # the heuristic configurations, no timing of candidates
# Estimates, not measurements: the first GPU run's steps.json (wall_s per step) replaces them. The
# GPU figures of correct, headline and compile were raised in proportion to the work latent_pool,
# tensor_fusion and low_rank_fusion add (still unmeasured): correct 30 -> 39 lines (100 -> 130 s),
# headline 94 -> 126 rows (125 -> 170 s; then 140 rows with ``auto`` on three ops' cases: 185 s),
# compile 22 -> 38 graphs (80 -> 140 s); risks captures three more ops (150 -> 160 s); tuned leaves
# those ops out and configs has no tests of theirs (fixed tiles, no autotune space); risks no
# longer asks per_call, a step of its own (160 s). In the default 400 s run, env + correct +
# per_call + headline (375 s by these estimates; 272 s measured for env, correct and headline
# before the auto rows) leave no room for compile, so it is skipped there and configs runs if the
# steps take what they measured; run compile by name (``gpu_check.sh compile``). per_call comes
# before headline: cheaper, and it decides the launch mode.
# The newer ops come last in every step, so a step stopped by the budget loses them first. Dry:
# headline measured 68-78 s on a 2-core CPU.
STEPS: Dict[str, Step] = {s.name: s for s in [
    # measured on an H200 (2026-12-04): env 5-7 s, correct 130 s, headline 137 s for seven ops,
    # configs 104 s, compile 127 s
    Step("env", 10, 15, what="versions, GPU, CUDA library source, Triton cache"),
    Step("correct", 130, 60, what="every kernel x backend x dtype vs float64 reference", env=(_OFF,)),
    # per_call: heuristic configurations (autotuning would compile and time every configuration of
    # every tiny case first; the launch path is the same but for the autotuner's cache lookup), 3
    # rounds: ~7 providers x 2 modes x 8 ops at ~70 ms each, plus the tiny cases' compiles
    Step("per_call", 50, 30, what="host us per call of every op's tiny case: auto, triton per launch mode, cuda, "
         "beside plain PyTorch (benchmarks/per_call.py --backends)", env=(_OFF,)),
    Step("headline", 185, 90, what="target cases, bf16, fwd and fwd+bwd, heuristic configs", env=(_OFF,)),
    # tournament: ~10 s per candidate (mmkernels/gpucheck/tournament.py) + 10 s to start: 20 today
    Step("tournament", 210, 80, what="every kernel design candidate: checked vs the reference, timed; "
         "record writes the winners", env=(_OFF,)),
    Step("compile", 130, 40, what="torch.compile baselines on the headline cases", env=(_OFF,)),
    Step("configs", 105, 25, what="every autotune configuration vs the reference"),
    Step("tuned", 90, 20, what="triton with autotuning on, headline cases", env=(("MMKERNELS_AUTOTUNE", "1"),)),
    Step("risks", 160, 10, what="benchmarks/gpu_risks.py"),
    Step("train", 420, 15, default=False, what="end-to-end training step (benchmarks/train_step.py)"),
    Step("tests", 140, 20, default=False, what="GPU test suite, autotuning off", env=(_OFF,)),
    Step("cuda", 200, 20, default=False, what="tests/test_cuda.py on the GPU, compute-sanitizer", env=(_OFF,)),
]}
DEFAULT_STEPS = [s.name for s in STEPS.values() if s.default]
MARGIN_S = 5        # kept free at the end of the budget for the summary
PREBUILT = ROOT / "prebuilt"          # python -m mmkernels.gpucheck prepare: cuda/ and triton-cache/


def dry_env() -> Dict[str, str]:
    """The environment of the dry run: CPU, the Triton interpreter, the CUDA emulator."""
    return {"GPU_CHECK_DRY": "1", "TRITON_INTERPRET": "1", "MMKERNELS_CUDA_EMULATE": "1", "CUDA_VISIBLE_DEVICES": ""}


def is_dry() -> bool:
    return os.environ.get("GPU_CHECK_DRY", "0").strip().lower() not in ("", "0", "false", "no")


# steps whose work is a sum over the ops (--only runs a share of it); STARTUP_S of each estimate
# is the step's process start and imports, whatever the ops
PER_OP_STEPS = ("correct", "headline", "compile", "configs", "tuned")
STARTUP_S = 10


def estimate(name: str, dry: bool, only=()) -> float:
    """The step's estimate; with ``--only``, the per-op steps' share for those ops."""
    s = STEPS[name]
    est = s.dry_s if dry else s.gpu_s
    ops = set(only) & set(OPS)
    if ops and name in PER_OP_STEPS:
        est = STARTUP_S + (est - STARTUP_S) * len(ops) / len(OPS)
    return est


def relocate_triton_cache(cache: Path, keep=None) -> int:
    """Point every group file of a Triton cache at the files beside it. Triton records absolute
    paths, so a cache filled in another checkout (``prepare``) would miss everywhere else.
    ``keep``: the file suffixes to keep listed (others are dropped from the groups). Returns the
    number of groups."""
    n = 0
    for grp in cache.glob("*/__grp__*.json"):
        try:
            data = json.loads(grp.read_text())
        except ValueError:
            continue
        children = {name: str(grp.parent / name) for name in data.get("child_paths", {})
                    if keep is None or Path(name).suffix in keep}
        grp.write_text(json.dumps({"child_paths": children}))
        n += 1
    return n


def libtriton_sha256(source=None) -> str:
    """sha256 of Triton's ``libtriton`` shared library: this process's (``source`` None), a file's, or
    the one inside a Triton wheel (``*.whl``). Triton's on-disk cache key hashes that library, and
    its wheels differ per Python version (cp311 here, cp312 on the GPU machine), so a cache filled
    under another Python misses everywhere unless its keys are computed for the target's library."""
    import hashlib
    import sysconfig
    import zipfile
    h = hashlib.sha256()
    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    if source is None:
        import triton
        source = Path(triton.__file__).parent / "_C" / f"libtriton.{ext}"
    source = Path(source)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z, z.open(f"triton/_C/libtriton.{ext}") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def key_caches_for(libtriton_sha: str) -> None:
    """Make this process's Triton compile key its cache entries as a Triton whose ``libtriton``
    hashes to ``libtriton_sha`` would (the same Triton version and Python sources: only the
    library's hash in the key changes). Used by ``prepare --triton-wheel``."""
    from triton.runtime import cache
    local = cache.triton_key()
    mine = libtriton_sha256()
    assert mine in local, "Triton's cache key no longer hashes libtriton as expected"
    key = local.replace(mine, libtriton_sha)
    cache.triton_key = lambda: key


# --- the orchestrator (no CUDA in this process) -----------------------------------------------------

class Orchestrator:
    def __init__(self, steps: List[str], budget: float, out: Path, dry: bool, only: List[str], argv: List[str]):
        self.steps, self.budget, self.out, self.dry, self.only = steps, budget, out, dry, only
        self.start = time.monotonic()
        self.records: List[Dict] = []
        self.proc: Optional[subprocess.Popen] = None
        self.argv = argv

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def write(self) -> None:
        from ..bench.report import write_json
        write_json(str(self.out / "steps.json"), dict(budget_s=self.budget, dry=self.dry, only=self.only,
                                                      command=self.argv, steps=self.records))

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        cache = PREBUILT / "triton-cache"
        if cache.is_dir() and "TRITON_CACHE_DIR" not in os.environ:
            print(f"== Triton cache {cache}: {relocate_triton_cache(cache)} kernels carried", flush=True)
        self.records = [dict(step=s, status="pending", estimate_s=round(estimate(s, self.dry, self.only), 1)) for s in self.steps]
        self.write()
        failed = False
        for rec in self.records:
            name = rec["step"]
            est, left = rec["estimate_s"], self.left() - MARGIN_S
            if est > left:
                rec.update(status="skipped", note=f"needs ~{est:.0f} s, {max(left, 0):.0f} s of the budget left")
                print(f"== {name}: skipped ({rec['note']})", flush=True)
                self.write()
                continue
            limit = max(1.0, min(left, max(2 * est, est + 60)))
            print(f"== {name}: {STEPS[name].what} (estimate {est:.0f} s, limit {limit:.0f} s)", flush=True)
            rec.update(status="running")
            self.write()
            rc, wall = self._child(name, limit)
            rec["wall_s"] = round(wall, 1)
            status = self._status(name, rc)
            rec.update(status=status, rc=rc)
            if status == "timeout":
                rec["note"] = f"stopped after {limit:.0f} s"
            failed = failed or status != "ok"
            self.write()
        return 1 if failed else 0

    def _status(self, name: str, rc: Optional[int]) -> str:
        if rc is None:
            return "timeout"
        result = self.out / f"{name}.json"
        if rc == 0 and result.is_file():
            try:
                return "ok" if json.loads(result.read_text()).get("ok", True) else "failed"
            except ValueError:
                return "failed"
        return "ok" if rc == 0 else "failed"

    def _child(self, name: str, limit: float):
        cmd = [sys.executable, "-m", "mmkernels.gpucheck", "--step", name, "--out", str(self.out)]
        for op in self.only:
            cmd += ["--only", op]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("HYPOTHESIS_PROFILE", "gpu")
        if (PREBUILT / "triton-cache").is_dir():
            env.setdefault("TRITON_CACHE_DIR", str(PREBUILT / "triton-cache"))
        env.update(dict(STEPS[name].env))
        if self.dry:
            env.update(dry_env())
        t0 = time.monotonic()
        log = open(self.out / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

        def pump(stream):
            for ln in stream:
                log.write(ln)
                log.flush()
                sys.stdout.write("   " + ln)
                sys.stdout.flush()
        reader = threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True)
        reader.start()
        try:
            rc = self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.stop()
            rc = None
        reader.join(timeout=5)
        log.close()
        self.proc = None
        return rc, time.monotonic() - t0

    def stop(self) -> None:
        """End the running step's process group (the step and what it started)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main_run(steps: List[str], budget: float, out: Path, dry: bool, only: List[str], argv: List[str]) -> int:
    orch = Orchestrator(steps, budget, out, dry, only, argv)

    def on_signal(signum, frame):
        orch.stop()
        for rec in orch.records:
            if rec["status"] in ("running", "pending"):
                rec["status"] = "killed" if rec["status"] == "running" else "not run"
        orch.write()
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return orch.run()
