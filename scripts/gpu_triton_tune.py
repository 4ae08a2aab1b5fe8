#!/usr/bin/env python3
"""GPU experiment: variants of the Triton fast path (moe_tut.kernels.grouped_gemm) on the issue-3 presets.

Each variant is a set of the kernel's environment switches, read at call time:
    MOE_TUT_TRITON_CONFIG   "BM,BN,BK,GROUP_M,warps,stages" pins GEMM1's (and GEMM2's) tile config
    MOE_TUT_TRITON_CONFIG2  pins GEMM2's tile config alone
    MOE_TUT_TRITON_TMA      1: weights (and GEMM2's sorted A) through TMA tensor descriptors (sm_90+)
    MOE_TUT_TRITON_LOOP     flatten / ws: tl.range options of the persistent tile loop
so a winner becomes the default with a one-line change in grouped_gemm.py (USE_TMA_DEFAULT, the
config lists, DECODE_MAX_ROWS_PER_EXPERT). Configs are pinned (no autotuning) to keep the compile
count low; the "v0" variant pins what the v0 autotuner chose on the H100 (results/h100/triton_v0).

For each (preset, T): float32 reference, torch grouped_mm (the bar), then each variant: first call
(compile), relative error (> 2e-2: reported, not timed), then time_cuda (cold L2; CUDA-graph replay
for T <= 64). Timed unit: moe_forward_triton(x, w, plan) with the plan prebuilt; RoutingPlan.build
is timed on its own (plan_ms), since the harness times build + forward. At T = 8192 each variant
also gets GEMM1 / GEMM2 / sum-over-k times on their own.
Efficiency = roofline bound / measured, bound = max(2*T*k*3*H*F / 780 TFLOP/s,
touched-expert weight bytes / 3020 GB/s) (the ceilings measured on the H100 of results/h100).

A time budget (--budget-s) stops starting new rows; what was skipped is printed. Phases run in
order: prefill (T >= 1024), then decode / mid (T <= 128), one preset's weights at a time.

Usage:
    python scripts/gpu_triton_tune.py                   # everything, ~7 min on an H100
    python scripts/gpu_triton_tune.py --phases decode --presets qwen3-30b-a3b --tokens 1 128
Writes triton_tune.csv under $OUT (or --out).
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
from moe_tut import ExpertWeights, RoutingPlan, get_preset, moe_reference, relative_error, simulate_routing
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cpu, time_cuda
from moe_tut.env import environment
from moe_tut.kernels import grouped_gemm as gg

TOL = 2e-2
PEAK_TFLOPS = 780.0
PEAK_GBPS = 3020.0
GRAPH_MAX_TOKENS = 64
DEVICE = "cuda"  # --smoke: "cpu" (the interpreter; checks the script's logic, the times mean nothing)
ENV_KEYS = (gg.CONFIG_ENV, gg.CONFIG2_ENV, gg.TMA_ENV, gg.LOOP_ENV, gg.DECODE_ENV)
PRESETS = "mixtral,deepseek,deepseek-v3,qwen3-30b-a3b,glm-4.5"
FIELDS = ["phase", "preset", "T", "variant", "status", "rel_err", "ms", "p20_ms", "p80_ms", "timing",
          "tflops", "gbps", "eff_pct", "vs_gmm", "gmm_ms", "bound_ms", "plan_ms", "gemm1_ms", "gemm2_ms",
          "sum_ms", "first_call_s", "env", "note", "gpu", "torch", "triton"]

# Tile configs "BM,BN,BK,GROUP_M,warps,stages"
BIG1, BIG2 = "128,128,64,8,8,3", "128,256,64,8,8,3"  # v0's autotuner at >= 64 rows per expert
MID1, MID2 = "64,64,64,8,4,4", "64,128,64,8,4,4"  # v0's picks at 32-64 rows per expert (some roles)


def v0_prefill(preset: str, T: int) -> dict:
    """What the v0 autotuner chose (results/h100/triton_v0/triton_autotune.txt)."""
    c1, c2 = BIG1, BIG2
    if preset == "deepseek-v3" and T <= 1024:
        c1 = MID1
    if preset == "qwen3-30b-a3b" and T <= 1024:
        c2 = MID2
    return {gg.CONFIG_ENV: c1, gg.CONFIG2_ENV: c2}


def prefill_variants(preset: str, T: int) -> list[tuple[str, dict]]:
    """(name, env) for T >= 1024. Predictions in results/h100/LOG.md."""
    v0 = v0_prefill(preset, T)
    tma = {gg.TMA_ENV: "1"}
    return [
        ("v0", v0),
        ("tma", {**v0, **tma}),
        ("tma-s4", {**tma, gg.CONFIG_ENV: "128,128,64,8,8,4", gg.CONFIG2_ENV: "128,256,64,8,8,4"}),
        ("tma-bm256", {**tma, gg.CONFIG_ENV: "256,64,64,8,8,3", gg.CONFIG2_ENV: "256,128,64,8,8,3"}),
        ("tma-bm64", {**tma, gg.CONFIG_ENV: "64,128,64,8,4,4", gg.CONFIG2_ENV: "64,256,64,8,4,4"}),
        ("tma-g16", {**tma, gg.CONFIG_ENV: "128,128,64,16,8,3", gg.CONFIG2_ENV: "128,256,64,16,8,3"}),
        ("tma-ws", {**v0, **tma, gg.LOOP_ENV: "ws"}),
        ("tma-flat", {**v0, **tma, gg.LOOP_ENV: "flatten"}),
    ]


def decode_variants(preset: str, T: int) -> list[tuple[str, dict]]:
    """(name, env) for T <= 128: decode tiles (BM16) against mid tiles, pointers against TMA."""
    tma = {gg.TMA_ENV: "1"}
    out = [
        ("d-n32k256", {gg.CONFIG_ENV: "16,32,256,8,4,4"}),  # v0's pick at T=1 (mixtral, deepseek-v3)
        ("d-n64k128", {gg.CONFIG_ENV: "16,64,128,8,4,4"}),
        ("d-n16k256", {gg.CONFIG_ENV: "16,16,256,8,4,4"}),  # 2x the tiles of BN32: small experts at T=1
        ("d-n32k256-tma", {gg.CONFIG_ENV: "16,32,256,8,4,4", **tma}),
        ("d-n64k128-tma", {gg.CONFIG_ENV: "16,64,128,8,4,4", **tma}),
    ]
    if T >= 16:
        out += [
            ("m-bm32", {gg.CONFIG_ENV: "32,64,128,8,4,4"}),
            ("m-bm32-tma", {gg.CONFIG_ENV: "32,64,128,8,4,4", **tma}),
        ]
    if T >= 128:
        out += [
            ("m-bm64", {gg.CONFIG_ENV: "64,64,64,8,4,4", gg.CONFIG2_ENV: "64,128,64,8,4,4"}),
            ("m-bm64-tma", {gg.CONFIG_ENV: "64,64,64,8,4,4", gg.CONFIG2_ENV: "64,128,64,8,4,4", **tma}),
        ]
    return out


def log(*args):
    print(*args, flush=True)


def env_text(values: dict) -> str:
    short = {gg.CONFIG_ENV: "C", gg.CONFIG2_ENV: "C2", gg.TMA_ENV: "TMA", gg.LOOP_ENV: "LOOP",
             gg.DECODE_ENV: "DEC"}
    return " ".join(f"{short[k]}={v}" for k, v in values.items())


def timed(fn, T, rep_ms):
    if DEVICE == "cpu":
        return time_cpu(fn, reps=1)
    return time_cuda(fn, use_graph=T <= GRAPH_MAX_TOKENS, warmup_ms=5, rep_ms=rep_ms)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Runner:
    def __init__(self, args, meta):
        self.args, self.meta, self.rows = args, meta, []
        self.start = time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, what: str) -> bool:
        if self.elapsed() > self.args.budget_s:
            self.skipped.append(what)
            return True
        return False

    def emit(self, row):
        row.update(self.meta)
        self.rows.append(row)
        log(f"{row['preset']:<14}{row['T']:>5} {row['variant']:<15}{row.get('ms', row['status']):>9}"
            f"{row.get('tflops', ''):>7}{row.get('gbps', ''):>6}{row.get('eff_pct', ''):>6}"
            f"{row.get('vs_gmm', ''):>6}{row.get('rel_err', ''):>9}{row.get('first_call_s', ''):>6}"
            f"  {row.get('gemm1_ms', '')} {row.get('gemm2_ms', '')} {row.get('sum_ms', '')} {row.get('note', '')}")

    def point(self, phase, preset, cfg, weights, T, variants):
        if self.over_budget(f"{phase} {preset} T={T} (all)"):
            return
        ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0, device=DEVICE)
        x = torch.randn(T, cfg.H, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
        plan = RoutingPlan.build(ids, tw, cfg.E)
        ref = moe_reference(x, weights, ids, tw)
        active = int((plan.expert_counts > 0).sum())
        wbytes = active * weights.bytes_per_expert()
        flops = cfg.useful_flops(T)
        bound = max(flops / PEAK_TFLOPS / 1e9, wbytes / PEAK_GBPS / 1e6)
        base = dict(phase=phase, preset=preset, T=T, bound_ms=f"{bound:.4f}")
        # the plan on its own (the harness times build + forward)
        plan_ms = math.nan
        try:
            plan_ms = timed(lambda: RoutingPlan.build(ids, tw, cfg.E, validate=False), T, self.args.rep_ms).median_ms
        except Exception as exc:
            log(f"plan timing failed: {exc}")
        base["plan_ms"] = f"{plan_ms:.4f}"

        def finish(row, t):
            row.update(status="ok", ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}", p80_ms=f"{t.p80_ms:.4f}",
                       timing=t.method, tflops=f"{flops / t.median_ms / 1e9:.0f}",
                       gbps=f"{wbytes / t.median_ms / 1e6:.0f}", eff_pct=f"{100 * bound / t.median_ms:.0f}")
            if not math.isnan(gmm_ms):
                row.update(vs_gmm=f"{gmm_ms / t.median_ms:.2f}", gmm_ms=f"{gmm_ms:.4f}")

        gmm_ms = math.nan
        gmm = moe_tut.get_backend("grouped_mm")
        row = dict(base, variant="grouped_mm")
        try:
            reason = gmm.unavailable(cfg, x.device)
            if reason:
                row.update(status="unavailable", note=reason)
            else:
                row["rel_err"] = f"{relative_error(gmm(x, weights, plan), ref):.2e}"
                t = timed(lambda: gmm(x, weights, plan), T, self.args.rep_ms)
                gmm_ms = t.median_ms
                finish(row, t)
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:150]}")
        self.emit(row)

        for name, values in variants:
            if self.over_budget(f"{phase} {preset} T={T} {name}"):
                continue
            row = dict(base, variant=name, env=env_text(values))
            try:
                with environment(values, clear=ENV_KEYS):
                    fn = lambda: gg.moe_forward_triton(x, weights, plan)
                    sync()
                    t0 = time.perf_counter()
                    y = fn()
                    sync()
                    row["first_call_s"] = f"{time.perf_counter() - t0:.1f}"
                    err = relative_error(y, ref)
                    row["rel_err"] = f"{err:.2e}"
                    if not err < TOL:
                        row.update(status="FAILED", note=f"rel err {err:.3g} > {TOL}")
                        self.emit(row)
                        continue
                    finish(row, timed(fn, T, self.args.rep_ms))
                    if T >= self.args.breakdown_min_t:
                        self.breakdown(row, x, weights, plan, T, cfg)
            except Exception as exc:  # one broken variant must not end the run
                row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                traceback.print_exc(limit=2, file=sys.stdout)
            self.emit(row)

    def breakdown(self, row, x, weights, plan, T, cfg):
        """GEMM1, GEMM2 and the sum over k on their own (same env, same configs)."""
        rows, F, H, k = plan.num_rows, cfg.F, cfg.H, cfg.top_k
        c1 = gg.pinned_config()
        c2 = gg.pinned_config(gg.CONFIG2_ENV) or c1
        inter = torch.empty(rows, F, dtype=x.dtype, device=x.device)
        out = torch.empty(rows, H, dtype=x.dtype, device=x.device)
        g1 = lambda: gg.grouped_gemm(x, weights.w13, plan, inter, gather_rows=True, swiglu=True, config=c1)
        g1()
        g2 = lambda: gg.grouped_gemm(inter, weights.w2, plan, out, scale_rows=True, scatter_rows=True, config=c2)
        rep = self.args.rep_ms
        t1 = timed(g1, T, rep).median_ms
        t2 = timed(g2, T, rep).median_ms
        row.update(gemm1_ms=f"{t1:.4f}", gemm2_ms=f"{t2:.4f}")
        if k > 1:
            row["sum_ms"] = f"{timed(lambda: out.view(T, k, H).sum(dim=1), T, rep).median_ms:.4f}"
        half = 2 * T * k * 2 * H * F / 1e9  # GEMM1 FLOPs (GEMM2 is half of it)
        row["note"] = f"G1 {half / t1:.0f} G2 {half / 2 / t2:.0f} TFLOP/s"

    def phase(self, phase, presets, tokens, make_variants):
        for preset in presets:
            ts = [T for T in tokens if (T >= 1024) == (phase == "prefill")]
            if not ts:
                continue
            if self.over_budget(f"{phase} {preset} (weights)"):
                continue
            cfg = get_preset(preset)
            try:
                weights = ExpertWeights.random(cfg, device=DEVICE)
            except Exception as exc:
                log(f"{preset}: cannot allocate weights: {exc}")
                continue
            log(f"-- {phase} {preset}: E={cfg.E} H={cfg.H} F={cfg.F} k={cfg.top_k} [{self.elapsed():.0f} s]")
            for T in ts:
                try:
                    self.point(phase, preset, cfg, weights, T, make_variants(preset, T))
                except Exception as exc:
                    log(f"{preset} T={T}: {type(exc).__name__}: {exc}")
                    traceback.print_exc(limit=3, file=sys.stdout)
            del weights
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 8192])
    p.add_argument("--phases", default="prefill,decode", help="prefill (T >= 1024) and/or decode (T <= 128)")
    p.add_argument("--variants", default="", help="comma list: run only these variant names")
    p.add_argument("--budget-s", type=float, default=400.0, help="start no new row after this many seconds")
    p.add_argument("--rep-ms", type=float, default=20.0)
    p.add_argument("--breakdown-min-t", type=int, default=8192, help="per-GEMM times at T >= this")
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--smoke", action="store_true",
                   help="no GPU: run the logic on the CPU interpreter (use with --presets debug --tokens 4)")
    args = p.parse_args(argv)
    global DEVICE
    import triton

    if args.smoke:
        DEVICE = "cpu"
        meta = dict(gpu="cpu-interpreter", torch=torch.__version__, triton=triton.__version__)
    elif not torch.cuda.is_available():
        log("no CUDA GPU: this script times GPU kernels (--smoke checks its logic on the CPU)")
        return 2
    else:
        props = torch.cuda.get_device_properties(0)
        meta = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__)
        log(f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs); "
            f"torch {torch.__version__}, triton {triton.__version__}; "
            f"tma_supported={gg.tma_supported(torch.device('cuda'))}")
    log(f"{'preset':<14}{'T':>5} {'variant':<15}{'ms':>9}{'TF/s':>7}{'GB/s':>6}{'eff%':>6}{'xgmm':>6}"
        f"{'err':>9}{'1st':>6}  gemm1 gemm2 sum (ms, T=8192)")
    keep = {v for v in args.variants.split(",") if v}

    def select(make):
        return lambda preset, T: [v for v in make(preset, T) if not keep or v[0] in keep]

    runner = Runner(args, meta)
    presets = [s for s in args.presets.split(",") if s]
    try:
        for phase in [s for s in args.phases.split(",") if s]:
            make = prefill_variants if phase == "prefill" else decode_variants
            runner.phase(phase, presets, args.tokens, select(make))
    finally:
        if runner.skipped:
            log(f"\nskipped (budget {args.budget_s:.0f} s): " + "; ".join(runner.skipped))
        summary(runner.rows)
        if args.out:
            log(f"wrote {write_csv(os.path.join(args.out, 'triton_tune.csv'), runner.rows, FIELDS)}")
        log(f"total {runner.elapsed():.0f} s")
    return 0


def summary(rows):
    """Per (preset, T): grouped_mm, the best variant, and the plan's own time."""
    log("\n== best variant per point (forward, plan prebuilt) ==")
    points: dict = {}
    for r in rows:
        if r.get("status") == "ok":
            points.setdefault((r["preset"], r["T"]), []).append(r)
    for (preset, T), rs in points.items():
        ours = [r for r in rs if r["variant"] != "grouped_mm"]
        gmm = [r for r in rs if r["variant"] == "grouped_mm"]
        if not ours:
            continue
        best = min(ours, key=lambda r: float(r["ms"]))
        log(f"{preset:<14}{T:>5}  best {best['variant']:<15}{best['ms']:>9} ms {best['eff_pct']:>4}%  "
            f"gmm {gmm[0]['ms'] if gmm else '-':>9} ms  plan {rs[0].get('plan_ms', '')} ms  bound {rs[0]['bound_ms']}")


if __name__ == "__main__":
    sys.exit(main())
