#!/usr/bin/env python3
"""A profiling target: a few cuda_int4 decode forwards of one preset, for ncu (Nsight Compute).

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        -k regex:"gemm|combine" --launch-skip 3 --launch-count 3 \\
        python scripts/gpu_cuda_int4_profile_target.py --preset mixtral --tokens 1 --version 4

Each forward is three launches (gemm1_swiglu, gemm2_weighted, combine); --launch-skip 3 skips the first
forward's. Only the experts the routing touches are quantised (a preset's full INT4 weights are built
expert by expert from random bf16 ones, so deepseek-v3 fits easily).
"""

import argparse

import torch

from moe_tut import ExpertWeights, RoutingPlan, get_preset, simulate_routing
from moe_tut.backends import cuda_int4 as ci4
from moe_tut.quant import Int4ExpertWeights

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="mixtral")
ap.add_argument("--tokens", type=int, default=1)
ap.add_argument("--version", type=int, default=ci4.DEFAULT_VERSION)
ap.add_argument("--reps", type=int, default=3)
args = ap.parse_args()
cfg = get_preset(args.preset)
w = ExpertWeights.random(cfg, device="cuda")
q = Int4ExpertWeights.from_bf16(w)
del w
ids, tw = simulate_routing(args.tokens, cfg.E, cfg.top_k, "uniform", seed=0, device="cuda")
x = torch.randn(args.tokens, cfg.H, device="cuda", dtype=torch.bfloat16)
plan = RoutingPlan.build(ids, tw, cfg.E)
for _ in range(args.reps):
    ci4.cuda_int4_forward(x, q, plan, version=args.version)
torch.cuda.synchronize()
print("done", flush=True)
