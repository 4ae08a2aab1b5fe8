#!/usr/bin/env python3
"""One transformers MoE block: transformers' own experts implementations vs moe_tut backends patched in.

Blocks (built from transformers' config classes, bf16, on the GPU, random weights at std 1/sqrt(fan_in); only
the sparse-MoE block module, not a whole model):
    mixtral    MixtralSparseMoeBlock   H=4096, F=14336, E=8, top-2      (the `mixtral` preset)
    qwen3_moe  Qwen3MoeSparseMoeBlock  H=2048, F=768 (moe_intermediate_size), E=128, top-8  (`qwen3-30b-a3b`)
Tokens: T = 1 (decode) and T = 4096 (prefill); input [1, T, H].

Rows per (block, T), all from moe_tut.hf.compare_block in one process on the same block and input:
transformers' experts implementations `eager`, `grouped_mm`, `batched_mm` (config._experts_implementation, the
switch behind from_pretrained(..., experts_implementation=...)), then moe_tut `triton`, `grouped_mm`,
`triton_int4`, `cuda_int4` patched in with moe_tut.hf.patch_moe_experts (INT4: group 128, symmetric).
Each row is checked before it is timed, against the unpatched block with transformers' eager experts: bf16 rows
within 2e-2 relative error; INT4 rows within 2e-2 of the unpatched block running the same dequantised weights,
and within a loose bound (0.5, moe_tut.hf.INT4_LOOSE_TOL) of the bf16 block. A row that fails is reported as
FAIL and not timed. The timed unit is the whole block forward (router + experts), i.e. what a model's layer runs.

Timing: moe_tut.bench.timing.time_cuda (CUDA events, L2 flushed before each call, median). At T = 1 the rows
without a host sync are timed by CUDA-graph replay (transformers grouped_mm and batched_mm; every moe_tut
backend here); transformers eager (nonzero + a Python loop over experts) is timed with events. The CSV's
`timing` column says which method each row used (and why, if a capture failed).

Time: the first call of each Triton kernel compiles and autotunes, and cuda_int4 is built on first use (about
a minute; started in a background thread at launch, cached under ~/.cache/moe_tut). --budget-s (default 170)
is checked before each row: rows that would start later are reported as `skipped`, so the run stays within
about 3 minutes on an H100 (a row already running finishes first).

Writes hf_bench.csv and hf_bench.json (GPU, torch / triton / transformers versions, git commit (or
$MOE_TUT_GIT_COMMIT), command, date, elapsed) under $OUT, or --out (default out/hf_bench); prints the table.
Exit status: 0 when every row passed or was skipped, 1 if any row FAILed its correctness check, 2 without a GPU
(unless --smoke).

    python scripts/gpu_hf_bench.py
    python scripts/gpu_hf_bench.py --blocks mixtral --tokens 1 --backends triton,triton_int4
    python scripts/gpu_hf_bench.py --smoke       # tiny blocks, any device (CPU: Triton's interpreter); plumbing only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

import moe_tut
import moe_tut.hf as mhf
from moe_tut.bench.results import git_commit, write_csv
from moe_tut.presets import custom, get_preset

BLOCKS = {"mixtral": "mixtral", "qwen3_moe": "qwen3-30b-a3b"}  # architecture -> preset with its shape
SMOKE_SHAPES = {"mixtral": custom(4, 128, 256, 2, name="smoke-mixtral"),
                "qwen3_moe": custom(8, 128, 128, 4, name="smoke-qwen3")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--blocks", default=",".join(BLOCKS), help="comma-separated: " + ", ".join(BLOCKS))
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default 1 4096; smoke: 1 8)")
    p.add_argument("--backends", default=",".join(mhf.BLOCK_BACKENDS), help="moe_tut backends to patch in")
    p.add_argument("--hf-impls", default=",".join(mhf.HF_IMPLEMENTATIONS), help="transformers experts implementations")
    p.add_argument("--group-size", type=int, default=128, help="INT4 group size")
    p.add_argument("--budget-s", type=float, default=170.0, help="no row starts after this many seconds")
    p.add_argument("--out", default=None, help="output directory (default $OUT, else out/hf_bench)")
    p.add_argument("--smoke", action="store_true", help="tiny blocks on any device, to check the script itself")
    return p.parse_args(argv)


def prebuild_cuda_int4() -> threading.Thread:
    """Build (or load) the cuda_int4 extension in the background; its lock makes the first use wait for it."""
    from moe_tut.backends import cuda_int4
    from moe_tut.backends.base import BackendUnavailable

    def build():
        try:
            cuda_int4.load_extension()
        except BackendUnavailable:
            pass  # the reason is kept; the cuda_int4 rows report it as `skipped`

    thread = threading.Thread(target=build, name="cuda_int4-build", daemon=True)
    thread.start()
    return thread


def versions() -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "transformers": transformers.__version__, "moe_tut": moe_tut.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        print("no CUDA GPU here: this benchmark needs one (use --smoke to check the script on the CPU)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if on_gpu else "cpu")
    mhf.require_transformers()
    archs = [a for a in args.blocks.split(",") if a]
    unknown = [a for a in archs if a not in BLOCKS]
    if unknown:
        print(f"unknown block(s) {unknown}; choose from {', '.join(BLOCKS)}", file=sys.stderr)
        return 2
    backends = [b for b in args.backends.split(",") if b]
    hf_impls = [i for i in args.hf_impls.split(",") if i]
    tokens = args.tokens or ([1, 8] if args.smoke else [1, 4096])
    if "cuda_int4" in backends and on_gpu:
        prebuild_cuda_int4()
    out_dir = Path(args.out or os.environ.get("OUT") or "out/hf_bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter: correctness only)"
    print(f"device: {gpu}; {', '.join(f'{k} {v}' for k, v in versions().items())}", flush=True)

    rows: list[dict] = []
    shapes = {}
    for arch in archs:
        cfg = SMOKE_SHAPES[arch] if args.smoke else get_preset(BLOCKS[arch])
        shapes[arch] = dict(preset=cfg.name, E=cfg.E, H=cfg.H, F=cfg.F, top_k=cfg.top_k)
        if time.monotonic() > deadline:
            rows += [mhf.make_row(arch=arch, T=T, implementation=name, status="skipped", reason="time budget spent")
                     for T in tokens for name in [f"transformers {i}" for i in hf_impls] +
                     [f"moe_tut {b}" for b in backends]]
            continue
        print(f"\n{arch} block, {cfg.name} shape: E={cfg.E} H={cfg.H} F={cfg.F} top-{cfg.top_k}; T = {tokens}",
              flush=True)
        block = mhf.build_moe_block(arch, cfg, device=device)

        def progress(r):
            ms = f"{r['median_ms']:.3f} ms" if r["status"] == "ok" else ""
            print(f"  T={r['T']:<5} {r['implementation']:<26} {r['status']:<8} {ms:>12}  rel err {r['rel_err']:.1e}"
                  f"  [{time.monotonic() - start:.0f} s] {r['reason']}", flush=True)

        rows += mhf.compare_block(block, tokens, backends, hf_impls, group_size=args.group_size, deadline=deadline,
                                  progress=progress)
        del block
        if on_gpu:
            torch.cuda.empty_cache()
    elapsed = time.monotonic() - start

    keys = list(mhf.ROW_KEYS)
    write_csv(out_dir / "hf_bench.csv", [{**r, "gpu": gpu} for r in rows], keys + ["gpu"])
    failed = [r for r in rows if r["status"] == "FAIL"]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        "gpu": gpu,
        "versions": versions(),
        "blocks": shapes,
        "tokens": tokens,
        "backends": backends,
        "hf_implementations": hf_impls,
        "int4_group_size": args.group_size,
        "tolerances": {"bf16_rel_err": mhf.BF16_TOL, "int4_vs_dequantised": mhf.BF16_TOL,
                       "int4_vs_bf16_bound": mhf.INT4_LOOSE_TOL},
        "timing": "whole block forward; CUDA events, L2 flushed, median; CUDA-graph replay at T <= "
                  f"{mhf.GRAPH_MAX_TOKENS} for rows without host syncs (see the CSV's timing column)",
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "elapsed_s": round(elapsed, 1),
        "rows": len(rows),
        "failed": len(failed),
        "skipped": sum(r["status"] == "skipped" for r in rows),
    }
    (out_dir / "hf_bench.json").write_text(json.dumps(meta, indent=2) + "\n")
    print()
    print(mhf.format_rows(rows))
    print(f"\nwrote {out_dir / 'hf_bench.csv'} and {out_dir / 'hf_bench.json'} ({elapsed:.0f} s)")
    if failed:
        print(f"{len(failed)} row(s) FAILED their correctness check", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
