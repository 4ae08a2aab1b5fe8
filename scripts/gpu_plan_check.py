#!/usr/bin/env python3
"""GPU check of the plan kernels (moe_tut.kernels.plan): correctness, then build timings.

    python scripts/gpu_plan_check.py [--random 200] [--tokens 1 4 16 64 128] [--no-warps-sweep] [--budget-s 50]
                                     [--multi-rows 4096 8192 16384 32768 65536] [--multi-budget-s 240]
                                     [--multi-only | --no-multi]

1. Correctness: RoutingPlan.build(method="kernel") against method="torch" (every field torch.equal,
   same dtype) on --random random routings at the presets' (E, k) and one awkward prime E, random T
   (N = T*k up to AUTO_MAX_ROWS), every skew, int64/int32 ids and float32/bf16/fp16 weights; plus
   forced sizes past the auto limit up to SINGLE_MAX_ROWS (the kernel path takes the multi-CTA kernels
   there). The pytest file's GPU tests (pytest -m gpu tests/test_plan_kernel.py) add CUDA-graph capture
   and the num_warps variants.
2. Timing of RoutingPlan.build(validate=False) alone, torch path vs kernel path, at the (E, k) of
   mixtral (8, 2), deepseek-v3 (256, 8) and qwen3-30b-a3b (128, 8) for each T in --tokens; uniform
   routing. Timed as moe_tut.bench times a forward: CUDA-graph replay, L2 flushed before each replay,
   median of CUDA events (moe_tut.bench.timing.time_cuda(use_graph=True)). `auto` says which path
   build picks by itself. Rows at N = 2048 and 4096 (kernel forced; 4096 takes the multi-CTA path,
   and the num_warps column is then the single CTA's and does not apply) show whether AUTO_MAX_ROWS
   could go higher; section 4c compares the two paths directly.
3. num_warps sweep of the kernel at the smallest and largest T (the default comes from a heuristic,
   default_num_warps, never tuned on a GPU until this run).
4. Multi-CTA path (N > AUTO_MAX_ROWS; its own budget, --multi-budget-s):
   a. correctness of RoutingPlan.build(method="kernel") against the torch path at the presets' (E, k)
      for N in --multi-rows (up to 65536 = qwen3 T = 8192) and MAX_ROWS, every skew, int64/int32 ids,
      float32/bf16 weights, random T in between, and chunk sizes other than default_chunk;
   b. timing, torch path vs kernels, at the presets' (E, k) for N in --multi-rows: CUDA-graph replay
      as in 2 (`torch us`, `kernel us`), and eager (`eager`: wall clock per call over back-to-back
      calls, warm L2; what an eager forward pays, host launch cost included). `auto` shows the automatic choice, which
      is `kernel` up to AUTO_MULTI_MAX_ROWS (env MOE_TUT_PLAN_KERNEL_MULTI_MAX_ROWS);
   c. single CTA vs multi-CTA at N = 1024..4096 (where build_plan_tensors switches, AUTO_MAX_ROWS),
      and a chunk-size sweep (default_chunk is a guess).
   Rows with kernel faster than torch in both columns up to some N say where AUTO_MULTI_MAX_ROWS can go.

Expected: well under a minute on an H100 for 1-3 (most of it Triton compiling one kernel per (N_PAD,
E_BINS, num_warps)), a few minutes for 4. Each phase checks its budget and skips what is left once it
is spent. Writes $OUT/plan_check.csv when OUT is set. Exit status 1 if any correctness check failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

import moe_tut
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cuda
from moe_tut.kernels import plan as plan_kernel
from moe_tut.routing import SKEWS, RoutingPlan, _auto_method, simulate_routing

PRESETS = [("mixtral", 8, 2), ("deepseek-v3", 256, 8), ("qwen3-30b-a3b", 128, 8)]
FIELDS = ("sorted_slots", "sorted_token_ids", "sorted_weights", "slot_to_sorted", "expert_counts", "expert_offsets")
COLUMNS = ["gpu", "section", "preset", "E", "k", "T", "N", "auto", "torch_us", "kernel_us", "speedup",
           "num_warps", "first_call_s", "status", "note", "path", "chunk", "torch_eager_us", "kernel_eager_us"]


def say(msg: str) -> None:
    print(msg, flush=True)


def mismatch(ids: torch.Tensor, w: torch.Tensor, E: int) -> str | None:
    """None when the kernel plan equals the torch plan field by field, else the first differing field."""
    a = RoutingPlan.build(ids, w, E, method="kernel")
    b = RoutingPlan.build(ids, w, E, method="torch")
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            return name
    return None


def correctness(args, rows: list[dict], gpu: str) -> int:
    rng = random.Random(0)
    shapes = [(name, E, k) for name, E, k in PRESETS] + [("prime-E61", 61, 5)]
    failures = 0
    t0 = time.perf_counter()
    cases = []
    for i in range(args.random):
        name, E, k = shapes[i % len(shapes)]
        T = rng.randint(1, plan_kernel.AUTO_MAX_ROWS // k)
        cases.append((name, E, k, T, SKEWS[i % len(SKEWS)], rng.choice([torch.int64, torch.int32]),
                      rng.choice([torch.float32, torch.bfloat16, torch.float16]), i))
    # Forced, past the auto limit (these take the multi-CTA path, like section 4) up to the single CTA's limit.
    for T, k in [(256, 8), (512, 8), (plan_kernel.SINGLE_MAX_ROWS, 1), (1000, 3)]:
        cases.append((f"forced-N{T * k}", 256, k, T, "hot", torch.int64, torch.bfloat16, T))
    for name, E, k, T, skew, id_dtype, w_dtype, seed in cases:
        ids, w = simulate_routing(T, E, k, skew, seed=seed, device="cuda")
        try:
            bad = mismatch(ids.to(id_dtype), w.to(w_dtype), E)
        except Exception as exc:  # e.g. a compile failure at one size: report it, check the others
            bad = f"error {type(exc).__name__}: {exc}"
        if bad:
            failures += 1
            what = bad if bad.startswith("error") else f"field {bad} differs"
            say(f"MISMATCH {name} T={T} E={E} k={k} {skew} {id_dtype} {w_dtype}: {what}")
            rows.append(dict(gpu=gpu, section="correctness", preset=name, E=E, k=k, T=T, N=T * k, status="FAIL",
                             note=f"{skew} {id_dtype} {w_dtype}: {what}"))
    say(f"correctness: {len(cases) - failures}/{len(cases)} routings bit-identical to the torch path "
        f"({time.perf_counter() - t0:.1f} s, including compiles)")
    rows.append(dict(gpu=gpu, section="correctness", status="ok" if not failures else "FAIL",
                     note=f"{len(cases) - failures}/{len(cases)} identical"))
    return failures


def build_fn(ids, w, E, method, num_warps=None, multi_cta=None, chunk=None):
    if num_warps is None and multi_cta is None and chunk is None:
        return lambda: RoutingPlan.build(ids, w, E, validate=False, method=method)
    return lambda: plan_kernel.build_plan_tensors(ids, w, E, num_warps=num_warps, multi_cta=multi_cta, chunk=chunk)


def first_call(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def timing(args, rows: list[dict], gpu: str, t_start: float) -> None:
    say(f"\nRoutingPlan.build alone, CUDA-graph replay, cold L2, median (AUTO_MAX_ROWS = {plan_kernel.AUTO_MAX_ROWS})")
    head = f"{'preset':<14}{'E':>4}{'k':>3}{'T':>6}{'N':>6}  {'auto':<7}{'torch us':>9}{'kernel us':>10}{'speedup':>8}"
    say(head + "  warps  compile_s")
    points = [(name, E, k, T) for name, E, k in PRESETS for T in args.tokens]
    points += [("qwen3-30b-a3b", 128, 8, 256), ("qwen3-30b-a3b", 128, 8, 512),
               ("deepseek-v3", 256, 8, 256), ("deepseek-v3", 256, 8, 512)]
    for name, E, k, T in points:
        N = T * k
        row = dict(gpu=gpu, section="timing", preset=name, E=E, k=k, T=T, N=N)
        if time.perf_counter() - t_start > args.budget_s:
            row.update(status="skipped", note=f"budget of {args.budget_s:.0f} s spent")
            rows.append(row)
            say(f"{name:<14}{E:>4}{k:>3}{T:>6}{N:>6}  skipped (time budget)")
            continue
        try:
            ids, w = simulate_routing(T, E, k, "uniform", seed=T, device="cuda")
            n_pad = max(plan_kernel.MIN_PAD, 1 << (N - 1).bit_length())
            compile_s = first_call(build_fn(ids, w, E, "kernel"))
            t_torch = time_cuda(build_fn(ids, w, E, "torch"), use_graph=True, rep_ms=args.rep_ms).median_ms * 1e3
            t_kern = time_cuda(build_fn(ids, w, E, "kernel"), use_graph=True, rep_ms=args.rep_ms).median_ms * 1e3
            row.update(auto=_auto_method(ids, E), torch_us=f"{t_torch:.1f}", kernel_us=f"{t_kern:.1f}",
                       speedup=f"{t_torch / t_kern:.1f}", num_warps=plan_kernel.default_num_warps(n_pad),
                       first_call_s=f"{compile_s:.2f}", status="ok")
            say(f"{name:<14}{E:>4}{k:>3}{T:>6}{N:>6}  {row['auto']:<7}{t_torch:>9.1f}{t_kern:>10.1f}"
                f"{t_torch / t_kern:>8.1f}  {row['num_warps']:>5}  {compile_s:>9.2f}")
        except Exception as exc:  # one failing row must not hide the others
            row.update(status="error", note=f"{type(exc).__name__}: {exc}")
            say(f"{name:<14}{E:>4}{k:>3}{T:>6}{N:>6}  ERROR {type(exc).__name__}: {exc}")
        rows.append(row)


def eager_us(fn, min_s: float = 0.05) -> float:
    """Wall clock per call over back-to-back eager calls (L2 warm): max(host launch cost, GPU time)."""
    fn()
    torch.cuda.synchronize()
    n, t = 0, time.perf_counter()
    while n < 10 or time.perf_counter() - t < min_s:
        fn()
        n += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def multi_correctness(args, rows: list[dict], gpu: str) -> int:
    rng = random.Random(1)
    failures = 0
    t0 = time.perf_counter()
    cases = []
    sizes = sorted({n for n in args.multi_rows if plan_kernel.AUTO_MAX_ROWS < n <= plan_kernel.MAX_ROWS}
                   | {plan_kernel.MAX_ROWS})
    for name, E, k in PRESETS + [("prime-E509", 509, 3)]:
        for i, N in enumerate(sizes):
            T = max(1, N // k)
            cases.append((name, E, k, T, SKEWS[i % len(SKEWS)], (torch.int64, torch.int32)[i % 2],
                          (torch.float32, torch.bfloat16)[(i // 2) % 2], None, i))
        for i in range(args.random // 20):  # random T between the single-CTA limit and 65536 rows
            T = rng.randint(plan_kernel.AUTO_MAX_ROWS // k + 1, 65536 // k)
            cases.append((name, E, k, T, rng.choice(SKEWS), rng.choice([torch.int64, torch.int32]),
                          rng.choice([torch.float32, torch.bfloat16, torch.float16]), None, 100 + i))
    for chunk in (16, 256, 1024, 2048, plan_kernel.MAX_CHUNK):  # not the default chunk
        cases.append((f"chunk{chunk}", 256, 8, 8192 // 8 + 3, "zipf", torch.int64, torch.bfloat16, chunk, chunk))
    for name, E, k, T, skew, id_dtype, w_dtype, chunk, seed in cases:
        ids, w = simulate_routing(T, E, k, skew, seed=seed, device="cuda")
        ids, w = ids.to(id_dtype), w.to(w_dtype)
        try:
            if chunk is None:
                bad = mismatch(ids, w, E)
            else:
                got = plan_kernel.build_plan_tensors(ids, w, E, multi_cta=True, chunk=chunk)
                ref = RoutingPlan.build(ids, w, E, method="torch")
                bad = next((n for n in FIELDS if got[n].dtype != getattr(ref, n).dtype
                            or not torch.equal(got[n], getattr(ref, n))), None)
        except Exception as exc:
            bad = f"error {type(exc).__name__}: {exc}"
        if bad:
            failures += 1
            what = bad if bad.startswith("error") else f"field {bad} differs"
            say(f"MISMATCH multi {name} T={T} E={E} k={k} {skew} {id_dtype} {w_dtype} chunk={chunk}: {what}")
            rows.append(dict(gpu=gpu, section="multi-correctness", preset=name, E=E, k=k, T=T, N=T * k,
                             path="multi", chunk=chunk or plan_kernel.default_chunk(T * k), status="FAIL",
                             note=f"{skew} {id_dtype} {w_dtype}: {what}"))
    say(f"\nmulti-CTA correctness: {len(cases) - failures}/{len(cases)} routings bit-identical to the torch path "
        f"(N = {plan_kernel.AUTO_MAX_ROWS + 1}..{plan_kernel.MAX_ROWS}; {time.perf_counter() - t0:.1f} s, "
        f"including compiles)")
    rows.append(dict(gpu=gpu, section="multi-correctness", path="multi", status="ok" if not failures else "FAIL",
                     note=f"{len(cases) - failures}/{len(cases)} identical"))
    return failures


def multi_timing(args, rows: list[dict], gpu: str) -> None:
    t_start = time.perf_counter()
    say(f"\nMulti-CTA path vs torch: graph replay (cold L2, median) and eager (wall clock per call, "
        f"warm L2); AUTO_MAX_ROWS = {plan_kernel.AUTO_MAX_ROWS}, AUTO_MULTI_MAX_ROWS = "
        f"{plan_kernel.AUTO_MULTI_MAX_ROWS}")
    say(f"{'preset':<14}{'E':>4}{'k':>3}{'T':>6}{'N':>7}  {'path':<7}{'chunk':>6}  {'auto':<7}"
        f"{'torch us':>9}{'kernel us':>10}{'speedup':>8}  {'eager: torch':>12}{'kernel':>8}{'speedup':>8}")
    points = []  # (preset, E, k, T, multi_cta, chunk)
    for name, E, k in PRESETS:
        points += [(name, E, k, max(1, N // k), None, None) for N in args.multi_rows]
    # Where the single CTA should hand over (build_plan_tensors switches at AUTO_MAX_ROWS).
    for N in (1024, 2048, 4096):
        for multi_cta in (False, True):
            points.append(("qwen3-30b-a3b", 128, 8, N // 8, multi_cta, None))
    for N in (8192, 65536):  # chunk sweep (default_chunk is a guess)
        for chunk in (256, 512, 1024, 2048):
            points.append(("deepseek-v3", 256, 8, N // 8, True, chunk))
    for name, E, k, T, multi_cta, chunk in points:
        N = T * k
        multi = plan_kernel.uses_multi_cta(N) if multi_cta is None else multi_cta
        path, chunk_used = ("multi", chunk or plan_kernel.default_chunk(N)) if multi else ("single", "")
        row = dict(gpu=gpu, section="multi-timing", preset=name, E=E, k=k, T=T, N=N, path=path, chunk=chunk_used)
        lead = f"{name:<14}{E:>4}{k:>3}{T:>6}{N:>7}  {path:<7}{chunk_used!s:>6}  "
        if time.perf_counter() - t_start > args.multi_budget_s:
            row.update(status="skipped", note=f"budget of {args.multi_budget_s:.0f} s spent")
            rows.append(row)
            say(lead + "skipped (time budget)")
            continue
        try:
            ids, w = simulate_routing(T, E, k, "uniform", seed=T, device="cuda")
            kern = build_fn(ids, w, E, "kernel", multi_cta=multi_cta, chunk=chunk)
            torch_fn = build_fn(ids, w, E, "torch")
            compile_s = first_call(kern)
            t_torch = time_cuda(torch_fn, use_graph=True, rep_ms=args.rep_ms).median_ms * 1e3
            t_kern = time_cuda(kern, use_graph=True, rep_ms=args.rep_ms).median_ms * 1e3
            e_torch, e_kern = eager_us(torch_fn), eager_us(kern)
            row.update(auto=_auto_method(ids, E), torch_us=f"{t_torch:.1f}", kernel_us=f"{t_kern:.1f}",
                       speedup=f"{t_torch / t_kern:.1f}", torch_eager_us=f"{e_torch:.1f}",
                       kernel_eager_us=f"{e_kern:.1f}", first_call_s=f"{compile_s:.2f}", status="ok")
            say(lead + f"{row['auto']:<7}{t_torch:>9.1f}{t_kern:>10.1f}{t_torch / t_kern:>8.1f}  "
                f"{e_torch:>12.1f}{e_kern:>8.1f}{e_torch / e_kern:>8.1f}")
        except Exception as exc:  # one failing row must not hide the others
            row.update(status="error", note=f"{type(exc).__name__}: {exc}")
            say(lead + f"ERROR {type(exc).__name__}: {exc}")
        rows.append(row)


def warps_sweep(args, rows: list[dict], gpu: str, t_start: float) -> None:
    say("\nnum_warps sweep (kernel only, us; * = default_num_warps)")
    for name, E, k in PRESETS:
        for T in sorted({min(args.tokens), max(args.tokens)}):
            if time.perf_counter() - t_start > args.budget_s:
                say(f"{name} T={T}: skipped (time budget)")
                continue
            ids, w = simulate_routing(T, E, k, "uniform", seed=T, device="cuda")
            N = T * k
            default = plan_kernel.default_num_warps(max(plan_kernel.MIN_PAD, 1 << (N - 1).bit_length()))
            cells = []
            for nw in (1, 2, 4, 8):
                try:
                    t = time_cuda(build_fn(ids, w, E, "kernel", nw), use_graph=True, rep_ms=args.rep_ms).median_ms
                    cells.append(f"{nw}{'*' if nw == default else ' '}:{t * 1e3:6.1f}")
                    rows.append(dict(gpu=gpu, section="warps", preset=name, E=E, k=k, T=T, N=N,
                                     kernel_us=f"{t * 1e3:.1f}", num_warps=nw, status="ok"))
                except Exception as exc:
                    cells.append(f"{nw}: error")
                    rows.append(dict(gpu=gpu, section="warps", preset=name, E=E, k=k, T=T, N=N, num_warps=nw,
                                     status="error", note=f"{type(exc).__name__}: {exc}"))
            say(f"{name:<14} T={T:<4} N={N:<5} " + "  ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random", type=int, default=200, help="random routings checked against the torch path")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    ap.add_argument("--rep-ms", type=float, default=50.0, help="timed replays per row, in ms of GPU time")
    ap.add_argument("--no-warps-sweep", action="store_true")
    ap.add_argument("--budget-s", type=float, default=45.0, help="skip the remaining timings after this long")
    ap.add_argument("--multi-rows", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536],
                    help="N = T*k of the multi-CTA checks and timings")
    ap.add_argument("--multi-budget-s", type=float, default=240.0,
                    help="skip the remaining multi-CTA timings after this long (from the start of that phase)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--multi-only", action="store_true", help="only the multi-CTA phase (4)")
    which.add_argument("--no-multi", action="store_true", help="skip the multi-CTA phase (4)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        say("needs a CUDA GPU")
        return 2
    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    import triton

    say(f"{gpu}  torch {torch.__version__}  triton {triton.__version__}  moe_tut {moe_tut.__version__}")
    rows: list[dict] = []
    failures = 0
    if not args.multi_only:
        failures += correctness(args, rows, gpu)
        timing(args, rows, gpu, t_start)
        if not args.no_warps_sweep:
            warps_sweep(args, rows, gpu, t_start)
    if not args.no_multi:
        failures += multi_correctness(args, rows, gpu)
        multi_timing(args, rows, gpu)
    say(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    out = os.environ.get("OUT")
    if out:
        say(f"wrote {write_csv(os.path.join(out, 'plan_check.csv'), rows, COLUMNS)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
