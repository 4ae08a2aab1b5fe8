#!/usr/bin/env python3
"""GPU check and timing of the INT4 GEMV decode path (moe_tut.kernels.int4_gemv) against the tl.dot path.

(a) Correctness: the GEMV forward (default blocks) against the float32 reference on the dequantised weights
    (int4_moe_reference) on mixtral, deepseek-v3 and qwen3-30b-a3b at T = 1, 2, 4; relative error >= 2e-2 is
    printed as FAILED and the script exits with status 1 at the end. Every timed variant is checked the same
    way on its first call and not timed if it fails.
(b) Timing at T = 1, 2, 4, 8: bf16 `triton`, `triton_int4` as shipped (DECODE_VARIANT, tl.dot) and the GEMV
    path in a handful of block configs (BLOCK_N, BLOCK_K, warps; split-K forced or by rule; rows per program),
    each as the full forward with RoutingPlan.build inside the timed function (as the harness times it),
    replayed as a CUDA graph with a cold L2 (moe_tut.bench.timing.time_cuda). Columns: ms (median, p20, p80),
    GB/s and % of the copy bandwidth (measured at the start of this run) on the active experts' INT4 bytes
    (packed codes + scales: weights.nbytes / E * active experts), speedup vs bf16 triton, the resolved split-K
    and rows per program, first-call seconds (compiles).

Weights: random bf16 experts of the preset (mixtral 2.8 GB, deepseek-v3 22.5 GB, qwen3 1.2 GB in bf16), the
INT4 copy quantised on the GPU from them as scripts/gpu_triton_int4_tune.py does; one preset at a time.

Usage (about 3 minutes on an H100, most of it compiles; --budget-s stops starting new timed rows):
    python scripts/gpu_int4_gemv.py
    python scripts/gpu_int4_gemv.py --presets mixtral --tokens 1 --variants gemv gemv-s1
    python scripts/gpu_int4_gemv.py --smoke     # CPU interpreter, `debug` preset, T = 1: checks the script only
Writes int4_gemv.csv under --out (default $OUT). Progress is printed (flushed) row by row.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import replace

import torch

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset, relative_error, simulate_routing
from moe_tut.bench.ceilings import measure_copy_gbps
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cpu, time_cuda
from moe_tut.kernels import int4_gemv as gv
from moe_tut.quant import int4_moe_reference

TOL = 2e-2
DEVICE = "cuda"
# name: (GEMM1 config, GEMM2 config, forward kwargs, smallest T, prediction written before the first GPU run).
# Config None = the module default (GEMM1 n32k128w4, GEMM2 n64k128w4); split-K by gv.gemv_split_k unless forced.
CANDIDATE_PREDICTIONS = {
    "n32k128w4": "= gemv +-5% (GEMM2 4.2 instr/value instead of 3.8)",
    "n64k128w4": "= gemv +-5% (GEMM1 3.6 instr/value, but 96 registers: 5 programs/SM)",
    "n16k128w2": "+0-10% vs gemv (twice the programs, same loop)",
    "n64k128w8": "= gemv-n64k128w4 +-5%",
    "n128k128w8": "worse where programs < 4/SM before split-K",
}
VARIANTS = {
    "gemv": (None, None, {}, 1, "mixtral T=1 0.08-0.10 ms (>= 60% of copy, >= 2.5x bf16): ~3.8 SASS instr/value, "
                                "9 programs/SM, loop issue ~50 us + streaming ~60 us overlapped + 4 launches"),
    **{f"gemv-{c.label()}": (c, c, {}, 1, CANDIDATE_PREDICTIONS.get(c.label(), "")) for c in gv.CANDIDATE_CONFIGS},
    "gemv-s1": (None, None, dict(split_k=1), 1, "mixtral T=1 +20-40% (GEMM2: 128 programs for 132 SMs)"),
    "gemv-s2": (None, None, dict(split_k=2), 1, "between gemv-s1 and gemv at mixtral T=1; = gemv elsewhere"),
    "gemv-rows2": (None, None, dict(rows=2), 2, "worse than gemv (rows=1) unless experts get 2+ rows: +33% instr"),
    # session 6: ncu at mixtral T=1 (results/h100/int4_gemv_ncu_v1): GEMM1 85 us at 43% of DRAM peak, 15.5 stall
    # cycles on long scoreboard per instruction (cuda_int4 v2: 55 us, 67%, 2.4), 896 programs (6.8 per SM, up to 9
    # fit): too few loads in flight. GEMM1 split-K gives it more programs (GEMM2, already split 8, unchanged)
    **{f"gemv-g1s{s}": (replace(gv.DEFAULT_GEMM1_CONFIG, split_k=s), None, {}, 1,
                        "GEMM1 85 -> ~65-70 us at mixtral T=1 (up to 9 programs resident per SM, not 6.8)")
       for s in (2, 4, 8)},
    # session 8: more weight rows per thread for the same words (BLOCK_N 128 or 256 at 4 warps: 4 or 8 rows per
    # thread), so each thread's 8 activation loads per step serve 4-8 rows instead of 1-2; fewer programs, so K
    # is split further. Prediction: GEMM1 65 -> ~52 us at mixtral T=1, forward ~0.110 -> ~0.097 ms.
    **{f"gemv-g1n{n}" + (f"s{s}" if s else ""): (gv.GemvConfig(n, 128, 4, s), None, {}, 1,
                            "mixtral T=1 ~0.097 ms (GEMM1's activation loads shared by 4-8 rows per thread)")
       for n, s in ((128, 0), (128, 4), (256, 4), (256, 8))},
    **{f"gemv-g2n{n}": (None, gv.GemvConfig(n, 128, 4), {}, 1, "GEMM2 -2-4 us at mixtral T=1") for n in (128, 256)},
    "gemv-n128": (gv.GemvConfig(128, 128, 4), gv.GemvConfig(128, 128, 4), {}, 1, "the two above together"),
    # session 12: the K loop's loads software-pipelined by Triton (tl.range num_stages: cp.async into shared memory,
    # stages - 1 steps in flight ahead of the one computed; sm_90 code: GEMM1 299 instead of 246 SASS instructions
    # per step, 71 registers at 3 stages, 55 at 2). The SASS of the unpipelined loop issues a step's weight loads and
    # then waits on them before its first FFMA, so each program has one step of weights in flight. (Configs spelt
    # out: the module defaults became GEMM1 16,128,2 stages 3 after this run.)
    **{f"gemv-st{st}": (gv.GemvConfig(32, 128, 4, stages=st), gv.GemvConfig(64, 128, 4, stages=st), {}, 1, pred)
       for st, pred in ((2, "mixtral T=1 105 -> ~95 us (two steps in flight per program, 9 programs per SM)"),
                        (3, "mixtral T=1 105 -> ~90 us (three in flight; 7 programs per SM by registers)"),
                        (4, "= st3 +-3% (more in flight, same registers, 14 KB shared per program)"))},
    "gemv-g1st3": (gv.GemvConfig(32, 128, 4, stages=3), gv.GemvConfig(64, 128, 4), {}, 1,
                   "GEMM1 ~-10 us at mixtral T=1"),
    "gemv-g2st3": (gv.GemvConfig(32, 128, 4), gv.GemvConfig(64, 128, 4, stages=3), {}, 1,
                   "GEMM2 ~-5 us at mixtral T=1"),
    "gemv-st3-g1n16w2": (gv.GemvConfig(16, 128, 2, stages=3), gv.GemvConfig(64, 128, 4, stages=3), {}, 1,
                         "= gemv-st3 +-5%"),
    "gemv-st3-g2n32": (gv.GemvConfig(32, 128, 4, stages=3), gv.GemvConfig(32, 128, 4, stages=3), {}, 1,
                       "= gemv-st3 +-5%"),
}
FIELDS = ["preset", "T", "backend", "variant", "cfg1", "cfg2", "split1", "split2", "rows", "status", "rel_err", "ms",
          "p20_ms", "p80_ms", "timing", "int4_gb", "gbps", "pct_copy", "speedup_vs_bf16_triton", "bf16_triton_ms",
          "active_experts", "first_call_s", "prediction", "note", "gpu", "torch", "triton", "copy_gbps"]


def log(*args):
    print(*args, flush=True)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_timed(fn, rep_ms):
    if DEVICE != "cuda":
        return time_cpu(fn, reps=1)
    return time_cuda(fn, use_graph=True, warmup_ms=10, rep_ms=rep_ms)


def make_weights(preset: str):
    cfg = get_preset(preset)
    w = ExpertWeights.random(cfg, device=DEVICE)
    q = moe_tut.get_backend("triton_int4").prepare(w)
    return cfg, w, q


def make_inputs(cfg, T: int):
    ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0, device=DEVICE)
    x = torch.randn(T, cfg.H, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    return x, ids, tw


def check_gemv(preset, cfg, q, T, rows_out, meta) -> bool:
    """(a): the default GEMV forward against the reference; False (and a loud line) if it is wrong."""
    x, ids, tw = make_inputs(cfg, T)
    plan = RoutingPlan.build(ids, tw, cfg.E)
    t0 = time.perf_counter()
    y = gv.moe_forward_int4_gemv(x, q, plan)
    sync()
    first = time.perf_counter() - t0
    err = relative_error(y, int4_moe_reference(x, q, ids, tw))
    ok = err < TOL
    rows_out.append(dict(preset=preset, T=T, backend="check", variant="gemv", status="ok" if ok else "FAILED",
                         rel_err=f"{err:.2e}", first_call_s=f"{first:.2f}", **meta))
    verdict = "ok" if ok else f"*** FAILED *** (>= {TOL:g})"
    log(f"check {preset:<14} T={T}: rel err {err:.2e} {verdict}")
    return ok


def bench_point(preset, cfg, w, q, T, variants, meta, rows_out, rep_ms, copy_gbps, deadline) -> bool:
    """(b): one (preset, T): bf16 triton, triton_int4, then the GEMV variants. False if a variant was wrong."""
    x, ids, tw = make_inputs(cfg, T)
    E = cfg.E
    plan = RoutingPlan.build(ids, tw, E)
    ref = int4_moe_reference(x, q, ids, tw)
    active = int((plan.expert_counts > 0).sum())
    int4_bytes = q.bytes_for(active)  # packed codes + scales of the touched experts
    base = dict(preset=preset, T=T, active_experts=active, int4_gb=f"{int4_bytes / 1e9:.4f}",
                copy_gbps=f"{copy_gbps:.0f}", **meta)
    all_ok = True
    bf16_ms = math.nan

    def timed_row(backend, name, forward, cfg1="", cfg2="", info=None, prediction=""):
        """forward(plan) -> y; checked with a prebuilt plan, timed with the plan built inside."""
        nonlocal bf16_ms, all_ok
        row = dict(base, backend=backend, variant=name, cfg1=cfg1, cfg2=cfg2, prediction=prediction, **(info or {}))
        if time.time() > deadline:
            row.update(status="skipped", note="time budget")
            rows_out.append(row)
            log(f"{preset:<14}{T:>3}  {name:<18} skipped (time budget)")
            return
        try:
            t0 = time.perf_counter()
            y = forward(plan)
            sync()
            row["first_call_s"] = f"{time.perf_counter() - t0:.2f}"
            err = relative_error(y, ref)
            row["rel_err"] = f"{err:.2e}"
            if backend != "triton" and not err < TOL:  # bf16: the quantisation error, reported only
                row.update(status="FAILED", note=f"rel err {err:.3g} >= {TOL}: not timed")
                all_ok = False
            else:
                t = run_timed(lambda: forward(RoutingPlan.build(ids, tw, E, validate=False)), rep_ms)
                gbps = int4_bytes / (t.median_ms * 1e-3) / 1e9
                row.update(status="ok", ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}", p80_ms=f"{t.p80_ms:.4f}",
                           timing=t.method)
                if backend == "triton":
                    bf16_ms = t.median_ms
                    row["note"] = "rel_err vs the INT4 reference: the quantisation error"
                else:
                    row.update(gbps=f"{gbps:.0f}", pct_copy=f"{100 * gbps / copy_gbps:.1f}",
                               speedup_vs_bf16_triton=f"{bf16_ms / t.median_ms:.2f}", bf16_triton_ms=f"{bf16_ms:.4f}")
        except Exception as exc:  # one broken row must not end the run
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            traceback.print_exc(limit=3, file=sys.stdout)
            all_ok = all_ok and backend == "triton"
        rows_out.append(row)
        log(f"{preset:<14}{T:>3}  {name:<18}{row.get('ms', row['status']):>9}{row.get('pct_copy', ''):>7}"
            f"{row.get('speedup_vs_bf16_triton', ''):>7}{row.get('rel_err', ''):>10}{row.get('first_call_s', ''):>7}"
            f"  {cfg1} {cfg2} {row.get('split1', '')}/{row.get('split2', '')} {row.get('note', '')}")

    tri, int4 = moe_tut.get_backend("triton"), moe_tut.get_backend("triton_int4")
    timed_row("triton", "bf16-triton", lambda p: tri(x, w, p))
    timed_row("triton_int4", "int4-default", lambda p: int4(x, q, p))
    d1, d2 = gv.default_configs(torch.device(DEVICE))
    for name, (c1, c2, kw, min_t, prediction) in variants.items():
        if T < min_t:
            continue
        c1, c2 = c1 or d1, c2 or d2
        rows = kw.get("rows") or gv.rows_per_block(T, cfg.top_k, E)
        r1 = replace(c1, split_k=kw["split_k"]) if kw.get("split_k") else c1
        r2 = replace(c2, split_k=kw["split_k"]) if kw.get("split_k") else c2
        f1, f2, s1, s2 = gv.plan_splits(q, plan, rows, r1, r2, torch.device(DEVICE))
        info = dict(split1=s1, split2=s2, rows=rows)
        timed_row("gemv", name, lambda p, c1=c1, c2=c2, kw=kw: gv.moe_forward_int4_gemv(x, q, p, config=c1,
                                                                                       config2=c2, **kw),
                  f1.label(), f2.label(), info, prediction)
    return all_ok


def print_table(rows):
    log(f"\n{'preset':<14}{'T':>3}  {'variant':<18}{'ms':>9}{'%copy':>7}{'x bf16':>7}{'split':>7}{'rows':>5}"
        f"{'err':>10}  cfg1 / cfg2")
    for r in rows:
        if r["backend"] == "check":
            continue
        split = f"{r.get('split1', '')}/{r.get('split2', '')}" if r.get("split1") else ""
        log(f"{r['preset']:<14}{r['T']:>3}  {r['variant']:<18}{r.get('ms', r['status']):>9}{r.get('pct_copy', ''):>7}"
            f"{r.get('speedup_vs_bf16_triton', ''):>7}{split:>7}{r.get('rows', ''):>5}{r.get('rel_err', ''):>10}"
            f"  {r.get('cfg1', '')} / {r.get('cfg2', '')}")


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 4, 8], help="T values to time")
    ap.add_argument("--check-tokens", nargs="+", type=int, default=[1, 2, 4], help="T values of the check (a)")
    ap.add_argument("--variants", nargs="+", default=None, help=f"subset of {', '.join(VARIANTS)}")
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--budget-s", type=float, default=190.0,
                    help="no new timed row after this many seconds (shared out among the presets; checks always run)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, `debug` preset, T = 1 (script logic only)")
    args = ap.parse_args()
    if args.smoke or not torch.cuda.is_available():
        DEVICE = "cpu"
        args.presets, args.tokens, args.check_tokens = ["debug"], [1], [1]
        if args.variants is None:
            args.variants = ["gemv", "gemv-s2"]
    unknown = set(args.variants or ()) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    variants = {k: v for k, v in VARIANTS.items() if args.variants is None or k in args.variants}
    start = time.time()
    meta = dict(gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
                torch=torch.__version__, triton=__import__("triton").__version__)
    copy_gbps = measure_copy_gbps(DEVICE, 1 << 30) if DEVICE == "cuda" else math.nan
    log(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}; copy bandwidth {copy_gbps:.0f} GB/s")
    if DEVICE == "cpu":
        log("CPU run: interpreter correctness only; the times below are not GPU performance")
    rows: list[dict] = []
    failed = []
    try:
        for i, preset in enumerate(args.presets):
            t0 = time.time()
            # this preset's share of what is left of the budget, so that a slow preset cannot starve the next
            deadline = t0 + (start + args.budget_s - t0) / (len(args.presets) - i)
            try:
                cfg, w, q = make_weights(preset)
            except Exception as exc:
                log(f"{preset}: cannot make weights: {type(exc).__name__}: {exc}")
                failed.append(f"{preset}: weights")
                continue
            log(f"{preset}: E={cfg.E} H={cfg.H} F={cfg.F} k={cfg.top_k}, weights in {time.time() - t0:.1f} s "
                f"({q.describe_compression()})")
            for T in args.check_tokens:
                if not check_gemv(preset, cfg, q, T, rows, meta):
                    failed.append(f"{preset} T={T} check")
            log(f"{'preset':<14}{'T':>3}  {'variant':<18}{'ms':>9}{'%copy':>7}{'x bf16':>7}{'err':>10}{'1st s':>7}")
            for T in args.tokens:
                try:
                    if not bench_point(preset, cfg, w, q, T, variants, meta, rows, args.rep_ms, copy_gbps, deadline):
                        failed.append(f"{preset} T={T} timing rows")
                except Exception as exc:
                    log(f"{preset} T={T}: setup failed: {type(exc).__name__}: {exc}")
                    traceback.print_exc(limit=3, file=sys.stdout)
                    failed.append(f"{preset} T={T} setup")
            del w, q
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    finally:
        print_table(rows)
        log(f"\ndone in {time.time() - start:.0f} s")
        if args.out:
            path = write_csv(os.path.join(args.out, "int4_gemv.csv"), rows, FIELDS)
            with open(os.path.join(args.out, "int4_gemv_command.txt"), "w") as f:
                f.write(" ".join([sys.executable, *sys.argv]) + "\n")
            log(f"wrote {path}")
    if failed:
        log("\n*** GEMV CHECK FAILED: " + "; ".join(failed) + " ***")
        sys.exit(1)


if __name__ == "__main__":
    main()
