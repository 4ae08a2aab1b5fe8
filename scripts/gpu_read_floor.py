#!/usr/bin/env python3
"""How fast can one kernel read N bytes at all? The floor a decode forward's weight streaming is held to.

    python scripts/gpu_read_floor.py [--mb 20 59 117 182 700] [--out DIR]

For each size, one contiguous buffer read by a plain reduction (torch.sum of a float32 buffer: one launch,
every byte read once, 4 bytes written; random bits, so some values are NaN or Inf, which costs a GPU nothing),
timed as the harness times a decode forward:
CUDA-graph replay, L2 flushed before each replay, median of CUDA events. The cuda_int4 sizes at T = 1 are
59 MB (mixtral's two touched experts' w2, GEMM2), 117 MB (their w13, GEMM1) and 182 MB (both, one forward).
Prints read GB/s and its share of the device copy bandwidth (read + write) measured in the same run, and
writes read_floor.csv under --out or $OUT.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cuda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", nargs="+", type=float, default=[20, 59, 117, 182, 700])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy = measure_ceilings(dev).copy_gbps
    print(f"{torch.cuda.get_device_name(dev)}: device copy {copy:.0f} GB/s (read + write)")
    rows = []
    for mb in args.mb:
        n = int(mb * 1e6) // 4 * 4
        words = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev).view(torch.float32)
        tm = time_cuda(lambda w=words: w.sum(), use_graph=True)
        gbps = n / (tm.median_ms * 1e-3) / 1e9
        rows.append(dict(MB=mb, median_us=round(tm.median_ms * 1e3, 1), read_GBps=round(gbps),
                         pct_of_copy=round(100 * gbps / copy, 1)))
        print(f"{mb:7.1f} MB  {tm.median_ms * 1e3:8.1f} us  {gbps:6.0f} GB/s  {100 * gbps / copy:5.1f}% of copy")
    if args.out:
        print(f"wrote {write_csv(Path(args.out) / 'read_floor.csv', rows)}")


if __name__ == "__main__":
    main()
