"""Timing and the machine's two ceilings (HBM bandwidth, matmul rate), measured in the same run."""
from __future__ import annotations

import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of ``fn``. CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed
    before every call, warm-up first so compilation and autotuning stay out). CPU:
    ``torch.utils.benchmark``'s adaptive timer after a few warm-up calls."""
    if device.type == "cuda":
        from triton.testing import do_bench
        fn()
        torch.cuda.synchronize()
        return float(do_bench(fn, warmup=50, rep=200, return_mode="median"))
    import torch.utils.benchmark as tb
    for _ in range(5):  # first calls pay for thread-pool start-up and page faults
        fn()
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=0.3)
    return m.median * 1e3


def hbm_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    del src, dst
    return 2 * n / (ms * 1e-3)


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
    """Peak device memory one call allocates beyond what was already held."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
