#!/usr/bin/env python3
"""cuda_int4 kernel versions side by side, timed exactly as the harness times a forward, alternating in one process.

    python scripts/gpu_cuda_int4_ab.py [--versions 2 6] [--pdl 1 0] [--presets mixtral deepseek-v3] [--tokens 1]
                                       [--passes 3]

For each preset and T, moe_tut.bench.harness.run_point runs the `cuda_int4` backend once per variant (version x
programmatic dependent launch on/off) and pass, with MOE_TUT_CUDA_INT4_VERSION and MOE_TUT_PDL set to that
variant's values (the order of the variants reverses on every other pass, so
a drift over the run does not favour one). Each row is the harness's own row: its correctness check against the
float32 reference, then RoutingPlan.build + the three kernels under CUDA-graph replay with L2 made cold
(moe_tut.bench.timing), and its % of the copy bandwidth on the touched experts' packed bytes. This is the timing
the README and the issues quote; scripts/gpu_cuda_int4_check.py times the kernels on a prebuilt plan instead.
Writes cuda_int4_ab.csv under --out or $OUT.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from moe_tut.backends import cuda_int4 as ci4
from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.harness import compare_settings
from moe_tut.bench.results import write_csv
from moe_tut.env import PDL_ENV


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", type=int, default=[ci4.DEFAULT_VERSION_T1, ci4.LATEST_VERSION])
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "glm-4.5", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1])
    ap.add_argument("--pdl", nargs="+", type=int, choices=[0, 1], default=[1],
                    help="programmatic dependent launch settings to compare (1 = on, the default)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    for v in args.versions:
        ci4.resolve_version(v)  # an unknown version fails here, before any weights are made
    dev = torch.device("cuda")
    ceilings = measure_ceilings(dev)
    variants = {(v, pdl): {ci4.VERSION_ENV: str(v), PDL_ENV: str(pdl)} for v in args.versions for pdl in args.pdl}
    rows = []
    for name, T, p, (v, pdl), r in compare_settings(args.presets, args.tokens, ["cuda_int4"], variants, args.passes,
                                                   ceilings, dev):
        us, pct = r.median_ms * 1e3, r.roofline_pct  # NaN unless timed
        print(f"{name:14s} T={T:<3d} pass {p} v{v} pdl={pdl}  {r.status:8s} {us:8.1f} us  "
              f"{pct:5.1f}% of copy" + (f"  ({r.reason})" if r.reason else ""), flush=True)
        rows.append(dict(preset=name, T=T, pass_=p, version=v, pdl=pdl, status=r.status,
                         median_us=round(us, 2), pct_of_copy=round(pct, 1), reason=r.reason or ""))
    if args.out and rows:
        print(f"wrote {write_csv(Path(args.out) / 'cuda_int4_ab.csv', rows)}")


if __name__ == "__main__":
    main()
