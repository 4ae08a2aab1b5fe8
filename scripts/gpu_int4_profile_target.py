#!/usr/bin/env python3
"""A profiling target: a few INT4 decode forwards of one preset, for ncu (Nsight Compute).

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats -k regex:_moe_int4 \\
        python scripts/gpu_int4_profile_target.py --preset mixtral --tokens 1 --variant magic,post,split,ppsm=64

Compiles outside the profiled range is not possible with ncu's kernel filter alone, so the script runs
the forward `--reps` times; profile the last launches (--launch-skip) to skip the first (compiling) ones.
"""

import argparse

import torch

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset
from moe_tut.bench.harness import make_inputs
from moe_tut.kernels import int4_gemm as ig
from moe_tut.kernels.grouped_gemm import TileConfig

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="mixtral")
ap.add_argument("--tokens", type=int, default=1)
ap.add_argument("--variant", default="magic,post,split,ppsm=64")
ap.add_argument("--config", default="16,64,128,8,4,3")  # the decode tile (DECODE_CONFIGS[0])
ap.add_argument("--reps", type=int, default=3)
args = ap.parse_args()
cfg = get_preset(args.preset)
w = ExpertWeights.random(cfg, device="cuda")
q = moe_tut.get_backend("triton_int4").prepare(w)
del w
x, ids, tw = make_inputs(cfg, args.tokens, "uniform", "cuda")
plan = RoutingPlan.build(ids, tw, cfg.E)
for _ in range(args.reps):
    ig.moe_forward_triton_int4(x, q, plan, variant=ig.Int4Variant.parse(args.variant),
                               config=TileConfig.parse(args.config), path="decode")
torch.cuda.synchronize()
print("done", flush=True)
