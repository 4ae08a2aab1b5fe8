#!/usr/bin/env python3
"""GPU experiment: bf16 GEMM1 (gather, w13, SwiGLU) with gate and up as two tiles (TMA weight loads, the
default) vs stacked into one tile and one dot (grouped_gemm's STACK, pointer loads).

For each preset and T (uniform routing, plan prebuilt): both versions checked against each other (relative
error), then timed alternately three times each (time_cuda: cold L2, CUDA events, median; each version
autotuned over the usual GEMM1 candidates), and the whole forward once each way. Prints one line per
measurement and writes triton_stack.csv under $OUT (or --out).

Usage:  python scripts/gpu_triton_stack.py --presets mixtral deepseek --tokens 1024 8192
"""

import argparse
import csv
import os
import sys

import torch

from moe_tut import ExpertWeights, RoutingPlan, get_preset, relative_error, simulate_routing
from moe_tut.bench.timing import time_cuda
from moe_tut.kernels import grouped_gemm as gg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[8192])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    rows_out = []
    for preset in args.presets:
        cfg = get_preset(preset)
        w = ExpertWeights.random(cfg, device="cuda")
        for T in args.tokens:
            ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0, device="cuda")
            x = torch.randn(T, cfg.H, device="cuda", dtype=torch.bfloat16)
            plan = RoutingPlan.build(ids, tw, cfg.E)
            rows = plan.num_rows

            def gemm1(stack, x=x, w=w, plan=plan, rows=rows, F=cfg.F):
                return gg.grouped_gemm(x, w.w13, plan, gg._alloc((rows, F), x), gather_rows=True, swiglu=True,
                                       stack=stack)

            err = relative_error(gemm1(True), gemm1(False).float())
            for rep in range(3):
                for stack in (False, True):
                    ms = time_cuda(lambda stack=stack: gemm1(stack), warmup_ms=10, rep_ms=80).median_ms
                    rows_out.append(dict(preset=preset, T=T, what="gemm1", stack=stack, rep=rep, ms=f"{ms:.4f}",
                                         rel_err_stack_vs_two=f"{err:.2e}"))
                    print(f"{preset:<14}{T:>6} GEMM1 stack={stack!s:<5} rep {rep}: {ms:.4f} ms  (err {err:.1e})",
                          flush=True)
            for stack in (False, True):
                os.environ[gg.STACK_ENV] = "1" if stack else "0"
                ms = time_cuda(lambda x=x, w=w, plan=plan: gg.moe_forward_triton(x, w, plan), warmup_ms=10,
                               rep_ms=80).median_ms
                rows_out.append(dict(preset=preset, T=T, what="forward", stack=stack, rep=0, ms=f"{ms:.4f}"))
                print(f"{preset:<14}{T:>6} forward stack={stack!s:<5}: {ms:.4f} ms", flush=True)
            os.environ.pop(gg.STACK_ENV, None)
    print("\n".join(gg.autotune_report()), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "triton_stack.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["preset", "T", "what", "stack", "rep", "ms", "rel_err_stack_vs_two"])
            wr.writeheader()
            wr.writerows(rows_out)


if __name__ == "__main__":
    main()
