#!/usr/bin/env python3
"""GPU experiment: the two GEMMs of the prefill forward timed one by one, bf16 `triton` vs INT4 variants.

The forward-level numbers of scripts/gpu_triton_int4_tune.py say how far INT4 prefill is from the bf16 kernel
(issue 4: <= 1.25x at T = 8192); this says which GEMM the gap is in. For each preset: GEMM1 (gather, w13,
SwiGLU) and GEMM2 (w2, routing weight, scatter) of the bf16 fast path (its autotuned configs), then of each INT4
variant given as NAME=SWITCHES/CFG1/CFG2 (switches as MOE_TUT_TRITON_INT4_VARIANT; "v0" for none; CFG as
"BM,BN,BK,GROUP_M,warps,stages" or "auto" for the autotuner). Each GEMM is checked against the same GEMM of
int4_moe_reference's math first (relative error; > 2e-2 is reported and not timed), then timed with time_cuda
(cold L2, CUDA events), plan prebuilt. Writes prefill_gemms.csv under $OUT (or --out).

Usage:
    python scripts/gpu_int4_prefill_gemms.py --presets mixtral deepseek-v3 \\
        --variants stack=stack/256,64,64,8,8,3/256,128,64,8,8,3
    python scripts/gpu_int4_prefill_gemms.py --smoke   # CPU interpreter, tiny shapes: the script's logic only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset, relative_error
from moe_tut.bench.harness import make_inputs
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cpu, time_cuda
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.kernels import int4_gemm as ig
from moe_tut.presets import custom

TOL = 2e-2
FIELDS = ["preset", "T", "kernel", "gemm", "switches", "config", "status", "rel_err", "ms", "p20_ms", "p80_ms",
          "tflops", "ratio_vs_bf16", "gpu", "torch", "triton", "commit"]


def parse_variant(text: str):
    name, rest = text.split("=", 1)
    switches, c1, c2 = rest.split("/")
    cfg = [None if c == "auto" else ig.TileConfig.parse(c) for c in (c1, c2)]
    return name, ig.Int4Variant.parse(switches), cfg[0], cfg[1]


def bf16_gemm(gemm, x, w, act, plan):
    """One GEMM of the bf16 fast path (its autotuned configs) as a callable."""
    rows = plan.num_rows
    if gemm == 1:
        return lambda: gg.grouped_gemm(x, w.w13, plan, gg._alloc((rows, w.ffn_size), x), gather_rows=True,
                                       swiglu=True)
    return lambda: gg.grouped_gemm(act, w.w2, plan, gg._alloc((rows, w.hidden_size), x), scale_rows=True,
                                   scatter_rows=True)


def int4_gemm(gemm, x, q, act, plan, config, configs, variant):
    """One GEMM of the INT4 forward as a callable (a pinned config, or the autotuner over configs)."""
    rows = plan.num_rows
    if gemm == 1:
        return lambda: ig.int4_grouped_gemm(x, q.w13, plan, gg._alloc((rows, q.ffn_size), x), gather_rows=True,
                                            swiglu=True, config=config, configs=configs, variant=variant)
    return lambda: ig.int4_grouped_gemm(act, q.w2, plan, gg._alloc((rows, q.hidden_size), x), scale_rows=True,
                                        scatter_rows=True, config=config, configs=configs, variant=variant)


def timed(fn, device):
    if device != "cuda":
        return time_cpu(fn, reps=1)
    return time_cuda(fn, warmup_ms=10, rep_ms=80)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=["v0=v0/auto/auto"])
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    import triton

    meta = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                triton=triton.__version__, commit=os.environ.get("MOE_TUT_GIT_COMMIT", ""))
    variants = [parse_variant(v) for v in args.variants]
    rows_out = []
    print(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    for preset in args.presets:
        cfg = custom(8, 256, 512, 2) if args.smoke else get_preset(preset)
        T = 64 if args.smoke else args.tokens
        w = ExpertWeights.random(cfg, device=device)
        q = moe_tut.get_backend("triton_int4").prepare(w)
        deq = ig.dequantized_weights(q)
        x, ids, tw = make_inputs(cfg, T, "uniform", device)
        plan = RoutingPlan.build(ids, tw, cfg.E)
        rows, F, H = plan.num_rows, cfg.F, cfg.H
        flops = {1: 2.0 * rows * 2 * F * H, 2: 2.0 * rows * F * H}
        # References of each GEMM on the dequantised weights (bf16 kernel, so the same math as the INT4 one)
        act_ref = gg.grouped_gemm(x, deq.w13, plan, gg._alloc((rows, F), x), gather_rows=True, swiglu=True)
        out_ref = gg.grouped_gemm(act_ref, deq.w2, plan, gg._alloc((rows, H), x), scale_rows=True,
                                  scatter_rows=True)
        base = dict(preset=preset, T=T, **meta)
        bf16_ms = {}
        for gemm in (1, 2):
            fn = bf16_gemm(gemm, x, w, act_ref, plan)
            fn()
            t = timed(fn, device)
            bf16_ms[gemm] = t.median_ms
            rows_out.append(dict(base, kernel="bf16-triton", gemm=gemm, config="auto", status="ok",
                                 ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}", p80_ms=f"{t.p80_ms:.4f}",
                                 tflops=f"{flops[gemm] / t.median_ms / 1e9:.1f}"))
            print(f"{preset:<13} GEMM{gemm} bf16-triton      {t.median_ms:9.4f} ms", flush=True)
        for name, variant, c1, c2 in variants:
            for gemm, c in ((1, c1), (2, c2)):
                configs = None
                if device != "cuda":
                    c = ig.adapt_to_group(ig.INTERPRETER_CONFIG, 128)
                elif c is None:  # the autotuner over the forward's list for this GEMM
                    configs = ig.fast_path_configs(x, q, plan, "prefill")[gemm]
                fn = int4_gemm(gemm, x, q, act_ref, plan, c, configs, variant)
                ref = act_ref if gemm == 1 else out_ref
                row = dict(base, kernel=name, gemm=gemm, switches=variant.label(), config=str(c or "auto"))
                try:
                    err = relative_error(fn(), ref.float())
                    row.update(rel_err=f"{err:.2e}")
                    if not err < TOL:
                        row.update(status="FAILED")
                    else:
                        t = timed(fn, device)
                        row.update(status="ok", ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}",
                                   p80_ms=f"{t.p80_ms:.4f}", tflops=f"{flops[gemm] / t.median_ms / 1e9:.1f}",
                                   ratio_vs_bf16=f"{t.median_ms / bf16_ms[gemm]:.3f}")
                except Exception as exc:  # one broken row must not end the run
                    row.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                rows_out.append(row)
                print(f"{preset:<13} GEMM{gemm} {name:<16} {row.get('ms', row['status']):>9} ms  "
                      f"x{row.get('ratio_vs_bf16', '-')}  err {row.get('rel_err', '-')}  {row['config']}", flush=True)
    if args.out:
        print("wrote", write_csv(os.path.join(args.out, "prefill_gemms.csv"), rows_out, FIELDS))


if __name__ == "__main__":
    main()
