#!/usr/bin/env python3
"""GPU experiment: is the bf16 `triton` forward's autotuned tile pair the best one, and how much do repeated
timings of the same forward spread?

For one preset at T tokens (uniform routing, plan prebuilt): the autotuned forward timed three times in one
process (time_cuda: cold L2, CUDA events, median), the autotuner's picks, then the forward with every pair of the
first four GEMM1 (fused gate/up) x GEMM2 candidates of grouped_gemm.get_autotune_configs pinned. Prints one line
per measurement.

Usage:  python scripts/gpu_bf16_config_sweep.py mixtral [T]
"""

import itertools
import sys

import torch

from moe_tut import ExpertWeights, RoutingPlan, get_preset
from moe_tut.bench.harness import make_inputs
from moe_tut.bench.timing import time_cuda
from moe_tut.kernels import grouped_gemm as gg


def timed_ms(fn) -> float:
    return time_cuda(fn, warmup_ms=10, rep_ms=100).median_ms


def main():
    preset = sys.argv[1] if len(sys.argv) > 1 else "mixtral"
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    cfg = get_preset(preset)
    w = ExpertWeights.random(cfg, device="cuda")
    x, ids, tw = make_inputs(cfg, T, "uniform", "cuda")
    plan = RoutingPlan.build(ids, tw, cfg.E)
    for _ in range(3):
        print(f"{preset} autotuned forward: {timed_ms(lambda: gg.moe_forward_triton(x, w, plan)):.3f} ms", flush=True)
    print("\n".join(gg.autotune_report()), flush=True)
    for c1, c2 in itertools.product(gg.get_autotune_configs(True)[:4], gg.get_autotune_configs(False)[:4]):
        try:
            ms = timed_ms(lambda c1=c1, c2=c2: gg.moe_forward_triton(x, w, plan, config=c1, config2=c2))
            print(f"{preset} {c1} / {c2}: {ms:.3f} ms", flush=True)
        except Exception as exc:  # a tile that does not compile or fit is reported, not fatal
            print(f"{preset} {c1} / {c2}: error {str(exc).splitlines()[0][:80]}", flush=True)


if __name__ == "__main__":
    main()
