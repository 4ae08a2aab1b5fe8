#!/usr/bin/env python3
"""Where a T = 1 forward's time goes: kernel by kernel, and the gaps between them, under CUDA-graph replay.

    python scripts/gpu_decode_breakdown.py [--presets glm-4.5 mixtral] [--backends triton cuda_int4] [--tokens 1]
    python scripts/gpu_decode_breakdown.py --sweep glm-4.5 qwen3-30b-a3b     # + bf16 decode tiles pinned

Part 1 (breakdown): for each preset, T and backend, the harness's timed function (RoutingPlan.build + the
backend's forward) is captured in a CUDA graph and replayed 30 times under torch.profiler, each replay after an L2
flush (moe_tut.bench.timing.l2_flusher, mode from MOE_TUT_L2_FLUSH). Per replay: each kernel's duration, the span
from the first kernel's start to the last kernel's end, and span - sum of kernels (time with no kernel running:
launch gaps inside the graph). Averages over the replays are printed; the flush kernels are left out.
With programmatic dependent launch (sm_90, MOE_TUT_PDL unset or 1) a kernel starts before the previous one ends and
waits inside, so its duration includes that wait and the gaps come out negative; MOE_TUT_PDL=0 gives a per-kernel split.

Part 2 (--sweep PRESET...): the bf16 `triton` forward at each --tokens with GEMM1 / GEMM2 decode tiles pinned
(MOE_TUT_TRITON_CONFIG / MOE_TUT_TRITON_CONFIG2), each checked against the float32 reference (relative error
<= 2e-2, else not timed) and timed as the harness does (time_cuda, graph replay, cold L2).
Writes decode_breakdown.csv (and decode_sweep.csv) under --out or $OUT.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset, moe_reference, relative_error
from moe_tut.bench.harness import make_inputs, timed_forward
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import capture_graph, l2_flush_mode, l2_flusher, time_cuda
from moe_tut.kernels import grouped_gemm as gg

REPLAYS = 30
# (GEMM1 tile, GEMM2 tile) as "BM,BN,BK,GROUP_M,warps,stages"; the first is what the fast path picked on an H100
# for these decode shapes when this sweep ran (get_decode_configs: 16x64x128, 4 warps, 4 stages; 3 stages since
# session 18).
SWEEP = [
    ("16,64,128,8,4,4", "16,64,128,8,4,4"),
    ("16,32,128,8,4,4", "16,64,128,8,4,4"),
    ("16,16,128,8,4,4", "16,64,128,8,4,4"),
    ("16,32,256,8,4,3", "16,64,128,8,4,4"),
    ("16,64,128,8,4,6", "16,64,128,8,4,4"),
    ("16,64,128,8,4,4", "16,32,128,8,4,4"),
    ("16,64,128,8,4,4", "16,128,128,8,4,4"),
    ("16,64,128,8,4,4", "16,64,256,8,4,3"),
]


def kernel_events(prof) -> list:
    return sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)


def breakdown(fn, flush) -> dict:
    fn()
    torch.cuda.synchronize()
    graph, _ = capture_graph(fn)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the flush kernel's name, to leave it out
        flush()
        torch.cuda.synchronize()
    flush_names = {e.name for e in kernel_events(prof)}
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    replays = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            flush()
            graph.replay()
        torch.cuda.synchronize()
    current: list = []
    for e in kernel_events(prof):
        if e.name in flush_names:
            if current:
                replays.append(current)
            current = []
        else:
            current.append(e)
    if current:
        replays.append(current)
    per_kernel: dict[str, list[float]] = {}
    spans, sums = [], []
    for r in replays:
        spans.append(r[-1].time_range.end - r[0].time_range.start)
        sums.append(sum(e.time_range.elapsed_us() for e in r))
        for i, e in enumerate(r):
            per_kernel.setdefault(f"{i}:{e.name[:60]}", []).append(e.time_range.elapsed_us())
    return dict(replays=len(replays), span_us=statistics.median(spans), kernels_us=statistics.median(sums),
                per_kernel={k: statistics.median(v) for k, v in per_kernel.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3", "glm-4.5", "qwen3-30b-a3b"])
    ap.add_argument("--backends", nargs="+", default=["triton", "triton_int4", "cuda_int4"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1])
    ap.add_argument("--sweep", nargs="*", default=[], help="presets for the bf16 decode tile sweep")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    flush = l2_flusher()
    print(f"{torch.cuda.get_device_name(dev)}; L2 flush {l2_flush_mode()!r}", flush=True)
    rows, sweep_rows = [], []
    for name in dict.fromkeys(args.presets + args.sweep):
        cfg = get_preset(name)
        weights = ExpertWeights.random(cfg, device=dev, seed=0)
        for T in args.tokens:
            x, ids, tw = make_inputs(cfg, T, "uniform", dev)
            if name in args.presets:
                for bname in args.backends:
                    backend = moe_tut.get_backend(bname)
                    reason = backend.unavailable(cfg, dev)
                    if reason:
                        print(f"{name} T={T} {bname}: unavailable ({reason})")
                        continue
                    prepared = backend.prepare(weights)
                    b = breakdown(timed_forward(backend, x, prepared, ids, tw, cfg.E), flush)
                    print(f"== {name} T={T} {bname}: span {b['span_us']:.1f} us, kernels {b['kernels_us']:.1f} us, "
                          f"gaps {b['span_us'] - b['kernels_us']:.1f} us ({b['replays']} replays)", flush=True)
                    for k, us in b["per_kernel"].items():
                        print(f"   {us:7.1f} us  {k}")
                        rows.append(dict(preset=name, T=T, backend=bname, kernel=k, us=round(us, 2),
                                         span_us=round(b["span_us"], 2), kernels_us=round(b["kernels_us"], 2)))
                    del prepared
            if name in args.sweep:
                ref = moe_reference(x, weights, ids, tw)
                plan = RoutingPlan.build(ids, tw, cfg.E)
                for c1, c2 in SWEEP:
                    os.environ[gg.CONFIG_ENV], os.environ[gg.CONFIG2_ENV] = c1, c2
                    try:
                        triton_backend = moe_tut.get_backend("triton")
                        err = relative_error(triton_backend(x, weights, plan), ref)
                        if not err <= 2e-2:
                            print(f"   sweep {name} T={T} {c1} / {c2}: FAILED rel err {err:.3g}")
                            continue
                        tm = time_cuda(timed_forward(triton_backend, x, weights, ids, tw, cfg.E), use_graph=True)
                    finally:
                        del os.environ[gg.CONFIG_ENV], os.environ[gg.CONFIG2_ENV]
                    print(f"   sweep {name} T={T} gemm1 {c1:18s} gemm2 {c2:18s} {tm.median_ms * 1e3:7.1f} us "
                          f"(p20 {tm.p20_ms * 1e3:.1f}, p80 {tm.p80_ms * 1e3:.1f})", flush=True)
                    sweep_rows.append(dict(preset=name, T=T, gemm1=c1, gemm2=c2, median_us=round(tm.median_ms * 1e3, 2),
                                           rel_err=err))
        del weights
        torch.cuda.empty_cache()
    if args.out:
        print(f"wrote {write_csv(Path(args.out) / 'decode_breakdown.csv', rows)}")
        if sweep_rows:
            print(f"wrote {write_csv(Path(args.out) / 'decode_sweep.csv', sweep_rows)}")


if __name__ == "__main__":
    main()
