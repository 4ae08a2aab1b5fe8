"""`python -m moe_tut.bench` / `moe-bench`: benchmark every backend on one MoE forward.

    python -m moe_tut.bench --config mixtral --batch 4 --seq 256      # T = 1024
    python -m moe_tut.bench --config mixtral --batch 16 --seq 512     # T = 8192
    python -m moe_tut.bench --full                                    # every preset that fits
    python -m moe_tut.bench --config deepseek-v3 --tokens 1 16 128 1024 8192 --skew zipf
    python -m moe_tut.bench --E 16 --H 1024 --F 2816 --top-k 2 --tokens 256   # a custom shape

Expert parallelism (moe_tut.distributed): the same forward with the experts split over N ranks,
--tokens being the global T split over them; one process per rank, started by torchrun:

    torchrun --nproc-per-node 2 -m moe_tut.bench --expert-parallel --config deepseek-v3 --tokens 8192
    torchrun --nproc-per-node 2 -m moe_tut.bench --expert-parallel --config debug --tokens 64   # CPU: gloo
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch

from .. import env
from ..backends import default_backends, get_backend, list_backends
from ..presets import FULL_SWEEP, PRESETS, MoEConfig, UnknownPresetError, get_preset
from ..routing import parse_skew
from ..weights import ExpertWeights
from .ceilings import measure_ceilings
from .harness import Row, run_point
from .memory import InsufficientMemoryError, check_fits
from .results import format_table, metadata, write_results
from .timing import L2_FLUSH_ENV, L2_FLUSH_MODES, l2_flush_mode

CPU_DEFAULT_TOKENS = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moe_tut.bench",
        description="Time one MoE forward (grouping, both expert GEMMs, SwiGLU, weighted combine) for every "
                    "backend on the same inputs, against the measured roofline of this device.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets: " + ", ".join(PRESETS) + "\nbackends: " + ", ".join(list_backends()),
    )
    p.add_argument("--config", help="preset name (default: mixtral on a GPU, debug on the CPU)")
    p.add_argument("--batch", type=int, help="batch size B; T = B * S (default 4 on a GPU)")
    p.add_argument("--seq", type=int, help="sequence length S; T = B * S (default 256 on a GPU)")
    p.add_argument("--tokens", type=int, nargs="+", metavar="T", help="token counts to sweep (overrides --batch/--seq)")
    p.add_argument("--full", action="store_true", help="all presets (" + ", ".join(FULL_SWEEP) + "), skipping "
                   "with the reason any that do not fit this device")
    p.add_argument("--backends", help="comma-separated backends (default: " + ",".join(default_backends()) + ")")
    p.add_argument("--skew", default="uniform", help="routing skew: uniform, zipf[:alpha], hot, all_to_one")
    p.add_argument("--E", type=int, help="override / custom: number of experts")
    p.add_argument("--H", type=int, help="override / custom: hidden size")
    p.add_argument("--F", type=int, help="override / custom: expert FFN size")
    p.add_argument("--top-k", type=int, dest="top_k", help="override / custom: experts per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out"), help="directory for CSV, JSON metadata and plots")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--l2-flush", choices=L2_FLUSH_MODES, help="how L2 is made cold before each timed GPU call: "
                   "read a 256 MB buffer (default) or zero one as triton's do_bench does (sets MOE_TUT_L2_FLUSH; "
                   "see moe_tut/bench/timing.py)")
    p.add_argument("--list", action="store_true", help="list presets and backends (with availability) and exit")
    ep = p.add_argument_group("expert parallelism (run under torchrun, one process per rank)")
    ep.add_argument("--expert-parallel", action="store_true",
                    help="split the experts over the torchrun ranks (NCCL on GPUs, gloo on CPUs); --tokens is the "
                         "global T, split over the ranks; default backend: triton on GPUs, grouped_mm on CPUs")
    ep.add_argument("--reps", type=int, help="timed forwards per pass (default 20 on GPUs, 10 on CPUs)")
    ep.add_argument("--timeout", type=float, default=300.0,
                    help="seconds any collective may wait for a rank before it fails (default 300)")
    ep.add_argument("--no-single", action="store_true",
                    help="skip the single-device baseline (rank 0 running all experts) and the scaling columns")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _token_list(args, on_gpu: bool) -> list[int]:
    if args.tokens:
        tokens = args.tokens
    elif args.batch is None and args.seq is None and not on_gpu:
        tokens = [CPU_DEFAULT_TOKENS]
    else:
        tokens = [(args.batch or 4) * (args.seq or 256)]
    for name, value in (("--batch", args.batch), ("--seq", args.seq)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    bad = [t for t in tokens if t < 1]
    if bad:
        raise ValueError(f"token counts must be >= 1, got {bad}")
    return tokens


def _configs(args, on_gpu: bool) -> list[MoEConfig]:
    overrides = dict(E=args.E, H=args.H, F=args.F, top_k=args.top_k)
    if args.full:
        if args.config or any(v is not None for v in overrides.values()):
            raise ValueError("--full runs every preset; do not combine it with --config or shape overrides")
        return [get_preset(n) for n in FULL_SWEEP]
    if args.config is None and all(v is not None for v in overrides.values()):
        return [MoEConfig("custom", args.E, args.H, args.F, args.top_k)]
    name = args.config or ("mixtral" if on_gpu else "debug")
    return [get_preset(name).with_overrides(**overrides)]


def _print_list(device) -> None:
    print("presets:")
    for cfg in PRESETS.values():
        print(f"  {cfg.describe()}  - {cfg.note}")
    print("backends:")
    probe = get_preset("debug")
    for name in list_backends():
        b = get_backend(name)
        reason = b.unavailable(probe, device)
        print(f"  {name:12s} {b.description}" + (f"  [unavailable: {reason}]" if reason else ""))


def _expert_parallel(args, argv: list[str] | None) -> int:
    """--expert-parallel: validate the arguments (identically on every rank), then hand over to
    moe_tut.distributed.bench, which every rank runs."""
    import os

    quiet = os.environ.get("RANK", "0") != "0"  # argument errors are printed by rank 0 only
    on_gpu = env.has_cuda()
    try:
        if args.full or args.list:
            raise ValueError("--expert-parallel runs one preset; it does not combine with --full or --list")
        if args.reps is not None and args.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {args.reps}")
        if args.timeout <= 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
        parse_skew(args.skew)
        tokens = _token_list(args, on_gpu)
        cfg = _configs(args, on_gpu)[0]
        backends = args.backends.split(",") if args.backends else ["triton" if on_gpu else "grouped_mm"]
        for b in backends:
            get_backend(b)
    except (UnknownPresetError, ValueError) as exc:
        return 2 if quiet else _fail(str(exc))
    from ..distributed.bench import run_expert_parallel

    argv = sys.argv[1:] if argv is None else argv
    world = os.environ.get("WORLD_SIZE")
    launcher = f"torchrun --nproc-per-node {world}" if world else "python"
    command = f"{launcher} -m moe_tut.bench " + " ".join(shlex.quote(a) for a in argv)
    return run_expert_parallel(cfg, tokens, backends, skew=args.skew, seed=args.seed, out_dir=args.out,
                               reps=args.reps, timeout_s=args.timeout, single=not args.no_single,
                               plots=not args.no_plots, command=command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.l2_flush:
        os.environ[L2_FLUSH_ENV] = args.l2_flush
    if args.expert_parallel:
        return _expert_parallel(args, argv)
    device = env.default_device()
    on_gpu = device.type == "cuda"
    if args.list:
        _print_list(device)
        return 0
    try:
        parse_skew(args.skew)
        tokens = _token_list(args, on_gpu)
        configs = _configs(args, on_gpu)
        backends = args.backends.split(",") if args.backends else default_backends()
        for b in backends:
            get_backend(b)
    except (UnknownPresetError, ValueError) as exc:
        return _fail(str(exc))

    info = env.device_info()
    print(f"device: {info.summary()}")
    if not on_gpu:
        print("NOTE: no CUDA GPU. These are CPU correctness runs (Triton under its interpreter); "
              "their times are not GPU performance.")
    runnable, skipped = [], []
    for cfg in configs:
        try:
            check_fits(cfg, tokens, device)
            runnable.append(cfg)
        except InsufficientMemoryError as exc:
            skipped.append((cfg, str(exc)))
    if args.full and not on_gpu:
        runnable.append(get_preset("debug"))
    if not runnable:
        return _fail("nothing to run: " + "; ".join(why for _, why in skipped))
    for cfg, why in skipped:
        print(f"skipping {cfg.name}: {why}")

    print("measuring ceilings (dense bf16 GEMM, device copy)...", flush=True)
    ceilings = measure_ceilings(device)
    print(f"ceilings on this device: {ceilings.gemm_tflops:.3g} TFLOP/s bf16 GEMM ({ceilings.gemm_size}^3), "
          f"{ceilings.copy_gbps:.3g} GB/s copy (read + write)")
    if on_gpu:
        print(f"timing: L2 made cold before each call by a {l2_flush_mode()} of 256 MB (--l2-flush)")

    rows: list[Row] = []
    from tqdm.auto import tqdm

    total = len(runnable) * len(tokens) * len(backends)
    with tqdm(total=total, desc="benchmark", unit="row", file=sys.stderr) as bar:
        for cfg in runnable:
            weights = ExpertWeights.random(cfg, device=device, seed=args.seed)
            prepared = {}  # INT4 weights quantised once per preset, not once per (T, backend)
            for T in tokens:
                rows += run_point(cfg, T, weights, backends, ceilings, skew=args.skew, seed=args.seed,
                                  progress=bar.set_postfix_str, prepared_cache=prepared)
                bar.update(len(backends))
            del weights, prepared
            if on_gpu:
                torch.cuda.empty_cache()

    print()
    print(format_table(rows))
    if not on_gpu:
        print("\n(CPU correctness run: times are not GPU performance)")
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m moe_tut.bench " + " ".join(shlex.quote(a) for a in argv)
    meta = metadata(info, ceilings, command, {"skew": args.skew, "tokens": tokens, "seed": args.seed,
                                              "skipped_presets": {c.name: why for c, why in skipped}})
    csv_path, json_path = write_results(rows, meta, args.out)
    print(f"\nwrote {csv_path} and {json_path}")
    if not args.no_plots:
        _write_plots(rows, args.out, tokens)
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        print(f"{len(failed)} backend row(s) FAILED their correctness check: "
              + ", ".join(f"{r.config}/T={r.T}/{r.backend}" for r in failed), file=sys.stderr)
        return 1
    return 0


def _write_plots(rows: list[Row], out_dir: Path, tokens: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..plots import plot_backend_bars, plot_latency_vs_tokens

    for cfg in dict.fromkeys(r.config for r in rows):
        if len(tokens) > 1:
            fig = plot_latency_vs_tokens(rows, cfg)
        else:
            fig = plot_backend_bars([r for r in rows if r.config == cfg], title=f"{cfg}, T={tokens[0]}: ms")
        path = Path(out_dir) / f"moe_bench_{cfg}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {path}")
