#!/usr/bin/env python3
"""Issue 4's prefill ratio, triton_int4 / bf16 triton at T = 8192, measured as pairs in one process.

    python scripts/gpu_prefill_ratio.py [--presets mixtral deepseek-v3 qwen3-30b-a3b] [--pairs 5] [--tokens 8192]

The bf16 forward at mixtral T = 8192 has measured 8.7-10.7 ms across runs (clock and power drift over long GEMMs),
so one pair of timings gives a ratio good to about +-10%. This runs moe_tut.bench.harness.run_point with both
backends --pairs times (each call checks both against the reference, then times bf16 and INT4 back to back, as the
CLI does) and prints each pair's ratio and their median. Writes prefill_ratio.csv under --out or $OUT.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from moe_tut import ExpertWeights, get_preset
from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.harness import run_point
from moe_tut.bench.results import write_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    ceilings = measure_ceilings(dev)
    print(f"{torch.cuda.get_device_name(dev)}; copy {ceilings.copy_gbps:.0f} GB/s, GEMM {ceilings.gemm_tflops:.0f} "
          f"TFLOP/s", flush=True)
    rows = []
    for name in args.presets:
        cfg = get_preset(name)
        weights = ExpertWeights.random(cfg, device=dev, seed=0)
        cache: dict = {}
        ratios = []
        for i in range(args.pairs):
            bf16, int4 = run_point(cfg, args.tokens, weights, ["triton", "triton_int4"], ceilings,
                                   prepared_cache=cache)
            ok = bf16.status == int4.status == "ok"
            ratio = int4.median_ms / bf16.median_ms if ok else float("nan")
            ratios.append(ratio)
            print(f"{name:14s} T={args.tokens} pair {i}: triton {bf16.median_ms:7.3f} ms ({bf16.status}), "
                  f"triton_int4 {int4.median_ms:7.3f} ms ({int4.status}), ratio {ratio:.3f}", flush=True)
            rows.append(dict(preset=name, T=args.tokens, pair=i, triton_ms=round(bf16.median_ms, 4),
                             triton_int4_ms=round(int4.median_ms, 4), ratio=round(ratio, 4),
                             status=f"{bf16.status}/{int4.status}"))
        print(f"{name:14s} median ratio {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})",
              flush=True)
        del weights, cache
        torch.cuda.empty_cache()
    if args.out:
        print(f"wrote {write_csv(Path(args.out) / 'prefill_ratio.csv', rows)}")


if __name__ == "__main__":
    main()
