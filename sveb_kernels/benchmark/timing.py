"""Timing and peak-memory measurement, on CPU and CUDA, and the machine's own ceilings.

GPU: CUDA events around the region, median of repeats after warm-up, peak from the caching
allocator. CPU: perf_counter, median of repeats; peak from torch.profiler's record of every allocation and free
(what torch allocates during the call on top of what was live before it, not the process RSS).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Measurement:
    median_s: float
    peak_bytes: Optional[int]
    repeats: int
    spread: Optional[float] = None  # (slowest - fastest) / median of the repeats; None with one repeat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
                max_seconds: float = 10.0) -> tuple[float, int]:
    """Median seconds per call; stops repeating early once max_seconds are spent."""
    times = time_repeats(fn, device, repeats, warmup, max_seconds)
    return statistics.median(times), len(times)


def spread(times: list[float]) -> Optional[float]:
    """How far the repeats of one measurement disagree: (slowest - fastest) / median. On a quiet
    machine a few percent; when other processes take the cores, tens of percent or more."""
    if len(times) < 2:
        return None
    return (max(times) - min(times)) / statistics.median(times)


def time_repeats(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
                 max_seconds: float = 10.0) -> list[float]:
    """Seconds of each timed call, after warm-up; stops repeating early once max_seconds are spent."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    spent = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > max_seconds:
            break
    return times


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side (kineto) prints start/stop banners straight to fd 2 on every use."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_added_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory the call adds on top of what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # every allocation and free with its time stamp (the data behind export_memory_timeline)
        from torch._C._profiler import _EventType

        pending, changes = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while pending:
            node = pending.pop()
            if node.tag == _EventType.Allocation:
                changes.append((node.start_time_ns, node.extra_fields.alloc_size))
            pending.extend(node.children)
    except (ImportError, AttributeError):  # a torch without this private API: no number rather than a wrong one
        return None
    live = peak = 0
    for _, change in sorted(changes):
        live += change
        peak = max(peak, live)
    return peak


def measure(fn: Callable[[], object], device: torch.device, repeats: int, memory: bool = True,
            max_seconds: float = 10.0) -> Measurement:
    times = time_repeats(fn, device, repeats, max_seconds=max_seconds)
    return Measurement(statistics.median(times), peak_added_bytes(fn, device) if memory else None, len(times),
                       spread(times))


def matmul_flops_per_s(device: torch.device) -> tuple[float, str]:
    """Rate of one large matmul measured now: bf16 on GPU (tensor cores), fp32 on CPU."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    # Random data, never zeros: a matmul on zeros can run faster than on real data.
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = time_median(lambda: a @ b, device, repeats=10, warmup=2)
    return 2 * n**3 / seconds, f"{str(dtype).replace('torch.', '')} {n}^3 matmul"


def copy_bytes_per_s(device: torch.device, quick: bool) -> float:
    """Device memory bandwidth: bytes read plus written by one large copy."""
    n = (1 << 28) if device.type == "cuda" else (1 << (22 if quick else 24))
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds, _ = time_median(lambda: dst.copy_(src), device, repeats=10 if device.type == "cuda" else 5)
    return 2 * src.numel() * src.element_size() / seconds


def default_cpu_threads() -> tuple[int, str]:
    """A thread count whose timings hold still: torch's default, less the cores other processes keep
    busy (1-minute load average). Oversubscribed threads wait for each other at every parallel
    region, which swings multi-threaded times by up to 10x and inverts speedups."""
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows): keep torch's choice
        return threads, f"torch's default ({threads})"
    cores = os.cpu_count() or threads
    free = max(1, int(cores - load + 0.5))
    chosen = max(1, min(threads, free))
    why = f"load average {load:.1f} on {cores} cores" + ("" if chosen == threads else f", so {chosen} of {threads}")
    return chosen, why
