#!/usr/bin/env python3
"""Which cuda_int4 kernel version is fastest for each GEMM: time every (GEMM1 version, GEMM2 version) pair.

    python scripts/gpu_cuda_int4_mix.py --presets mixtral deepseek-v3 --tokens 1 4 --versions 2 3 5

Each pair runs the extension's three launches (gemm1_swiglu, gemm2_weighted, combine) on a prebuilt plan,
timed like scripts/gpu_cuda_int4_check.py's `kernels` rows (CUDA-graph replay, cold L2, median), and is
checked against the float32 reference on the dequantised weights. Writes cuda_int4_mix.csv under $OUT.
"""

import argparse
import functools
import os
from pathlib import Path

import torch

from moe_tut import ExpertWeights, RoutingPlan, get_preset
from moe_tut.backends import cuda_int4 as ci4
from moe_tut.bench.harness import make_inputs
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cuda
from moe_tut.quant import Int4ExpertWeights, int4_moe_reference
from moe_tut.reference import relative_error


def forward(ext, x, q, plan, v1: int, v2: int):
    """The three launches with GEMM1 in kernel version v1 and GEMM2 in v2."""
    w13, w2, T = q.w13, q.w2, x.shape[0]
    act = ext.gemm1_swiglu(x, w13.packed, w13.scales, w13.zeros, plan.sorted_token_ids, plan.expert_offsets,
                           w13.group_size, v1)
    out = ext.gemm2_weighted(act, w2.packed, w2.scales, w2.zeros, plan.sorted_slots, plan.sorted_weights,
                             plan.expert_offsets, T, w2.group_size, v2)
    return ext.combine(out, T, plan.top_k)


ap = argparse.ArgumentParser()
ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3"])
ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4])
ap.add_argument("--versions", nargs="+", type=int, default=[2, 3, 5])
args = ap.parse_args()
ext = ci4.load_extension()
rows = []
for name in args.presets:
    cfg = get_preset(name)
    q = Int4ExpertWeights.from_bf16(ExpertWeights.random(cfg, device="cuda"))
    for T in args.tokens:
        x, ids, tw = make_inputs(cfg, T, "uniform", "cuda")
        plan = RoutingPlan.build(ids, tw, cfg.E)
        ref = int4_moe_reference(x, q, ids, tw)
        for v1 in args.versions:
            for v2 in args.versions:
                run = functools.partial(forward, ext, x, q, plan, v1, v2)
                err = relative_error(run(), ref)
                us = time_cuda(run, use_graph=True).median_ms * 1e3
                rows.append(dict(preset=name, T=T, gemm1=v1, gemm2=v2, us=round(us, 1), rel_err=f"{err:.2e}",
                                 gpu=torch.cuda.get_device_name()))
                print(f"{name:12s} T={T:<3d} gemm1 v{v1} gemm2 v{v2}: {us:7.1f} us  err {err:.2e}", flush=True)
    del q
    torch.cuda.empty_cache()
path = write_csv(Path(os.environ.get("OUT", ".")) / "cuda_int4_mix.csv", rows)
print(f"wrote {path}")
