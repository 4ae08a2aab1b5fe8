#!/usr/bin/env python3
"""Does the way L2 is flushed before each timed call change decode numbers? Both flush modes side by side.

    python scripts/gpu_l2_flush_check.py [--presets mixtral deepseek-v3 ...] [--tokens 1 16] [--out DIR]

moe_tut.bench.timing makes L2 cold before every timed call. "write" zeroes a 256 MB buffer (what
triton.testing.do_bench does): L2 is left full of dirty lines, which the timed call's own reads must write back to
HBM as they evict them. "read" sums a 256 MB buffer: L2 is left full of clean lines of an unrelated buffer (as after
a layer that read other weights), and the timed call reads from HBM with nothing to write back. In both modes the
weights are not in L2. A memory-bound decode forward reads 20-180 MB, so up to ~50 MB of write-back inside the timed
region would be 10-30% of its time.

For each mode, in this order (modes alternate, so drift shows as a difference between the two `write` passes):
  1. the copy ceiling (2 GB device copy) and torch.sum reads of 20 / 59 / 117 / 182 MB (scripts/gpu_read_floor.py's
     floor: one launch, graph replay);
  2. the harness rows (moe_tut.bench.harness.run_point: checked against the reference, then timed as the CLI times
     them) for each preset and T.
Writes l2_flush.csv (one row per mode, pass and case) under --out or $OUT.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from moe_tut import ExpertWeights, get_preset
from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.harness import run_point
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import L2_FLUSH_MODES, time_cuda

PASSES = ("write", "read", "write", "read")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "glm-4.5", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--backends", nargs="+", default=["grouped_mm", "triton", "triton_int4", "cuda_int4"])
    ap.add_argument("--read-mb", nargs="+", type=float, default=[20, 59, 117, 182])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    assert set(PASSES) == set(L2_FLUSH_MODES)
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    rows, ceilings = [], {}
    bufs = {mb: torch.randint(0, 256, (int(mb * 1e6) // 4 * 4,), dtype=torch.uint8, device=dev).view(torch.float32)
            for mb in args.read_mb}
    for i, mode in enumerate(PASSES):
        os.environ["MOE_TUT_L2_FLUSH"] = mode
        ceilings[mode] = c = measure_ceilings(dev)
        print(f"[pass {i} {mode}] copy {c.copy_gbps:.0f} GB/s, GEMM {c.gemm_tflops:.0f} TFLOP/s", flush=True)
        rows.append(dict(pass_=i, mode=mode, case="copy ceiling", GBps=round(c.copy_gbps)))
        for mb, words in bufs.items():
            tm = time_cuda(lambda w=words: w.sum(), use_graph=True, flush=mode)
            gbps = words.numel() * 4 / (tm.median_ms * 1e-3) / 1e9
            print(f"  sum {mb:5.0f} MB  {tm.median_ms * 1e3:7.1f} us  {gbps:5.0f} GB/s "
                  f"{100 * gbps / c.copy_gbps:5.1f}% of copy", flush=True)
            rows.append(dict(pass_=i, mode=mode, case=f"sum {mb:g} MB", median_us=round(tm.median_ms * 1e3, 1),
                             GBps=round(gbps), pct_of_copy=round(100 * gbps / c.copy_gbps, 1)))
    del bufs
    for name in args.presets:
        cfg = get_preset(name)
        t0 = time.time()
        weights = ExpertWeights.random(cfg, device=dev, seed=0)
        cache: dict = {}
        print(f"== {name}: weights in {time.time() - t0:.0f} s", flush=True)
        for T in args.tokens:
            for i, mode in enumerate(PASSES):
                os.environ["MOE_TUT_L2_FLUSH"] = mode
                for r in run_point(cfg, T, weights, args.backends, ceilings[mode], prepared_cache=cache):
                    pct = r.roofline_pct if r.status == "ok" else float("nan")
                    print(f"  [{i} {mode:5s}] {name} T={T} {r.backend:12s} {r.status:6s} {r.median_ms * 1e3:8.1f} us "
                          f"{pct:5.1f}% of roofline  {r.weight_gbps:6.0f} GB/s {r.reason}", flush=True)
                    rows.append(dict(pass_=i, mode=mode, case=f"{name} T={T} {r.backend}", status=r.status,
                                     median_us=round(r.median_ms * 1e3, 1), GBps=round(r.weight_gbps, 1),
                                     pct_of_roofline=round(pct, 1), rel_err=r.rel_err))
        del weights, cache
        torch.cuda.empty_cache()
    if args.out:
        print(f"wrote {write_csv(Path(args.out) / 'l2_flush.csv', rows)}")


if __name__ == "__main__":
    main()
