#!/usr/bin/env python3
"""Two or more settings of moe_tut's environment switches, side by side, timed exactly as the harness times a forward.

    python scripts/gpu_env_ab.py --setting kernel:MOE_TUT_ONE_TOKEN_SUM=kernel \
                                 --setting gemm2:MOE_TUT_ONE_TOKEN_SUM=gemm2 \
                                 --setting "pinned:MOE_TUT_TRITON_CONFIG=128,128,64,8,8,4 MOE_TUT_PDL=0" \
                                 [--presets qwen3-30b-a3b mixtral] [--tokens 1] [--backends triton triton_int4]
                                 [--passes 3] [--name one_token_sum]

A setting is LABEL:VAR=VALUE[ VAR=VALUE...], assignments apart by spaces (values may hold commas); LABEL: with
nothing after it runs the environment as it is. For each
preset and T, moe_tut.bench.harness.compare_settings runs the backends under each setting in turn (the order flips on
every other pass, so a drift over the run favours none). Each row is the harness's own: its correctness check
against the float32 reference, then the timed call (RoutingPlan.build + the backend's kernels, CUDA-graph replay for
small T, L2 made cold) and its % of the roofline bound (bf16) or of the copy bandwidth (INT4).
Writes NAME.csv under --out or $OUT. It replaces scripts/gpu_pdl_ab.py (until session 11; its runs in results/ are
`--setting 1:MOE_TUT_PDL=1 --setting 0:MOE_TUT_PDL=0` here).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.harness import compare_settings
from moe_tut.bench.results import write_csv
from moe_tut.kernels import grouped_gemm, int4_gemm


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """'label:A=1,2 B=x' -> ('label', {'A': '1,2', 'B': 'x'})."""
    label, sep, assignments = text.partition(":")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"a setting is LABEL:VAR=VALUE[ VAR=VALUE...], got {text!r}")
    env = {}
    for item in assignments.split():
        var, eq, value = item.partition("=")
        if not eq or not var:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not VAR=VALUE")
        env[var] = value
    return label, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", action="append", type=parse_setting, required=True,
                    help="LABEL:VAR=VALUE[ VAR=VALUE...]; give two or more")
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1])
    ap.add_argument("--backends", nargs="+", default=["triton", "triton_int4"])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--name", default="env_ab", help="the CSV's file name, without .csv")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    settings = dict(args.setting)
    if len(settings) < 2:
        ap.error("give at least two --setting with different labels")
    dev = torch.device("cuda")
    ceilings = measure_ceilings(dev)
    rows = []
    for name, T, p, label, r in compare_settings(args.presets, args.tokens, args.backends, settings, args.passes,
                                                 ceilings, dev):
        us, pct = r.median_ms * 1e3, r.roofline_pct  # NaN unless timed
        print(f"{name:14s} T={T:<5d} pass {p} {label:>12s} {r.backend:12s} {r.status:8s} {us:10.1f} us"
              f" {pct:5.1f}%" + (f"  ({r.reason})" if r.reason else ""), flush=True)
        rows.append(dict(preset=name, T=T, pass_=p, setting=label, backend=r.backend, status=r.status,
                         median_us=round(us, 2), pct=round(pct, 1), rel_err=r.rel_err, reason=r.reason or ""))
    print("autotuner choices (every setting of the run; the key names the flags that differ):")
    for line in grouped_gemm.autotune_report() + int4_gemm.autotune_report():
        print("  " + line)
    if args.out and rows:
        print(f"wrote {write_csv(Path(args.out) / f'{args.name}.csv', rows)}")


if __name__ == "__main__":
    main()
