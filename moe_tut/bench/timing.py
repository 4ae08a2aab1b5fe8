"""Timing one call of a function on the GPU (CUDA events) or, labelled as such, on the CPU.

GPU: the same method as triton.testing.do_bench (warm up, then per call: flush L2 by writing a
256 MB buffer, event, call, event; median), with an option to time CUDA-graph replay of the call
instead, for launch-bound small-T cases (the launch overhead is the host's, not the kernel's). Both
keep L2 cold, so weights are re-read from HBM every call, as in a real model's forward.
CPU: a perf_counter median. Those are correctness-run timings, never comparable with GPU numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str  # "cuda-events", "cuda-graph" or "cpu-clock"
    reps: int


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return statistics.median(times), pick(0.2), pick(0.8)


def time_cpu(fn: Callable[[], object], reps: int = 3) -> Timing:
    fn()  # warm-up (first Triton call compiles/interprets setup)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(*_quantiles(times), method="cpu-clock", reps=reps)


def capture_graph(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn captured in a CUDA graph, after one warm-up call on a side stream (as capture requires). Returns the
    graph and what the captured call returned: tensors in the graph's memory, rewritten by each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_cuda(fn: Callable[[], object], use_graph: bool = False, warmup_ms: float = 25.0,
              rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 1000) -> Timing:
    """Median over repeated calls with a cold L2. With use_graph, times graph replays of one call."""
    fn()
    torch.cuda.synchronize()
    run = fn
    method = "cuda-events"
    if use_graph:
        run = capture_graph(fn)[0].replay
        method = "cuda-graph"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    # Estimate the time of one call to choose how many to time.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        run()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        run()
    reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(*_quantiles(times), method=method, reps=reps)


def time_call(fn: Callable[[], object], device: torch.device, use_graph: bool = False,
              cpu_reps: int = 3) -> Timing:
    if torch.device(device).type == "cuda":
        return time_cuda(fn, use_graph=use_graph)
    return time_cpu(fn, reps=cpu_reps)
