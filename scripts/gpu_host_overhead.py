#!/usr/bin/env python3
"""How much of an eager MoE forward is host (Python + launch) time: one GPU call per preset and T.

For each backend, preset and T, the full forward (RoutingPlan.build + backend call, as the harness times it):
    events_ms   median CUDA-event time per call with a cold L2 (the harness's method for T > 64; the median
                over the trials)
    graph_ms    median CUDA-graph replay of the same call (no host work at all)
    host_ms     host time per call when calls are queued back to back without a sync (perf_counter over
                `--reps` calls, divided; the median of `--trials` such runs, as the host's clock and load vary
                between runs): if it exceeds graph_ms, the eager forward is host-bound.
With --fast-launch-ab every point runs with MOE_TUT_FAST_LAUNCH=0 and =1 in turn (kernels/launch.py; the order
flips on every other trial), column fast_launch.
Prints a table and writes host_overhead.csv under $OUT (or --out).

    python scripts/gpu_host_overhead.py --presets qwen3-30b-a3b mixtral --tokens 128 1024 8192 [--fast-launch-ab]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from moe_tut import ExpertWeights, get_backend, get_preset
from moe_tut.bench.harness import make_inputs, timed_forward
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cuda
from moe_tut.kernels.launch import FAST_LAUNCH_ENV


def host_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps
    torch.cuda.synchronize()
    return host * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "mixtral"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 1024, 8192])
    ap.add_argument("--backends", default="grouped_mm,triton")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--fast-launch-ab", action="store_true", help="each point with MOE_TUT_FAST_LAUNCH=0 and =1")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = []
    settings = ["0", "1"] if args.fast_launch_ab else [os.environ.get(FAST_LAUNCH_ENV, "default")]
    print(f"{'preset':14s} {'T':>5s} {'backend':11s} {'fast':>7s} {'events_ms':>9s} {'graph_ms':>9s} {'host_ms':>8s}",
          flush=True)
    for name in args.presets:
        cfg = get_preset(name)
        w = ExpertWeights.random(cfg, device="cuda")
        for T in args.tokens:
            x, ids, tw = make_inputs(cfg, T, "uniform", "cuda")
            for bname in args.backends.split(","):
                b = get_backend(bname)
                prepared = b.prepare(w)

                forward = timed_forward(b, x, prepared, ids, tw, cfg.E)
                forward()  # compile / autotune outside the timings
                hosts = {s: [] for s in settings}
                events = {s: [] for s in settings}
                for trial in range(args.trials):
                    for setting in settings if trial % 2 == 0 else settings[::-1]:
                        if args.fast_launch_ab:
                            os.environ[FAST_LAUNCH_ENV] = setting
                        forward()  # a first launch of each key under this setting
                        hosts[setting].append(host_ms(forward, args.reps))
                        events[setting].append(time_cuda(forward).median_ms)
                gr = time_cuda(forward, use_graph=True).median_ms if b.graph_safe else float("nan")
                for setting in settings:
                    ev, ho = statistics.median(events[setting]), statistics.median(hosts[setting])
                    rows.append(dict(preset=name, T=T, backend=bname, fast_launch=setting, events_ms=round(ev, 4),
                                     graph_ms=round(gr, 4), host_ms=round(ho, 4),
                                     host_ms_min=round(min(hosts[setting]), 4), gpu=torch.cuda.get_device_name()))
                    print(f"{name:14s} {T:5d} {bname:11s} {setting:>7s} {ev:9.3f} {gr:9.3f} {ho:8.3f}", flush=True)
        del w
        torch.cuda.empty_cache()
    path = write_csv(Path(args.out) / "host_overhead.csv", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
