#!/usr/bin/env python3
"""GPU check of the Triton W4A16 MoE forward (moe_tut.kernels.int4_gemm): correctness, then speed.

1. Correctness: triton_int4 on mid-size and awkward shapes, both regimes forced, symmetric and
   asymmetric, group 32 and 128, against the float32 reference on the dequantised weights (tight,
   passes below 2e-2); the error against the original bf16 weights (quantisation) is printed too.
2. Speed: triton_int4 vs the bf16 `triton` backend vs torch grouped_mm on mixtral, deepseek-v3 and
   qwen3-30b-a3b at T in {1, 16, 128, 1024, 8192} (uniform routing; INT4 weights quantised on the GPU
   from the same bf16 weights, group 128 symmetric). Each row is checked before it is timed; a row
   that fails is reported, not timed. Timed unit: backend(x, weights, plan), the plan built once.
   Median of CUDA events with a cold L2 (moe_tut.bench.timing.time_cuda); CUDA-graph replay for
   T <= 64. Columns: ms, weight GB/s (bytes of the touched experts in the backend's own format:
   packed codes + scales for INT4, bf16 otherwise), that as a fraction of the measured copy
   bandwidth, speedup vs bf16 triton. first_call_s is the compile + autotune call, timed apart.
3. glm5 INT4 (128 x 3 x 5120 x 13696: 54 GB in bf16, 13.9 GB in INT4): the INT4 weights are made
   expert chunk by expert chunk (random bf16 chunk -> quant.quantize -> copied into the packed
   tensors), so the bf16 weights never exist whole; prints weight memory and forward time at
   T in {1, 1024}, checked against the one-expert-at-a-time dequantised reference.

Usage (about 4 minutes on an H100, mostly compiling and autotuning, which first_call_s shows):
    python scripts/gpu_triton_int4_check.py
    python scripts/gpu_triton_int4_check.py --presets mixtral --tokens 1 16 --no-glm5 --no-correctness
Writes triton_int4_check.csv and triton_int4_autotune.txt (the configs the autotuners chose) under
$OUT, or under --out, when either is given. Progress is printed (flushed) as each row finishes.
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
from moe_tut.bench.ceilings import measure_ceilings
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cuda
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.kernels import int4_gemm as ig
from moe_tut.presets import custom
from moe_tut.quant import DEFAULT_GROUP_SIZE, Int4ExpertWeights, QuantizedTensor, quantize

TOL = 2e-2
DEVICE = "cuda"
GRAPH_MAX_TOKENS = 64
CORRECTNESS = [  # (id, E, H, F, top_k, T, skew, group, symmetric, path)
    ("mid-T1", 8, 1024, 2048, 2, 1, "uniform", 128, True, None),
    ("mid-T16-asym-g32", 8, 1024, 2048, 2, 16, "uniform", 32, False, None),
    ("mid-T16-prefill-forced", 8, 1024, 2048, 2, 16, "uniform", 128, True, "prefill"),
    ("mid-T1000-zipf", 8, 1024, 2048, 2, 1000, "zipf", 128, True, None),
    ("mid-T1000-decode-forced", 8, 1024, 2048, 2, 1000, "zipf", 64, False, "decode"),
    ("all-to-one-top1", 8, 1024, 2048, 1, 512, "all_to_one", 128, True, None),
    ("E7-H960-F1344-hot", 7, 960, 1344, 3, 333, "hot", 64, False, None),  # not multiples of 128
    ("E5-H768-F1536-topk-eq-E", 5, 768, 1536, 5, 40, "uniform", 256, True, None),  # group > BLOCK_K
]
FIELDS = ["section", "case", "T", "backend", "path", "status", "rel_err", "quant_err", "median_ms", "p20_ms",
          "p80_ms", "timing", "speedup_vs_triton_bf16", "weight_gb", "weight_gbps", "frac_copy_bw",
          "first_call_s", "note", "gpu", "torch", "triton", "copy_gbps"]


def log(*args):
    print(*args, flush=True)


def first_call(fn, x, w, plan):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = fn(x, w, plan)
    torch.cuda.synchronize()
    return y, time.perf_counter() - t0


def checked(row, fn, x, w, plan, ref):
    """Run once (compile + autotune), compare with ref; returns ok (True/False) or None on an error."""
    try:
        y, t_first = first_call(fn, x, w, plan)
        err = relative_error(y, ref)
        row.update(rel_err=f"{err:.2e}", first_call_s=f"{t_first:.2f}", status="ok" if err < TOL else "FAILED")
        return err < TOL
    except Exception as exc:  # one broken row must not end the run
        row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        traceback.print_exc(limit=3, file=sys.stdout)
        return None


def timed(row, fn, x, w, plan, T, rep_ms):
    try:
        t = time_cuda(lambda: fn(x, w, plan), use_graph=T <= GRAPH_MAX_TOKENS, warmup_ms=10, rep_ms=rep_ms)
        row.update(median_ms=f"{t.median_ms:.4f}", p20_ms=f"{t.p20_ms:.4f}", p80_ms=f"{t.p80_ms:.4f}",
                   timing=t.method)
        return t.median_ms
    except Exception as exc:
        row.update(status="error", note=f"timing: {type(exc).__name__}: {str(exc)[:200]}")
        traceback.print_exc(limit=3, file=sys.stdout)
        return math.nan


def correctness(meta, rows):
    log("\n== correctness: triton_int4 vs the float32 reference on the dequantised weights (passes < 2e-2);"
        " quant_err = vs the bf16 weights ==")
    for case, E, H, F, k, T, skew, G, sym, path in CORRECTNESS:
        row = dict(section="correctness", case=case, T=T, backend="triton_int4",
                   path=path or ig.path_for(T, k, E), **meta)
        try:
            w = ExpertWeights.random(custom(E, H, F, k), device=DEVICE)
            q = Int4ExpertWeights.from_bf16(w, G, sym)
            ids, tw = simulate_routing(T, E, k, skew, device=DEVICE)
            x = torch.randn(T, H, device=DEVICE).bfloat16()
            plan = RoutingPlan.build(ids, tw, E)
            ref = ig.int4_moe_reference(x, q, ids, tw)
            fn = lambda x, q, plan, path=path: ig.moe_forward_triton_int4(x, q, plan, path=path)
            ok = checked(row, fn, x, q, plan, ref)
            if ok is not None:
                y = fn(x, q, plan)
                row["quant_err"] = f"{relative_error(y, moe_reference(x, w, ids, tw)):.2e}"
        except Exception as exc:
            row.update(status="error", note=f"setup: {type(exc).__name__}: {str(exc)[:200]}")
        rows.append(row)
        log(f"{case:<26} G={G:<4}{'sym ' if sym else 'asym'} {row['path']:<8} {row['status']:<7} "
            f"err={row.get('rel_err', '')} quant_err={row.get('quant_err', '')} 1st={row.get('first_call_s', '')}s "
            f"{row.get('note', '')}")
    torch.cuda.empty_cache()


def speed(presets, tokens, meta, rows, rep_ms, copy_gbps):
    log("\n== speed: median ms per MoE forward (plan prebuilt); GB/s of the touched experts' weights in each "
        "backend's format ==")
    log(f"{'preset':<14}{'T':>6}  {'backend':<12}{'path':<9}{'ms':>9}{'x triton':>9}{'GB/s':>7}{'%copy':>6}"
        f"{'err':>10}{'1st s':>7}  timing")
    int4 = moe_tut.get_backend("triton_int4")
    # bf16 triton first: the other rows' speedup is against it
    backends = {"triton": moe_tut.get_backend("triton"), "triton_int4": int4,
                "grouped_mm": moe_tut.get_backend("grouped_mm")}
    for preset in presets:
        cfg = get_preset(preset)
        try:
            weights = ExpertWeights.random(cfg, device=DEVICE)
            qweights = int4.prepare(weights)
            torch.cuda.synchronize()
        except Exception as exc:
            log(f"{preset}: cannot make weights: {exc}")
            continue
        log(f"{preset}: bf16 {weights.nbytes / 1e9:.2f} GB, INT4 {qweights.nbytes / 1e9:.2f} GB "
            f"({qweights.describe_compression()})")
        for T in tokens:
            try:
                ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0, device=DEVICE)
                x = torch.randn(T, cfg.H, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
                plan = RoutingPlan.build(ids, tw, cfg.E)
                ref_bf16 = moe_reference(x, weights, ids, tw)
                ref_int4 = ig.int4_moe_reference(x, qweights, ids, tw)
                active = int((plan.expert_counts > 0).sum())
            except Exception as exc:
                log(f"{preset} T={T}: setup failed: {exc}")
                continue
            triton_ms = math.nan
            for name, fn in backends.items():
                is_int4 = name == "triton_int4"
                w = qweights if is_int4 else weights
                path = ig.path_for(T, cfg.top_k, cfg.E) if name != "grouped_mm" else ""
                row = dict(section="speed", case=preset, T=T, backend=name, path=path, copy_gbps=f"{copy_gbps:.0f}",
                           **meta)
                reason = fn.unavailable(cfg, x.device)
                if reason:
                    row.update(status="unavailable", note=reason)
                elif checked(row, fn, x, w, plan, ref_int4 if is_int4 else ref_bf16):
                    ms = timed(row, fn, x, w, plan, T, rep_ms)
                    if name == "triton":
                        triton_ms = ms
                    nbytes = w.bytes_for(active)
                    gbps = nbytes / ms / 1e6
                    row.update(weight_gb=f"{nbytes / 1e9:.3f}", weight_gbps=f"{gbps:.0f}",
                               frac_copy_bw=f"{gbps / copy_gbps:.2f}",
                               speedup_vs_triton_bf16=f"{triton_ms / ms:.2f}")
                rows.append(row)
                log(f"{preset:<14}{T:>6}  {name:<12}{path:<9}{row.get('median_ms', row['status']):>9}"
                    f"{row.get('speedup_vs_triton_bf16', ''):>9}{row.get('weight_gbps', ''):>7}"
                    f"{row.get('frac_copy_bw', ''):>6}{row.get('rel_err', ''):>10}{row.get('first_call_s', ''):>7}"
                    f"  {row.get('timing', '')} {row.get('note', '')}")
            del x, ids, tw, plan, ref_bf16, ref_int4
        del weights, qweights
        torch.cuda.empty_cache()


def int4_weights_in_chunks(cfg, group_size: int = DEFAULT_GROUP_SIZE, chunk: int = 8, seed: int = 0
                           ) -> Int4ExpertWeights:
    """Random INT4 expert weights for cfg, quantised from random bf16 experts `chunk` at a time, so only
    one chunk of bf16 weights (glm5: 8 experts = 3.4 GB) exists at once."""
    E, H, F = cfg.E, cfg.H, cfg.F
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    out = {}
    for name, (N, K) in (("w13", (2 * F, H)), ("w2", (H, F))):
        packed = torch.empty(E, N, K // 2, dtype=torch.uint8, device=DEVICE)
        scales = torch.empty(E, K // group_size, N, dtype=torch.bfloat16, device=DEVICE)
        for e0 in range(0, E, chunk):
            e1 = min(E, e0 + chunk)
            w = torch.empty(e1 - e0, N, K, dtype=torch.bfloat16, device=DEVICE).normal_(0.0, K ** -0.5, generator=gen)
            qt = quantize(w, group_size, symmetric=True)
            packed[e0:e1] = qt.packed
            scales[e0:e1] = qt.scales
            del w, qt
        out[name] = QuantizedTensor(packed, scales, None, group_size, True, (E, N, K))
    return Int4ExpertWeights(out["w13"], out["w2"])


def glm5(tokens, meta, rows, rep_ms, copy_gbps):
    log("\n== glm5 INT4: weights made expert chunk by chunk (bf16 would be 54 GB) ==")
    cfg = get_preset("glm5")
    try:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        q = int4_weights_in_chunks(cfg)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated() - before
        log(f"glm5: INT4 weights {q.nbytes / 1e9:.2f} GB ({q.describe_compression()}); allocated "
            f"{resident / 1e9:.2f} GB; peak during creation {torch.cuda.max_memory_allocated() / 1e9:.2f} GB; "
            f"made in {time.perf_counter() - t0:.1f} s")
    except Exception as exc:
        log(f"glm5: cannot make INT4 weights: {type(exc).__name__}: {exc}")
        rows.append(dict(section="glm5", case="glm5", backend="triton_int4", status="error",
                         note=f"{type(exc).__name__}: {str(exc)[:200]}", **meta))
        return
    fn = moe_tut.get_backend("triton_int4")
    for T in tokens:
        row = dict(section="glm5", case="glm5", T=T, backend="triton_int4", path=ig.path_for(T, cfg.top_k, cfg.E),
                   weight_gb=f"{q.nbytes / 1e9:.2f}", copy_gbps=f"{copy_gbps:.0f}", **meta)
        try:
            ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0, device=DEVICE)
            x = torch.randn(T, cfg.H, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
            plan = RoutingPlan.build(ids, tw, cfg.E)
            ref = ig.int4_moe_reference(x, q, ids, tw)
            active = int((plan.expert_counts > 0).sum())
            if checked(row, fn, x, q, plan, ref):
                ms = timed(row, fn, x, q, plan, T, rep_ms)
                gbps = q.bytes_for(active) / ms / 1e6
                row.update(weight_gbps=f"{gbps:.0f}", frac_copy_bw=f"{gbps / copy_gbps:.2f}",
                           note=f"{active} experts touched; INT4 weights {q.nbytes / 1e9:.2f} GB resident")
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
            traceback.print_exc(limit=3, file=sys.stdout)
        rows.append(row)
        log(f"glm5 T={T:<5} {row['path']:<8} {row.get('median_ms', row.get('status'))} ms  "
            f"{row.get('weight_gbps', '')} GB/s  err={row.get('rel_err', '')}  1st={row.get('first_call_s', '')}s  "
            f"{row.get('timing', '')} {row.get('note', '')}")
    del q
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="mixtral,deepseek-v3,qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 8192])
    p.add_argument("--glm5-tokens", type=int, nargs="+", default=[1, 1024])
    p.add_argument("--no-correctness", action="store_true")
    p.add_argument("--no-glm5", action="store_true")
    p.add_argument("--rep-ms", type=float, default=40.0, help="time spent timing each row")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the CSV (default: $OUT)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        log("no CUDA GPU: this script times GPU kernels (tests/test_triton_int4.py runs on CPU)")
        return 2
    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    import triton

    meta = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__)
    copy_gbps = measure_ceilings(DEVICE, gemm_size=1024).copy_gbps  # small GEMM: only the copy is used here
    log(f"{props.name}: {props.multi_processor_count} SMs, {gg.smem_limit(torch.device('cuda')) // 1024} KB shared "
        f"memory per block; torch {torch.__version__}, triton {triton.__version__}; measured copy "
        f"{copy_gbps:.0f} GB/s; {ig.CONFIG_ENV}={os.environ.get(ig.CONFIG_ENV, '(unset)')}")
    rows: list[dict] = []
    try:
        if not args.no_correctness:
            correctness(meta, rows)
            log(f"[{time.perf_counter() - start:.0f} s]")
        speed([s for s in args.presets.split(",") if s], args.tokens, meta, rows, args.rep_ms, copy_gbps)
        log(f"[{time.perf_counter() - start:.0f} s]")
        if not args.no_glm5:
            glm5(args.glm5_tokens, meta, rows, args.rep_ms, copy_gbps)
    finally:
        report = ig.autotune_report()
        log("\n== triton_int4 autotuner choices ==")
        for line in report:
            log(line)
        if args.out:
            write_csv(os.path.join(args.out, "triton_int4_check.csv"), rows, FIELDS)
            with open(os.path.join(args.out, "triton_int4_autotune.txt"), "w") as f:
                f.write("\n".join(report + ["", "bf16 triton:"] + gg.autotune_report()) + "\n")
            log(f"wrote {args.out}/triton_int4_check.csv and triton_int4_autotune.txt")
        log(f"total {time.perf_counter() - start:.0f} s")
    failed = [r for r in rows if r.get("status") in ("FAILED", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
