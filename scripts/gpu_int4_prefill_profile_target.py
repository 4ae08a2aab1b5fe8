#!/usr/bin/env python3
"""A profiling target: one prefill forward of triton_int4 and of bf16 triton on the same inputs, for ncu.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section WarpStateStats --section Occupancy --section LaunchStats -k regex:_moe \\
        python scripts/gpu_int4_prefill_profile_target.py --preset mixtral --tokens 8192

Both forwards run twice first, outside the profiled range (autotuning and compiles), and print the tile configs
the autotuners chose; then cudaProfilerStart, one forward of each (GEMM1 and GEMM2 of each: four kernels), Stop.
"""

import argparse

import torch

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset
from moe_tut.bench.harness import make_inputs
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.kernels import int4_gemm as ig

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="mixtral")
ap.add_argument("--tokens", type=int, default=8192)
args = ap.parse_args()
cfg = get_preset(args.preset)
w = ExpertWeights.random(cfg, device="cuda")
q = moe_tut.get_backend("triton_int4").prepare(w)
x, ids, tw = make_inputs(cfg, args.tokens, "uniform", "cuda")
plan = RoutingPlan.build(ids, tw, cfg.E)
for _ in range(2):
    ig.moe_forward_triton_int4(x, q, plan)
    gg.moe_forward_triton(x, w, plan)
torch.cuda.synchronize()
for line in ig.autotune_report() + gg.autotune_report():
    print(line, flush=True)
torch.cuda.cudart().cudaProfilerStart()
ig.moe_forward_triton_int4(x, q, plan)
gg.moe_forward_triton(x, w, plan)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("done", flush=True)
