#!/usr/bin/env python3
"""GPU experiment: decode (and prefill) variants of the Triton W4A16 MoE kernel (moe_tut.kernels.int4_gemm).

Each variant is a kernel switch set (int4_gemm.Int4Variant: magic / post_scale / split / programs per SM)
plus pinned tile configs for GEMM1 and GEMM2 (no autotuning, to keep the compile count low), so the
winner becomes the default in one line (int4_gemm.DECODE_VARIANT and DECODE_CONFIGS). "v0-auto" is
the current default (autotuned decode tiles, no switches), "v0-fixed" the same kernel on one fixed tile.

For each (preset, T): bf16 `triton` (the speedup's denominator, timed in this run), then each
variant: first call (compile), relative error vs the float32 reference on the dequantised weights
(int4_moe_reference; > 2e-2: reported, not timed), then time_cuda (cold L2; CUDA-graph replay for
T <= 64), plan prebuilt outside the timed call. Columns: ms, packed GB/s (packed codes of the touched
experts / ms; scales add ~3%), GB/s of codes + scales, % of the copy bandwidth measured at the start
of this run, speedup vs bf16 triton.

Usage (decode ~3-4 min on an H100, most of it compiles; prefill adds ~1 min):
    python scripts/gpu_triton_int4_tune.py
    python scripts/gpu_triton_int4_tune.py --phases decode --presets mixtral --tokens 1 --variants v0-fixed pms
    python scripts/gpu_triton_int4_tune.py --smoke      # CPU interpreter, tiny shapes: checks the script only
Writes triton_int4_tune.csv under $OUT (or --out). Progress is printed (flushed) row by row.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset, relative_error, simulate_routing
from moe_tut.bench.ceilings import measure_copy_gbps
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cpu, time_cuda
from moe_tut.kernels import int4_gemm as ig
from moe_tut.kernels.grouped_gemm import TileConfig
from moe_tut.presets import custom

TOL = 2e-2
GRAPH_MAX_TOKENS = 64
DEVICE = "cuda"
V = ig.Int4Variant
PMS = V(magic=True, post_scale=True, split=True)


def tc(text: str) -> TileConfig:
    return TileConfig.parse(text)


D64 = "16,64,128,8,4,4"
# name: (switches, GEMM1 tile, GEMM2 tile, prediction); tile None = the autotuner over the regime's list
DECODE_VARIANTS = {
    "v0-auto": (V(), None, None, "v0 as shipped: mixtral T=1 ~0.227 ms (I2F + F2F conversions bound)"),
    "v0-fixed": (V(), D64, D64, "= v0-auto +-5% (the conversions, not the tile, bound it)"),
    "magic": (V(magic=True), D64, D64, "-20-25%: I2F gone, F2FP + 2 extra FADD/LOP3 per value stay"),
    "post": (V(post_scale=True), D64, D64, "-30%: F2F and float math gone, I2F stays (1/value, quarter rate)"),
    "magic-post": (V(magic=True, post_scale=True), D64, D64, "~-50%: no conversions left, int ops bound"),
    "pms": (PMS, D64, D64, "best: mixtral T=1 ~0.11-0.13 ms (ALU model ~0.10; 50-55% of copy, 2-2.3x bf16)"),
    "pms-g2n32": (PMS, D64, "16,32,128,8,4,4", "mixtral T=1 GEMM2 (4096 cols x 2 experts) gets 256 tiles, not 128"),
    "pms-n32": (PMS, "16,32,128,8,4,4", "16,32,128,8,4,4", "= pms or slightly worse (mma.sync, more tiles)"),
    "pms-n128w8": (PMS, "16,128,128,8,8,4", "16,128,128,8,8,4", "worse at mixtral T=1 (G2 64 tiles), ok elsewhere"),
    "pms-s6": (PMS, "16,64,128,8,4,6", "16,64,128,8,4,6", "+0-10% over pms: more bytes in flight per program"),
    "pms-k64s8": (PMS, "16,64,64,8,4,8", "16,64,64,8,4,8", "= pms-s6 (same bytes in flight, more loop overhead)"),
    "pms-ppsm8": (V(magic=True, post_scale=True, split=True, programs_per_sm=8), D64, D64,
                  "+0-10%: more programs per SM where tiles allow (deepseek-v3, T=16)"),
    "pms-ppsm64": (V(magic=True, post_scale=True, split=True, programs_per_sm=64), D64, D64,
                   "one program per tile: better balance at mixtral T=1 G2, +-5% elsewhere"),
    # session 3 (predictions written before the run; GEMM-by-GEMM probe: scripts/gpu_int4_probe.py)
    "pms-s1": (V(magic=True, post_scale=True, split=True, split_k=1, programs_per_sm=64), D64, D64,
               "= the previous default (pms-ppsm64): 0.193 ms at mixtral T=1"),
    "auto": (V(magic=True, post_scale=True, split=True, programs_per_sm=64), D64, D64,
             "split-K by decode_split_k (mixtral T=1: 4 and 8 slices): 0.11-0.13 ms at mixtral T=1"),
    "auto-asm": (V(magic=True, post_scale=True, split=True, asm=True, programs_per_sm=64), D64, D64,
                 "auto -0-8% (asm helped GEMM1 2-15% in the probe)"),
    "s2": (V(magic=True, post_scale=True, split=True, split_k=2, programs_per_sm=64), D64, D64, "between"),
    "s4": (V(magic=True, post_scale=True, split=True, split_k=4, programs_per_sm=64), D64, D64, "near auto"),
    "s8": (V(magic=True, post_scale=True, split=True, split_k=8, programs_per_sm=64), D64, D64,
           "= auto at T=1; worse at T=16 (partial sums: 8 x [rows, 2F] float32)"),
}
PREFILL_VARIANTS = {
    "default": (ig.PREFILL_VARIANT, None, None, "the shipped prefill path (switches and autotuned tiles)"),
    "v0-auto": (V(), None, None, "v0: mixtral T=8192 ~19.6 ms"),
    "v0-fixed": (V(), "128,64,128,8,8,3", "128,128,128,8,8,3", "= v0-auto (its choices at T=8192)"),
    "magic": (V(magic=True), "128,64,128,8,8,3", "128,128,128,8,8,3", "-20-30% if dequant-bound (I2F gone)"),
    "magic-split": (V(magic=True, split=True), "128,64,128,8,8,3", "128,128,128,8,8,3",
                    "= magic +-5% (interleave shuffle gone, A split added)"),
    "pms": (PMS, "128,64,128,8,8,3", "128,128,128,8,8,3",
            "worse than magic: the per-step [BN,BM] scale FMAs cost ~2 FMA per weight value at BM=128"),
    # session 6: ncu had the v0 prefill kernels latency-bound (one 8-warp program per SM at 255 registers, 39% of
    # issue slots); ptxas (sm_90) says GEMM2's 128x128x128 tile spills 360 B. Runs 1-2 also timed `wb` (weights as
    # the dot's right operand, commit 4e4ef58): slower at every tile (16.7-23.5 ms), so the switch was removed.
    "v0-g2n64": (V(), "128,64,128,8,8,3", "128,64,128,8,8,3",
                 "GEMM2 on a tile that does not spill (248 regs): GEMM2 5.8 -> ~5 ms, forward -4%"),
    "w16": (V(), "128,64,128,8,16,3", "128,128,64,8,16,3",
            "16 warps (4 per scheduler) at <= 128 regs: -10% if latency-bound; worse if its spills (120-176 B) bite"),
    # session 6, second run (first: v0-fixed 19.62, wb 20.94, wb-bm256 16.94 ms, the rest slower): 256-row tiles
    "bm256": (V(), "256,64,64,8,8,3", "256,128,64,8,8,3", "spills 168 / 248 B: slower than wb-bm256 (16.9 ms)"),
    # third run (second: bm256 13.77 ms mixtral / 19.99 deepseek-v3, every wb variant 16.7-23.5): around bm256
    "bm256-g2n64": (V(), "256,64,64,8,8,3", "256,64,64,8,8,3", "GEMM2 without spills (232 regs): +-5% of bm256"),
    "bm256-g2k128": (V(), "256,64,64,8,8,3", "256,64,128,8,8,2", "GEMM2 BN64 BK128, no spills: +-5% of bm256"),
    "bm256-g2k32": (V(), "256,64,64,8,8,3", "256,128,32,8,8,4", "GEMM2 BK32: shorter dequant chains, +-5%"),
    "bm256-g1k128": (V(), "256,64,128,8,8,2", "256,128,64,8,8,3", "GEMM1 half the K steps, 2 stages: +-5%"),
    "bm256-s4": (V(), "256,64,64,8,8,4", "256,128,64,8,8,4", "+-3% of bm256 (loads are not the limit)"),
    "bm256-magic": (V(magic=True), "256,64,64,8,8,3", "256,128,64,8,8,3", "-0-8% vs bm256 (I2F replaced)"),
    # fourth run (third: bm256 13.65 / 19.96 ms; GEMM2 BN 64 or BK 128 slower, s4 and magic equal). stack = GEMM1's
    # gate and up rows as one [2 BN, BK] tile and one dot: TTGIR warpsPerCTA [8, 1], wgmma n256, each warpgroup
    # its own 64 weight rows (bm256 GEMM1: [4, 2], both warpgroups convert both tiles); ptxas: 8 B spill, not 168
    "bm256-stack": (V(stack=True), "256,64,64,8,8,3", "256,128,64,8,8,3",
                    "GEMM1 -15-25% (no duplicated fragments, n256 wgmma): forward ~12 ms mixtral"),
    "bm256-stack-s4": (V(stack=True), "256,64,64,8,8,4", "256,128,64,8,8,4", "= bm256-stack"),
    "bm256-stack-magic": (V(stack=True, magic=True), "256,64,64,8,8,3", "256,128,64,8,8,3", "= bm256-stack +-3%"),
    "stack128": (V(stack=True), "128,64,128,8,8,3", "256,128,64,8,8,3", "128-row GEMM1 with stack: > bm256-stack"),
    "stack128-k64": (V(stack=True), "128,64,64,8,8,4", "256,128,64,8,8,3", "> bm256-stack"),
    # sixth run: ncu of the default (stack, 256-row tiles): issue-latency-bound (5.5-5.7 warp cycles per issued
    # instruction, 2 warps per scheduler; top stalls: fixed-latency waits, short scoreboard, barriers). packed
    # = the tile built by inline PTX (asm unpack + 2 fma.rn.bf16x2 per pair): GEMM2's K loop 337 -> 274 SASS
    # instructions per step, its 32 I2F (quarter rate) gone
    "stack-packed": (V(stack=True, packed=True), None, None, "-8-12% vs default (GEMM1 and GEMM2)"),
    "stack-packed-fixed": (V(stack=True, packed=True), "256,64,64,8,8,3", "256,128,64,8,8,3", "= stack-packed"),
}
FIELDS = ["phase", "preset", "T", "variant", "switches", "cfg1", "cfg2", "status", "rel_err", "ms", "p20_ms",
          "p80_ms", "timing", "packed_gbps", "gbps_with_scales", "pct_copy", "speedup_vs_bf16_triton",
          "bf16_triton_ms", "packed_gb", "active_experts", "first_call_s", "prediction", "note", "gpu", "torch",
          "triton", "copy_gbps"]


def log(*args):
    print(*args, flush=True)


def run_timed(fn, T, rep_ms):
    if DEVICE != "cuda":
        return time_cpu(fn, reps=1)
    return time_cuda(fn, use_graph=T <= GRAPH_MAX_TOKENS, warmup_ms=10, rep_ms=rep_ms)


def first_call(fn):
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return y, time.perf_counter() - t0


def make_weights(preset: str):
    cfg = custom(8, 256, 512, 2) if DEVICE != "cuda" else get_preset(preset)
    w = ExpertWeights.random(cfg, device=DEVICE)
    q = moe_tut.get_backend("triton_int4").prepare(w)
    return cfg, w, q


def bench_point(phase, preset, cfg, w, q, T, variants, meta, rows, rep_ms, copy_gbps, deadline):
    ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0, device=DEVICE)
    x = torch.randn(T, cfg.H, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    plan = RoutingPlan.build(ids, tw, cfg.E)
    ref = ig.int4_moe_reference(x, q, ids, tw)
    active = int((plan.expert_counts > 0).sum())
    packed_bytes = active * (q.w13.packed[0].numel() + q.w2.packed[0].numel())
    all_bytes = q.bytes_for(active)
    base = dict(phase=phase, preset=preset, T=T, active_experts=active, packed_gb=f"{packed_bytes / 1e9:.4f}",
                copy_gbps=f"{copy_gbps:.0f}", **meta)

    # bf16 triton, timed in this run: the speedup's denominator
    bf16_ms = math.nan
    row = dict(base, variant="bf16-triton", switches="", cfg1="default", cfg2="default")
    try:
        tri = moe_tut.get_backend("triton")
        y, t1 = first_call(lambda: tri(x, w, plan))
        err = relative_error(y, ref)  # vs the dequantised weights: quantisation error, info only
        t = run_timed(lambda: tri(x, w, plan), T, rep_ms)
        bf16_ms = t.median_ms
        row.update(status="ok", rel_err=f"{err:.2e}", ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}",
                   p80_ms=f"{t.p80_ms:.4f}", timing=t.method, first_call_s=f"{t1:.2f}",
                   note="rel_err vs the INT4 reference (quantisation error)")
    except Exception as exc:
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        traceback.print_exc(limit=3, file=sys.stdout)
    rows.append(row)
    log(f"{preset:<14}{T:>5}  {'bf16-triton':<12}{row.get('ms', row['status']):>9}")

    for name, (variant, c1, c2, prediction) in variants.items():
        if time.time() > deadline:
            log(f"  budget reached: skipping {name}")
            rows.append(dict(base, variant=name, status="skipped", note="time budget"))
            continue
        row = dict(base, variant=name, switches=variant.label(), cfg1=c1 or "autotune", cfg2=c2 or c1 or "autotune",
                   prediction=prediction)
        kw = dict(variant=variant, path=phase)
        if c1 is not None:
            kw.update(config=tc(c1), config2=tc(c2) if c2 else None)
        fn = lambda kw=kw: ig.moe_forward_triton_int4(x, q, plan, **kw)
        try:
            y, t1 = first_call(fn)
            err = relative_error(y, ref)
            row.update(rel_err=f"{err:.2e}", first_call_s=f"{t1:.2f}")
            if not err < TOL:
                row.update(status="FAILED", note=f"rel err {err:.3g} >= {TOL}: not timed")
            else:
                t = run_timed(fn, T, rep_ms)
                gbps = packed_bytes / (t.median_ms * 1e-3) / 1e9
                row.update(status="ok", ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}", p80_ms=f"{t.p80_ms:.4f}",
                           timing=t.method, packed_gbps=f"{gbps:.0f}",
                           gbps_with_scales=f"{all_bytes / (t.median_ms * 1e-3) / 1e9:.0f}",
                           pct_copy=f"{100 * gbps / copy_gbps:.1f}",
                           speedup_vs_bf16_triton=f"{bf16_ms / t.median_ms:.2f}", bf16_triton_ms=f"{bf16_ms:.4f}")
        except Exception as exc:  # one broken row must not end the run
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            traceback.print_exc(limit=3, file=sys.stdout)
        rows.append(row)
        log(f"{preset:<14}{T:>5}  {name:<12}{row.get('ms', row['status']):>9}{row.get('packed_gbps', ''):>7}"
            f"{row.get('pct_copy', ''):>6}{row.get('speedup_vs_bf16_triton', ''):>6}{row.get('rel_err', ''):>10}"
            f"{row.get('first_call_s', ''):>6}  {row['switches']} {row['cfg1']} / {row['cfg2']} {row.get('note', '')}")


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 128], help="decode T values")
    ap.add_argument("--prefill-tokens", nargs="+", type=int, default=[8192])
    ap.add_argument("--prefill-presets", nargs="+", default=["mixtral", "deepseek-v3"])
    ap.add_argument("--variants", nargs="+", default=None, help="subset of variant names (both phases)")
    ap.add_argument("--rep-ms", type=float, default=60.0)
    ap.add_argument("--budget-s", type=float, default=330.0, help="no new variant rows after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (script logic only)")
    args = ap.parse_args()
    if args.smoke or not torch.cuda.is_available():
        DEVICE = "cpu"
        args.presets, args.prefill_presets, args.tokens, args.prefill_tokens = ["tiny"], ["tiny"], [1], [64]
    start = time.time()
    deadline = start + args.budget_s
    meta = dict(gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__,
                triton=__import__("triton").__version__)
    copy_gbps = measure_copy_gbps(DEVICE, 1 << 30) if DEVICE == "cuda" else math.nan
    log(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {copy_gbps:.0f} GB/s")
    pick = lambda vs: {k: v for k, v in vs.items() if args.variants is None or k in args.variants}
    rows: list[dict] = []
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    log(f"{'preset':<14}{'T':>5}  {'variant':<12}{'ms':>9}{'GB/s':>7}{'%copy':>6}{'x bf16':>6}{'err':>10}{'1st s':>6}")
    presets = list(dict.fromkeys(args.presets + (args.prefill_presets if "prefill" in phases else [])))
    for preset in presets:
        try:
            cfg, w, q = make_weights(preset)
        except Exception as exc:
            log(f"{preset}: cannot make weights: {exc}")
            continue
        for phase in phases:
            if phase == "decode" and preset in args.presets:
                points, variants = args.tokens, pick(DECODE_VARIANTS)
            elif phase == "prefill" and preset in args.prefill_presets:
                points, variants = args.prefill_tokens, pick(PREFILL_VARIANTS)
            else:
                continue
            for T in points:
                try:
                    bench_point(phase, preset, cfg, w, q, T, variants, meta, rows, args.rep_ms, copy_gbps, deadline)
                except Exception as exc:
                    log(f"{preset} T={T} {phase}: setup failed: {type(exc).__name__}: {exc}")
                    traceback.print_exc(limit=3, file=sys.stdout)
        del w, q
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    log(f"\ndone in {time.time() - start:.0f} s")
    if args.out:
        log(f"wrote {write_csv(os.path.join(args.out, 'triton_int4_tune.csv'), rows, FIELDS)}")
        with open(os.path.join(args.out, "triton_int4_tune_autotune.txt"), "w") as f:
            f.write("\n".join(ig.autotune_report()) + "\n")


if __name__ == "__main__":
    main()
