#!/usr/bin/env python3
"""Programmatic dependent launch on and off, side by side, timed exactly as the harness times a forward.

    python scripts/gpu_pdl_ab.py [--presets mixtral deepseek-v3] [--tokens 1 16]
                                 [--backends triton triton_int4 cuda_int4] [--passes 2]

For each preset and T, moe_tut.bench.harness.run_point runs the backends with MOE_TUT_PDL=1 and =0 in turn (the
order flips on every other pass, so a drift over the run favours neither). Each row is the harness's own row:
its correctness check against the float32 reference, then RoutingPlan.build + the backend's kernels under
CUDA-graph replay with L2 made cold, and its % of the roofline bound (bf16) or of the copy bandwidth (INT4).
PDL only acts on sm_90+; elsewhere both settings run the same launches. Writes pdl_ab.csv under --out or $OUT.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.harness import compare_settings
from moe_tut.bench.results import write_csv
from moe_tut.env import PDL_ENV


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--backends", nargs="+", default=["triton", "triton_int4", "cuda_int4"])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    ceilings = measure_ceilings(dev)
    rows = []
    settings = {pdl: {PDL_ENV: str(pdl)} for pdl in (1, 0)}
    for name, T, p, pdl, r in compare_settings(args.presets, args.tokens, args.backends, settings, args.passes,
                                               ceilings, dev):
        us, pct = r.median_ms * 1e3, r.roofline_pct  # NaN unless timed
        print(f"{name:14s} T={T:<3d} pass {p} pdl={pdl} {r.backend:12s} {r.status:8s} {us:9.1f} us"
              f" {pct:5.1f}%" + (f"  ({r.reason})" if r.reason else ""), flush=True)
        rows.append(dict(preset=name, T=T, pass_=p, pdl=pdl, backend=r.backend, status=r.status,
                         median_us=round(us, 2), pct=round(pct, 1), reason=r.reason or ""))
    if args.out and rows:
        print(f"wrote {write_csv(Path(args.out) / 'pdl_ab.csv', rows)}")


if __name__ == "__main__":
    main()
