#!/usr/bin/env python3
"""A/B in one process: the bf16 fast path's decode tile rule (sm_fill) and the one-launch slot sum (sum_slots).

    python scripts/gpu_decode_tiles_check.py [--presets ...] [--tokens 1 2 16] [--prefill-tokens 8192]

Variants of moe_forward_triton (and of triton_int4 at the prefill points, whose slot sum changed the same way):
  before  the rule and the sum of the previous commit: DECODE_FILL_MARGIN = inf (64-wide decode tiles unless they
          leave SMs idle), and torch's out.view(T, k, H).sum(1)
  fill    DECODE_FILL_MARGIN as shipped, torch's sum
  sum     DECODE_FILL_MARGIN = inf, grouped_gemm.sum_slots
  new     both as shipped
Each is checked against the float32 reference (relative error <= 2e-2, else not timed), then timed as the harness
times a forward (RoutingPlan.build inside; time_cuda: cold L2 by MOE_TUT_L2_FLUSH, CUDA-graph replay for T <= 64),
in two passes of alternating order. Prints the tile widths each variant picked. Writes decode_tiles.csv under --out
or $OUT.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

import moe_tut
from moe_tut import ExpertWeights, RoutingPlan, get_preset, moe_reference, relative_error
from moe_tut.bench.harness import GRAPH_MAX_TOKENS, make_inputs, timed_forward
from moe_tut.bench.results import write_csv
from moe_tut.bench.timing import l2_flush_mode, time_cuda
from moe_tut.kernels import grouped_gemm as gg
from moe_tut.kernels import int4_gemm as ig

SHIPPED_MARGIN, SHIPPED_SUM = gg.DECODE_FILL_MARGIN, gg.sum_slots
VARIANTS = {"before": (math.inf, False), "fill": (SHIPPED_MARGIN, False), "sum": (math.inf, True),
            "new": (SHIPPED_MARGIN, True)}


def torch_sum_slots(part, num_tokens, top_k, like):
    """The previous slot sum: torch over [(S,) T, k, H], float32 inside, rounded once."""
    slices = part if part.dim() == 3 else part[None]
    return slices.view(slices.shape[0], num_tokens, top_k, -1).sum(dim=(0, 2), dtype=torch.float32).to(like.dtype)


def use(variant: str) -> None:
    margin, kernel_sum = VARIANTS[variant]
    gg.DECODE_FILL_MARGIN = margin
    gg._fast_path_configs.cache_clear()
    gg.sum_slots = ig.sum_slots = SHIPPED_SUM if kernel_sum else torch_sum_slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mixtral", "deepseek", "deepseek-v3", "glm-4.5", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 16])
    ap.add_argument("--prefill-tokens", nargs="+", type=int, default=[8192], help="mixtral only, triton + triton_int4")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}; L2 flush {l2_flush_mode()!r}", flush=True)
    rows = []
    points = [(p, T, ("triton",)) for p in args.presets for T in args.tokens]
    points += [("mixtral", T, ("triton", "triton_int4")) for T in args.prefill_tokens]
    weights_for = None
    for name, T, backends in points:
        cfg = get_preset(name)
        if weights_for != name:
            weights = prepared = None
            torch.cuda.empty_cache()
            weights, weights_for, prepared = ExpertWeights.random(cfg, device=dev, seed=0), name, {}
        x, ids, tw = make_inputs(cfg, T, "uniform", dev)
        ref = moe_reference(x, weights, ids, tw)
        plan = RoutingPlan.build(ids, tw, cfg.E)
        for bname in backends:
            backend = moe_tut.get_backend(bname)
            if bname not in prepared:
                prepared[bname] = backend.prepare(weights)
            w = prepared[bname]
            if backend.reference is not None:  # as the harness picks its tight reference
                tight = backend.reference(x, w, ids, tw)
            elif backend.dequantized is not None:
                tight = moe_reference(x, backend.dequantized(w), ids, tw)
            else:
                tight = ref
            for pass_, order in enumerate((list(VARIANTS), list(VARIANTS)[::-1])):
                for variant in order:
                    use(variant)
                    regime, c1, c2 = gg.fast_path_configs(x, weights, plan)
                    tiles = f"{regime} {c1[0].block_n}/{c2[0].block_n}" if regime == "decode" else regime
                    err = relative_error(backend(x, w, plan), tight)
                    if not err <= 2e-2:
                        print(f"{name} T={T} {bname} {variant}: FAILED rel err {err:.3g}", flush=True)
                        rows.append(dict(preset=name, T=T, backend=bname, variant=variant, pass_=pass_,
                                         status="failed", rel_err=err))
                        continue
                    tm = time_cuda(timed_forward(backend, x, w, ids, tw, cfg.E), use_graph=T <= GRAPH_MAX_TOKENS)
                    print(f"{name:14s} T={T:<5d} {bname:12s} {variant:7s} pass {pass_}  {tm.median_ms * 1e3:9.1f} us  "
                          f"tiles {tiles}  err {err:.2e}", flush=True)
                    rows.append(dict(preset=name, T=T, backend=bname, variant=variant, pass_=pass_, status="ok",
                                     tiles=tiles, median_us=round(tm.median_ms * 1e3, 2),
                                     p20_us=round(tm.p20_ms * 1e3, 2), p80_us=round(tm.p80_ms * 1e3, 2), rel_err=err))
    use("new")
    if args.out:
        print(f"wrote {write_csv(Path(args.out) / 'decode_tiles.csv', rows)}")


if __name__ == "__main__":
    main()
