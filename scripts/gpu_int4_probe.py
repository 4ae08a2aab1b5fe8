#!/usr/bin/env python3
"""GPU probe: where the Triton INT4 decode time goes, GEMM by GEMM.

    python scripts/gpu_int4_probe.py [--presets mixtral deepseek-v3] [--tokens 1 16]

Times GEMM1 (gather + gate/up + SwiGLU) and GEMM2 (down + routing weight + scatter) of the decode path
apart (int4_grouped_gemm with the decode tile 16x64x128, 4 warps, 4 stages; CUDA-graph replay, L2
flushed), for these kernel variants (int4_gemm.Int4Variant):

    pms        magic + post-scale + split, one program per tile (the current default)
    asm        pms with the inline-PTX unpack
    pipe       pms with scales read as int32 words in the step that uses them
    pms-bcast  pms on scales with group stride 0 (every K step reads the same scales: L1 hits). Not a
               correct result; a probe: if the one-step-ahead scale loads (a memory latency per K step)
               bound the loop, this row is much faster than pms
    pms-s8     pms with 8 pipeline stages

Each row: ms, packed GB/s (codes the GEMM reads / time) and % of the copy bandwidth measured here.
Correctness of the real variants is checked against the dequantised reference first (forward, T=16).
Writes int4_probe.csv under $OUT.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import torch

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset, relative_error, simulate_routing
from moe_tut.bench.ceilings import measure_copy_gbps
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import time_cuda
from moe_tut.kernels import int4_gemm as ig
from moe_tut.kernels.grouped_gemm import TileConfig
from moe_tut.quant import QuantizedTensor

PMS = ig.Int4Variant(magic=True, post_scale=True, split=True, programs_per_sm=64)
VARIANTS = {
    "pms": (PMS, "16,64,128,8,4,4", False),
    "asm": (replace(PMS, asm=True), "16,64,128,8,4,4", False),
    "pipe": (replace(PMS, pipe_scales=True), "16,64,128,8,4,4", False),
    "asm-pipe": (replace(PMS, asm=True, pipe_scales=True), "16,64,128,8,4,4", False),
    "pms-bcast": (PMS, "16,64,128,8,4,4", True),
    "pms-s8": (PMS, "16,64,128,8,4,8", False),
    "asm-bcast": (replace(PMS, asm=True), "16,64,128,8,4,4", True),
}
FIELDS = ["preset", "T", "gemm", "variant", "switches", "config", "ms", "packed_gbps", "pct_copy", "rel_err", "note",
          "gpu", "copy_gbps"]


def log(*a):
    print(*a, flush=True)


def bcast(qt: QuantizedTensor) -> QuantizedTensor:
    """The same codes with every group's scales = group 0's (stride 0 along groups)."""
    s = qt.scales[:, :1].expand_as(qt.scales)
    z = None if qt.zeros is None else qt.zeros[:, :1].expand_as(qt.zeros)
    return QuantizedTensor(qt.packed, s, z, qt.group_size, qt.symmetric, qt.shape)


def gemm_call(gemm: str, a, qt, plan, out, variant, config):
    """A zero-argument call of one decode GEMM as the forward runs it."""
    if gemm == "gemm1":
        return lambda: ig.int4_grouped_gemm(a, qt, plan, out, gather_rows=True, swiglu=True, config=config,
                                            variant=variant)
    return lambda: ig.int4_grouped_gemm(a, qt, plan, out, scale_rows=True, scatter_rows=True, config=config,
                                        variant=variant)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek-v3"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = "cuda"
    gpu = torch.cuda.get_device_name()
    copy_gbps = measure_copy_gbps(dev, 1 << 30)
    log(f"{gpu}: copy {copy_gbps:.0f} GB/s")
    rows, failed = [], 0
    path = os.path.join(args.out, "int4_probe.csv")

    # correctness of the real variants (forward, mid shape, both symmetric modes)
    for symmetric in (True, False):
        cfg = moe_tut.custom(8, 1024, 2048, 2)
        w = ExpertWeights.random(cfg, device=dev)
        q = moe_tut.get_backend("triton_int4").prepare(w) if symmetric else None
        if q is None:
            from moe_tut.quant import Int4ExpertWeights
            q = Int4ExpertWeights.from_bf16(w, symmetric=False)
        for T in (1, 16, 200):
            ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "zipf", seed=T, device=dev)
            x = torch.randn(T, cfg.H, device=dev, dtype=torch.bfloat16)
            plan = RoutingPlan.build(ids, tw, cfg.E)
            ref = ig.int4_moe_reference(x, q, ids, tw)
            for name, (v, c, is_bcast) in VARIANTS.items():
                if is_bcast:
                    continue
                y = ig.moe_forward_triton_int4(x, q, plan, variant=v, config=TileConfig.parse(c), path="decode")
                err = relative_error(y, ref)
                ok = err < 1e-2
                failed += not ok
                log(f"check sym={symmetric} T={T} {name}: rel err {err:.2e} {'ok' if ok else 'FAILED'}")
                rows.append(dict(preset="custom-8-1024-2048", T=T, gemm="forward", variant=name, switches=v.label(),
                                 config=c, rel_err=f"{err:.2e}", note=f"symmetric={symmetric}: "
                                 + ("ok" if ok else "FAILED"), gpu=gpu, copy_gbps=f"{copy_gbps:.0f}"))

    for preset in args.presets:
        cfg = get_preset(preset)
        w = ExpertWeights.random(cfg, device=dev)
        q = moe_tut.get_backend("triton_int4").prepare(w)
        del w
        qb13, qb2 = bcast(q.w13), bcast(q.w2)
        for T in args.tokens:
            ids, tw = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0, device=dev)
            x = torch.randn(T, cfg.H, device=dev, dtype=torch.bfloat16)
            plan = RoutingPlan.build(ids, tw, cfg.E)
            active = int((plan.expert_counts > 0).sum())
            rows_n = plan.num_rows
            act = torch.randn(rows_n, cfg.F, device=dev, dtype=torch.bfloat16)
            out1 = torch.empty(rows_n, cfg.F, device=dev, dtype=torch.bfloat16)
            out2 = torch.empty(rows_n, cfg.H, device=dev, dtype=torch.bfloat16)
            gemms = {"gemm1": (x, out1, q.w13, qb13), "gemm2": (act, out2, q.w2, qb2)}
            for gname, (a, out, qt, qtb) in gemms.items():
                nbytes = active * qt.packed[0].numel()
                for name, (v, c, is_bcast) in VARIANTS.items():
                    fn = gemm_call(gname, a, qtb if is_bcast else qt, plan, out, v, TileConfig.parse(c))
                    t0 = time.time()
                    fn()
                    torch.cuda.synchronize()
                    first = time.time() - t0
                    t = time_cuda(fn, use_graph=True, warmup_ms=10, rep_ms=40)
                    gbps = nbytes / (t.median_ms * 1e-3) / 1e9
                    rows.append(dict(preset=preset, T=T, gemm=gname, variant=name, switches=v.label(), config=c,
                                     ms=f"{t.median_ms:.4f}", packed_gbps=f"{gbps:.0f}",
                                     pct_copy=f"{100 * gbps / copy_gbps:.1f}",
                                     note=("probe: wrong scales on purpose; " if is_bcast else "")
                                     + f"first call {first:.1f} s",
                                     gpu=gpu, copy_gbps=f"{copy_gbps:.0f}"))
                    log(f"{preset:<12} T={T:<4} {gname} {name:<10} {t.median_ms:8.4f} ms {gbps:6.0f} GB/s "
                        f"{100 * gbps / copy_gbps:5.1f}%")
            write_csv(path, rows, FIELDS)
        del q, qb13, qb2
        torch.cuda.empty_cache()
    write_csv(path, rows, FIELDS)
    log(f"wrote {path}; {failed} correctness failures")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
