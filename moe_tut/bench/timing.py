"""Timing one call of a function on the GPU (CUDA events) or, labelled as such, on the CPU.

GPU: the method of triton.testing.do_bench (warm up, then per call: make L2 cold, event, call, event; median),
with an option to time CUDA-graph replay of the call instead, for launch-bound small-T cases (the launch overhead
is the host's, not the kernel's). L2 is made cold before every call, so weights are re-read from HBM, as in a real
model's forward. How (L2_FLUSH_MODES, MOE_TUT_L2_FLUSH; default "read"): do_bench zeroes a 256 MB buffer, which
leaves L2 full of dirty lines that the timed call then pays to write back as its reads evict them, up to ~50 MB
of writes that no model forward does. On an H100 that added 6-9 us to every decode forward and 9.5 us to a plain
117 MB read (results/h100/l2_flush_v1), while the 2 GB copy ceiling moved by under 1%. Our default reads a 256 MB
buffer instead: L2 is as cold for the call's data, and clean.
CPU: a perf_counter median. Those are correctness-run timings, never comparable with GPU numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..env import env_choice

L2_FLUSH_BYTES = 256 * 1024 * 1024
# How L2 is made cold before each timed call (MOE_TUT_L2_FLUSH overrides the default, "read"):
#   "read":  sum a 256 MB buffer. L2 is then full of clean lines of that buffer (and whatever the previous call
#            left dirty was written back during the flush), as after a layer that read other weights.
#   "write": zero a 256 MB buffer, as triton.testing.do_bench does. L2 is then full of dirty lines, and the timed
#            call pays for writing them back to HBM as its own reads evict them.
L2_FLUSH_ENV = "MOE_TUT_L2_FLUSH"
L2_FLUSH_MODES = ("read", "write")


def l2_flush_mode() -> str:
    return env_choice(L2_FLUSH_ENV, L2_FLUSH_MODES)


def l2_flusher(mode: str | None = None, device: torch.device | str = "cuda") -> Callable[[], object]:
    """A function that makes L2 of `device` cold, by `mode` (default: l2_flush_mode())."""
    mode = mode or l2_flush_mode()
    if mode not in L2_FLUSH_MODES:
        raise ValueError(f"L2 flush mode {mode!r}: expected one of {L2_FLUSH_MODES}")
    if mode == "write":
        buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        return buf.zero_
    buf = torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    return buf.sum


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str  # "cuda-events", "cuda-graph" or "cpu-clock"
    reps: int
    l2_flush: str = ""  # GPU: the L2_FLUSH_MODES entry used; CPU: ""


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
              rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 1000, flush: str | None = None) -> Timing:
    """Median over repeated calls with a cold L2 (flush: see L2_FLUSH_MODES). With use_graph, times graph
    replays of one call."""
    fn()
    torch.cuda.synchronize()
    run = fn
    method = "cuda-events"
    if use_graph:
        run = capture_graph(fn)[0].replay
        method = "cuda-graph"
    flush = flush or l2_flush_mode()
    flush_l2 = l2_flusher(flush)
    # Estimate the time of one call to choose how many to time.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush_l2()
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
        flush_l2()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(*_quantiles(times), method=method, reps=reps, l2_flush=flush)


def time_call(fn: Callable[[], object], device: torch.device, use_graph: bool = False,
              cpu_reps: int = 3) -> Timing:
    if torch.device(device).type == "cuda":
        return time_cuda(fn, use_graph=use_graph)
    return time_cpu(fn, reps=cpu_reps)
