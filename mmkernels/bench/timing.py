"""Timing and the machine's ceilings (copy and read bandwidth, matmul rate), measured in the same run."""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

HOST_BOUND = 1.10   # a row is host-bound when back-to-back calls take this much longer than its kernels

# --- interleaved rounds (what the runner times with) -------------------------------------------
ROUNDS = {"cpu": 5, "cuda": 1}   # rounds per provider; on CUDA one do_bench call, as before rounds
ROUND_S = 0.06       # CPU: each provider's share of one round (5 rounds: the 0.3 s the adaptive timer took)
MIN_CALLS = 1        # CPU: calls per provider per round, at least (a call longer than ROUND_S: one)
WARMUP_CALLS = 5     # CPU: first calls pay for thread-pool start-up and page faults
UNSTABLE = 2.0       # rounds (or the middle of a row's calls) that disagree by more than this: not a speed
# A case is "small", timed in one thread, when its forward moves at most SMALL_BYTES and does at most
# SMALL_FLOPS: a millisecond or two on one core (~10 GB/s, ~50 GFLOP/s), where more threads gain at
# most their count and, on a loaded machine, lose 10-500x waiting for each other (a thread that
# is not scheduled holds the others at the end of every parallel region: the rows stuck at
# 8 / 16 / 24 ms, and 40 ms medians against 1.6 ms in one thread, seen on a busy 2-core machine).
# Every case tagged "cpu" is small; a GPU-sized case timed on a CPU (--case) keeps every thread.
SMALL_BYTES = 16 << 20
SMALL_FLOPS = 100_000_000


@dataclasses.dataclass
class Timing:
    ms: float      # median
    p20: float
    p80: float
    rounds: List[float] = dataclasses.field(default_factory=list)   # each round's median ms
    calls: int = 0                     # calls timed (CPU; 0 where the device timer counts them)
    unstable: Optional[str] = None     # why the figure is not a speed (see :func:`assess`), else None
    error: Optional[str] = None        # the function raised while timed (the figures are NaN)
    cpu_ms: Optional[float] = None     # CPU: median CPU time of the calling thread per call (one thread)

    @property
    def spread(self) -> float:
        """The slowest round's median over the fastest's (1.0 with one round)."""
        ok = [r for r in self.rounds if r > 0]
        return max(ok) / min(ok) if ok else float("nan")


def _wall(fn: Callable[[], object], min_run_time: float):
    """``torch.utils.benchmark``'s adaptive timer over back-to-back calls (it synchronizes the
    device around each block, so on CUDA this is what a loop of calls costs, host included)."""
    import torch.utils.benchmark as tb
    return tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)


def time_stats(fn: Callable[[], object], device: torch.device) -> Timing:
    """Median, 20th and 80th percentile milliseconds of ``fn``. CUDA: ``triton.testing.do_bench``
    (CUDA events, L2 flushed before every call, warm-up first so compilation and autotuning stay
    out). CPU: ``torch.utils.benchmark``'s adaptive timer after a few warm-up calls."""
    if device.type == "cuda":
        from triton.testing import do_bench
        fn()
        torch.cuda.synchronize()
        ms, p20, p80 = do_bench(fn, warmup=50, rep=200, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(ms), float(p20), float(p80))
    for _ in range(5):  # first calls pay for thread-pool start-up and page faults
        fn()
    m = _wall(fn, 0.3)
    q = torch.tensor(m.times, dtype=torch.float64).quantile(torch.tensor([0.2, 0.8], dtype=torch.float64))
    return Timing(m.median * 1e3, float(q[0]) * 1e3, float(q[1]) * 1e3)


def small_work(nbytes: int, flops: int) -> bool:
    """Whether a case this size is timed in one thread (:data:`SMALL_BYTES`, :data:`SMALL_FLOPS`)."""
    return nbytes <= SMALL_BYTES and flops <= SMALL_FLOPS


@contextlib.contextmanager
def threads(n: Optional[int]) -> Iterator[int]:
    """``torch.set_num_threads(n)`` inside the block (``None``: unchanged), and the same count for
    the C++ inductor generates there (``torch._inductor.config.cpp.threads``: its kernels carry the
    count they were compiled with, and its cache does not tell counts apart otherwise); yields the
    count in use."""
    if n is None:
        yield torch.get_num_threads()
        return
    from torch._inductor import config as inductor
    before, compiled = torch.get_num_threads(), inductor.cpp.threads
    torch.set_num_threads(n)
    inductor.cpp.threads = n
    try:
        yield n
    finally:
        torch.set_num_threads(before)
        inductor.cpp.threads = compiled


def assess(rounds: List[List[float]], cpu: Optional[List[float]] = None) -> Timing:
    """One row's figures from its per-call seconds, one list per round: the median, 20th and 80th
    percentile ms of all its calls, each round's median, and ``unstable`` when they cannot be read
    as a speed: the rounds' medians disagree by more than :data:`UNSTABLE` x (the machine was
    busier during some rounds than others), the middle of its calls does (p80 over p20 above
    :data:`UNSTABLE`: a share of calls stalls, so the median and a loop's time per call part), or,
    given ``cpu`` (the calling thread's CPU seconds of each call, where the work runs in that one
    thread), the calls waited: their median wall time is more than :data:`UNSTABLE` x their median
    CPU time (the thread ran less than half the time: a machine busy all through the row's rounds,
    which they cannot see)."""
    calls = sorted(t for r in rounds for t in r)
    if not calls:
        raise ValueError("assess: no calls timed")
    q = torch.tensor(calls, dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    p20, ms, p80 = (float(v) * 1e3 for v in q)
    timing = Timing(ms, p20, p80, rounds=[statistics.median(r) * 1e3 for r in rounds if r], calls=len(calls))
    why = []
    if timing.spread > UNSTABLE:
        why.append(f"rounds disagree {timing.spread:.1f}x")
    if p20 > 0 and p80 / p20 > UNSTABLE:
        why.append(f"calls disagree (p80 {p80 / p20:.1f}x p20)")
    if cpu:
        timing.cpu_ms = statistics.median(cpu) * 1e3
        if timing.cpu_ms > 0 and ms / timing.cpu_ms > UNSTABLE:
            why.append(f"waited (wall {ms / timing.cpu_ms:.1f}x CPU time)")
    timing.unstable = "; ".join(why) or None
    return timing


def why(exc: BaseException) -> str:
    """An exception as a row keeps it: its type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _failed(exc: BaseException) -> Timing:
    nan = float("nan")
    return Timing(nan, nan, nan, error=why(exc))


def _cpu_rounds(fns: Dict[str, Callable[[], object]], rounds: int, failed: Dict[str, Timing],
                cpu: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[List[float]]]:
    """Per-call seconds of each function, the functions taking turns round by round (each round
    starts one further along the list, so none is always first); in a round each runs for
    :data:`ROUND_S` and at least :data:`MIN_CALLS` calls, each call timed on its own (and, given
    ``cpu``, its calling thread's CPU seconds appended there). A function that raises goes to
    ``failed`` and leaves the rounds."""
    clock, thread = time.perf_counter, time.thread_time
    names = list(fns)
    out: Dict[str, List[List[float]]] = {n: [] for n in names}
    for name in names:
        try:
            for _ in range(WARMUP_CALLS):
                fns[name]()
        except Exception as exc:  # noqa: BLE001 - the row keeps the reason
            failed[name] = _failed(exc)
    for r in range(rounds):
        live = [n for n in names if n not in failed]
        for name in live[r % max(len(live), 1):] + live[:r % max(len(live), 1)]:
            fn, calls = fns[name], []
            used = cpu.setdefault(name, []) if cpu is not None else None
            start = clock()
            try:
                while True:
                    c0 = thread() if used is not None else 0.0
                    t0 = clock()
                    fn()
                    t1 = clock()
                    if used is not None:
                        used.append(thread() - c0)
                    calls.append(t1 - t0)
                    if len(calls) >= MIN_CALLS and t1 - start >= ROUND_S:
                        break
            except Exception as exc:  # noqa: BLE001
                failed[name] = _failed(exc)
                continue
            out[name].append(calls)
    return {n: r for n, r in out.items() if n not in failed}


def time_rounds(fns: Dict[str, Callable[[], object]], device: torch.device,
                rounds: Optional[int] = None) -> Dict[str, Timing]:
    """Time the providers of one case together, in interleaved rounds (as ``benchmarks/per_call.py``
    does), so a disturbance of the machine lands on some rounds of every provider rather than on
    all of one provider's: ``{name: Timing}`` (``error`` set for a function that raised). ``rounds``
    defaults to :data:`ROUNDS` of the device type. CPU: each call timed on its own, in one thread
    its CPU time too (:func:`_cpu_rounds`, :func:`assess`). CUDA: a round is one :func:`time_stats` (``do_bench``)
    per function; with the default single round this is the timing before rounds existed."""
    rounds = rounds or ROUNDS.get(device.type, 1)
    failed: Dict[str, Timing] = {}
    if device.type != "cuda":
        # in one thread the work runs in the calling thread, so its CPU time says how long it ran
        cpu: Optional[Dict[str, List[float]]] = {} if torch.get_num_threads() == 1 else None
        got = {name: assess(r, (cpu or {}).get(name)) for name, r in _cpu_rounds(fns, rounds, failed, cpu).items()}
        return {name: got.get(name) or failed[name] for name in fns}
    per: Dict[str, List[Timing]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                per[name].append(time_stats(fn, device))
            except Exception as exc:  # noqa: BLE001
                failed[name] = _failed(exc)
    out = {}
    mid = statistics.median
    for name, ts in per.items():
        if name in failed:
            out[name] = failed[name]
            continue
        t = Timing(mid([x.ms for x in ts]), mid([x.p20 for x in ts]), mid([x.p80 for x in ts]),
                   rounds=[x.ms for x in ts])
        t.unstable = f"rounds disagree {t.spread:.1f}x" if t.spread > UNSTABLE else None
        out[name] = t
    return out


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn`` (see :func:`time_stats`)."""
    return time_stats(fn, device).ms


def loop_ms(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """CUDA: median milliseconds per call of back-to-back calls, no cache flush between them, so
    host time that ``do_bench``'s flush hides (the host runs ahead while the flush kernel runs) is
    counted. None elsewhere (there the main timing already is this)."""
    if device.type != "cuda":
        return None
    return _wall(fn, 0.1).median * 1e3


def kernel_ms(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[float], str]:
    """Device time of one call without the host: ``(ms, how)``. CUDA: the median of
    ``triton.testing.do_bench_cudagraph`` (calls captured in a CUDA graph and replayed); where
    capture fails (a host sync, a non-capturable op), the kernels' summed time under
    ``torch.profiler``. ``(None, reason)`` where neither is possible (e.g. on a CPU)."""
    if device.type != "cuda":
        return None, "CPU: no device timer (ms is the wall time of back-to-back calls, host included)"
    from triton.testing import do_bench_cudagraph
    try:
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median")), "cudagraph"
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the profiler
        capture_error = why(exc)
    torch.cuda.synchronize()
    try:
        from torch.profiler import ProfilerActivity, profile
        n = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        total_us = sum(e.self_device_time_total for e in prof.key_averages())
        if total_us <= 0:
            return None, f"graph capture failed ({capture_error}); the profiler saw no kernels"
        return total_us / n / 1e3, f"profiler (graph capture failed: {capture_error})"
    except Exception as exc:  # noqa: BLE001
        return None, f"graph capture failed ({capture_error}); profiler failed ({type(exc).__name__}: {exc})"


def host_bound(loop: Optional[float], kernel: Optional[float]) -> Optional[bool]:
    """True when back-to-back calls take more than :data:`HOST_BOUND` x the kernels' time (the host,
    not the GPU, sets the pace); None when either time is missing."""
    if loop is None or kernel is None or not loop == loop or not kernel == kernel or kernel <= 0:
        return None
    return loop > HOST_BOUND * kernel


def bandwidths(device: torch.device) -> Tuple[float, float]:
    """Bytes/s of ``(copy, read)`` streams over 1 GiB: a device-to-device copy (read + write
    counted) and a sum reduction (read only). NaN on a CPU."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    n = 1 << 30
    src = torch.empty(n // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    copy = 2 * n / (time_ms(lambda: dst.copy_(src), device) * 1e-3)
    read = n / (time_ms(lambda: src.sum(), device) * 1e-3)
    del src, dst
    return copy, read


def memory_seconds(read: int, written: int, copy_bw: float, read_bw: float) -> float:
    """Least time to read ``read`` and write ``written`` bytes: reads at the read-stream rate, writes
    at the rate that makes a copy take what it measured (``2/copy - 1/read`` seconds per byte, never
    below 0). A copy-like op gets ``bytes / copy_bw``, a read-only one ``bytes / read_bw``."""
    per_written = max(2 / copy_bw - 1 / read_bw, 0.0)
    return read / read_bw + written * per_written


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large matrix product through torch (cuBLAS)."""
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n ** 3 / (ms * 1e-3)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak device memory one call allocates beyond what was already held (an untimed call, so no
    timer's buffers are counted)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
