#!/usr/bin/env python3
"""Where the host time of an eager forward goes: cProfile over repeated calls of one backend, one shape.

    python scripts/gpu_profile_host.py --preset qwen3-30b-a3b --tokens 1024 --backend triton

Runs the harness's timed unit (RoutingPlan.build + backend call) `--reps` times after a warm-up, under
cProfile, with a synchronize only at the end, and prints the functions with the most own time; also
counts the CUDA kernels one forward launches (torch.profiler).
"""

import argparse
import cProfile
import pstats

import torch

from moe_tut import ExpertWeights, get_backend, get_preset
from moe_tut.bench.harness import make_inputs, timed_forward

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="qwen3-30b-a3b")
ap.add_argument("--tokens", type=int, default=1024)
ap.add_argument("--backend", default="triton")
ap.add_argument("--reps", type=int, default=20)
ap.add_argument("--top", type=int, default=25)
args = ap.parse_args()
cfg = get_preset(args.preset)
b = get_backend(args.backend)
prepared = b.prepare(ExpertWeights.random(cfg, device="cuda"))
x, ids, tw = make_inputs(cfg, args.tokens, "uniform", "cuda")


forward = timed_forward(b, x, prepared, ids, tw, cfg.E)


for _ in range(3):
    forward()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    forward()
    torch.cuda.synchronize()
kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
print(f"{len(kernels)} GPU activities per forward: " + ", ".join(sorted({e.name[:40] for e in kernels})))
profiler = cProfile.Profile()
profiler.enable()
for _ in range(args.reps):
    forward()
profiler.disable()
torch.cuda.synchronize()
pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
