"""Timing and the machine's ceilings (copy and read bandwidth, matmul rate), measured in the same run."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch

HOST_BOUND = 1.10   # a row is host-bound when back-to-back calls take this much longer than its kernels


@dataclasses.dataclass
class Timing:
    ms: float      # median
    p20: float
    p80: float


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
        capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
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
