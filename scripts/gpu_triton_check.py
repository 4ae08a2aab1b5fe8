#!/usr/bin/env python3
"""GPU check of the Triton grouped GEMM (moe_tut.kernels.grouped_gemm): first correctness, then speed.

1. Correctness: v1..v4 and the fast path against the float32 reference on mid-size and awkward
   shapes (relative Frobenius error; bf16 passes below 2e-2).
2. Speed: the same against torch grouped_mm on the mixtral, deepseek-v3 and qwen3-30b-a3b presets at
   T in {1, 16, 128, 1024, 8192} (uniform routing). Each row is checked against the reference before
   it is timed; a row that fails is reported, not timed. Timed unit: backend(x, weights, plan) with
   the RoutingPlan built once outside the timing (the same plan for every backend). Median of CUDA
   events with a cold L2 (moe_tut.bench.timing.time_cuda); for T <= 64, replay of a CUDA graph of
   the call, so host launch overhead is not measured. The first call (compile + autotune) is timed
   apart, as first_call_s.

Usage (expected 3-5 minutes on an H100, mostly compiling and autotuning, which first_call_s shows;
--versions fast,v4 or --no-correctness shorten it; weights are allocated one preset at a time):
    python scripts/gpu_triton_check.py
    python scripts/gpu_triton_check.py --presets mixtral --tokens 1 16 --versions fast,v4
Writes triton_check.csv (and triton_autotune.txt: the configs the autotuner chose) under $OUT, or
under --out, when either is given.
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
from moe_tut.bench.timing import time_cuda
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.presets import custom

TOL = 2e-2
DEVICE = "cuda"
GRAPH_MAX_TOKENS = 64
CORRECTNESS = [  # (id, E, H, F, top_k, T, skew)
    ("mid-T1", 8, 1024, 2048, 2, 1, "uniform"),
    ("mid-T16", 8, 1024, 2048, 2, 16, "uniform"),
    ("mid-T1000-zipf", 8, 1024, 2048, 2, 1000, "zipf"),
    ("all-to-one-top1", 8, 1024, 2048, 1, 512, "all_to_one"),
    ("E7-H1000-F1400-hot", 7, 1000, 1400, 3, 333, "hot"),  # multiples of 8, not of 16 or any block
    ("E5-H777-F1111", 5, 777, 1111, 2, 100, "uniform"),  # odd sizes: rows not 16-byte aligned
]
FIELDS = ["section", "case", "T", "backend", "path", "status", "rel_err", "median_ms", "p20_ms", "p80_ms",
          "timing", "speedup_vs_grouped_mm", "tflops", "weight_gbps", "first_call_s", "note",
          "gpu", "torch", "triton"]


def log(*args):
    print(*args, flush=True)


def backends(names: list[str]) -> dict:
    table = {}
    for name in names:
        if name == "grouped_mm":
            table[name] = moe_tut.get_backend("grouped_mm")
        else:
            table[name] = gg.VERSIONS[name]
    return table


def path_of(name, cfg, T) -> str:
    if name == "fast":
        return "decode" if gg.is_decode(T, cfg.top_k, cfg.E) else "prefill"
    return "" if name == "grouped_mm" else ("autotuned" if name == "v4" else str(gg.DEFAULT_CONFIG))


def make_inputs(cfg, T, skew, weights=None, seed=0):
    w = weights or ExpertWeights.random(cfg, device=DEVICE, seed=seed)
    ids, tw = simulate_routing(T, cfg.E, cfg.top_k, skew, seed=seed, device=DEVICE)
    x = torch.randn(T, cfg.H, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.bfloat16)
    return w, x, ids, tw, RoutingPlan.build(ids, tw, cfg.E)


def first_call(fn, x, w, plan):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = fn(x, w, plan)
    torch.cuda.synchronize()
    return y, time.perf_counter() - t0


def check_row(name, fn, cfg, T, x, w, plan, ref, meta, section, case):
    row = dict(section=section, case=case, T=T, backend=name, path=path_of(name, cfg, T), **meta)
    if name == "grouped_mm":
        reason = fn.unavailable(cfg, x.device)
        if reason:
            return dict(row, status="unavailable", note=reason), None
    try:
        y, t_first = first_call(fn, x, w, plan)
        err = relative_error(y, ref)
        row.update(rel_err=f"{err:.2e}", first_call_s=f"{t_first:.2f}")
        ok = err < TOL
        row["status"] = "ok" if ok else "FAILED"
        return row, ok
    except Exception as exc:  # one broken row must not end the run
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        traceback.print_exc(limit=3, file=sys.stdout)
        return row, None


def correctness(names, meta, rows):
    log("\n== correctness: relative error vs the float32 reference (bf16 passes below 2e-2) ==")
    for case, E, H, F, k, T, skew in CORRECTNESS:
        cfg = custom(E, H, F, k)
        w, x, ids, tw, plan = make_inputs(cfg, T, skew)
        ref = moe_reference(x, w, ids, tw)
        line = []
        for name, fn in backends(names).items():
            row, _ = check_row(name, fn, cfg, T, x, w, plan, ref, meta, "correctness", case)
            rows.append(row)
            line.append(f"{name}={row.get('rel_err', row['status'])}{'' if row['status'] == 'ok' else '!'}")
        log(f"{case:<22} " + "  ".join(line))
        del w, x, ref
    torch.cuda.empty_cache()


def speed(presets, tokens, names, meta, rows, rep_ms):
    log("\n== speed: median ms per MoE forward (plan prebuilt), vs torch grouped_mm ==")
    log(f"{'preset':<14}{'T':>6}  {'backend':<11}{'path':<22}{'ms':>9}{'x gmm':>7}{'TFLOP/s':>9}"
        f"{'GB/s':>7}{'err':>10}{'1st s':>7}  timing")
    for preset in presets:
        cfg = get_preset(preset)
        try:
            weights = ExpertWeights.random(cfg, device=DEVICE)
        except Exception as exc:
            log(f"{preset}: cannot allocate weights: {exc}")
            continue
        for T in tokens:
            try:
                w, x, ids, tw, plan = make_inputs(cfg, T, "uniform", weights=weights)
                ref = moe_reference(x, w, ids, tw)
                active = int((plan.expert_counts > 0).sum())
            except Exception as exc:
                log(f"{preset} T={T}: setup failed: {exc}")
                continue
            weight_bytes = active * w.bytes_per_expert()
            base_ms = math.nan
            for name, fn in backends(names).items():
                row, ok = check_row(name, fn, cfg, T, x, w, plan, ref, meta, "speed", preset)
                if ok:
                    try:
                        call = lambda fn=fn, x=x, w=w, plan=plan: fn(x, w, plan)
                        t = time_cuda(call, use_graph=T <= GRAPH_MAX_TOKENS, warmup_ms=10, rep_ms=rep_ms)
                        if name == "grouped_mm":
                            base_ms = t.median_ms
                        row.update(median_ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}",
                                   p80_ms=f"{t.p80_ms:.4f}", timing=t.method,
                                   speedup_vs_grouped_mm=f"{base_ms / t.median_ms:.2f}",
                                   tflops=f"{cfg.useful_flops(T) / t.median_ms / 1e9:.1f}",
                                   weight_gbps=f"{weight_bytes / t.median_ms / 1e6:.0f}")
                    except Exception as exc:
                        row.update(status="error", note=f"timing: {type(exc).__name__}: {str(exc)[:200]}")
                rows.append(row)
                log(f"{preset:<14}{T:>6}  {name:<11}{row['path']:<22}{row.get('median_ms', row['status']):>9}"
                    f"{row.get('speedup_vs_grouped_mm', ''):>7}{row.get('tflops', ''):>9}"
                    f"{row.get('weight_gbps', ''):>7}{row.get('rel_err', ''):>10}{row.get('first_call_s', ''):>7}"
                    f"  {row.get('timing', '')} {row.get('note', '')}")
            del w, x, ids, tw, plan, ref
        del weights
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="mixtral,deepseek-v3,qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 8192])
    p.add_argument("--versions", default="v1,v2,v3,v4,fast", help="which of v1,v2,v3,v4,fast")
    p.add_argument("--no-correctness", action="store_true")
    p.add_argument("--rep-ms", type=float, default=50.0, help="time spent timing each row")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the CSV (default: $OUT)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        log("no CUDA GPU: this script times GPU kernels (tests/test_triton_grouped_gemm.py runs on CPU)")
        return 2
    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    import triton

    meta = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__)
    log(f"{props.name}: {props.multi_processor_count} SMs, {gg.smem_limit(torch.device('cuda')) // 1024} KB "
        f"shared memory per block; torch {torch.__version__}, triton {triton.__version__}; "
        f"{gg.CONFIG_ENV}={os.environ.get(gg.CONFIG_ENV, '(unset)')}")
    names = ["grouped_mm"] + [v for v in args.versions.split(",") if v]
    rows: list[dict] = []
    try:
        if not args.no_correctness:
            correctness(names, meta, rows)
            log(f"[{time.perf_counter() - start:.0f} s]")
        speed([s for s in args.presets.split(",") if s], args.tokens, names, meta, rows, args.rep_ms)
    finally:
        report = gg.autotune_report()
        log("\n== autotuner choices ==")
        for line in report:
            log(line)
        if args.out:
            write_csv(os.path.join(args.out, "triton_check.csv"), rows, FIELDS)
            with open(os.path.join(args.out, "triton_autotune.txt"), "w") as f:
                f.write("\n".join(report) + "\n")
            log(f"wrote {args.out}/triton_check.csv and triton_autotune.txt")
        log(f"total {time.perf_counter() - start:.0f} s")
    failed = [r for r in rows if r["status"] in ("FAILED", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
