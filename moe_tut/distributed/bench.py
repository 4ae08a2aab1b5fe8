"""The expert-parallel benchmark: what every rank runs under
`torchrun --nproc-per-node N -m moe_tut.bench --expert-parallel --config deepseek-v3 --tokens 8192`.

--tokens is the *global* T, split over the N ranks with `token_slice`. Per T and backend:

1. Inputs. Every rank draws the same global routing (simulate_routing draws on the CPU, so it is the
   same everywhere) and receives rank 0's x by broadcast, then keeps its own tokens. Each rank draws
   only its own experts (random_expert_weights: expert e's values depend on (seed, e) alone).
2. Correctness, before any timing. A float32 reference that needs no rank to hold all experts: each
   rank computes the contribution of its own experts to *every* token straight from topk_ids
   (partial_reference), and an all_reduce sums them into the full reference. Each rank compares its
   expert-parallel output rows with it; the error over all tokens (all_reduced sums of squares) must
   be below the harness's tolerance, or the row is reported failed and not timed. INT4 backends are
   checked against a reference built from their own dequantised weights (tight) and, reported
   separately, against the bf16 weights.
3. Timing, two passes of `reps` forwards each after warm-up (the first call compiles Triton kernels):
     end to end   barrier, then one forward exactly as a model runs it; per rank, its own time
     phased       barrier, dispatch, barrier, compute, barrier, combine: each stage starts together
                  on every rank, so a stage's time is its own and not time spent waiting for a slower
                  rank's previous stage. dispatch = sort + count exchange + row all_to_all; compute =
                  RoutingPlan + the backend; combine = all_to_all back + un-permute + weighted sum.
   GPU: CUDA events on the current stream (PyTorch makes it wait for NCCL's), synchronised after each
   pass, L2 made cold before each forward as in moe_tut.bench.timing (the mode, MOE_TUT_L2_FLUSH or
   --l2-flush, is each row's l2_flush and the JSON's). CPU: perf_counter (correctness
   runs, not GPU performance). The layer's time per repetition is that of its slowest rank; the
   "all" row reports the median over repetitions of that maximum (stage by stage for the split).
4. Scaling: after every expert-parallel run, the ranks free their shards and rank 0 runs the plain
   single-device forward (the backend on all E experts, no torch.distributed) on the same global x
   and routing, timed with moe_tut.bench.timing (events, cold L2; not CUDA graphs, which the
   expert-parallel forward cannot use: its dispatch syncs with the host). If all E experts do not fit
   one device, that row says so instead. It also compares the gathered expert-parallel output with
   the single-device output.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from .. import env
from ..backends import get_backend
from ..bench.harness import TOLERANCE, make_inputs, timed_forward
from ..bench.memory import InsufficientMemoryError, check_fits
from ..bench.results import format_cell, git_commit, render_table, write_results
from ..bench.timing import l2_flush_mode, l2_flusher, time_call
from ..presets import MoEConfig
from ..reference import relative_error
from ..routing import RoutingPlan
from .expert_parallel import (
    DistContext,
    ExpertParallelError,
    ExpertParallelMoE,
    agree,
    barrier,
    expert_range,
    init_distributed,
    local_error,
    partial_reference,
    random_expert_weights,
    token_slice,
)

GB = 1e9
DEFAULT_REPS_GPU = 20
DEFAULT_REPS_CPU = 10  # CPU times are noisy; a debug-preset forward takes a few ms
WARMUP = 2
RESULTS_STEM = "moe_ep_bench"
# NCCL settings recorded with every result (they change how NCCL moves the bytes).
RECORDED_ENV = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE",
                "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


@dataclass
class EPRow:
    """One row of the expert-parallel results. scope: "rank" (one rank's own numbers), "all" (the
    layer over all ranks: per repetition the slowest rank), "single" (one device, no expert parallelism)."""

    config: str
    T: int  # global tokens
    skew: str
    backend: str
    world_size: int
    scope: str
    rank: int  # -1 for "all" and "single"
    status: str  # ok, failed, skipped, unavailable
    reason: str = ""
    timing: str = ""
    l2_flush: str = ""  # GPU: how L2 was made cold before each forward (moe_tut.bench.timing.L2_FLUSH_MODES); CPU: ""
    device: str = ""
    dist_backend: str = ""
    tokens: int = 0  # tokens on this rank (T for "all" and "single")
    local_experts: int = 0
    active_local_experts: int = 0
    rows_sent: int = 0  # rows this rank sends in the dispatch (= tokens * top_k)
    rows_received: int = 0  # rows it receives (and computes, and sends back in the combine)
    dispatch_mb: float = math.nan  # MB this rank sends in the dispatch
    total_ms: float = math.nan  # one forward, end to end, median
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    dispatch_ms: float = math.nan
    compute_ms: float = math.nan
    combine_ms: float = math.nan
    comm_fraction: float = math.nan  # (dispatch + combine) / (dispatch + compute + combine)
    speedup_vs_single: float = math.nan
    efficiency: float = math.nan  # speedup / world size
    rel_err: float = math.nan  # vs the float32 reference (INT4: of its dequantised weights)
    rel_err_vs_bf16: float = math.nan  # INT4 only: vs the bf16 weights' reference
    rel_err_vs_single: float = math.nan  # the gathered expert-parallel output vs the single-device output
    weight_gb: float = math.nan  # expert weights this rank holds (as the backend prepared them)
    E: int = 0
    H: int = 0
    F: int = 0
    top_k: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


COLUMNS = [  # (header, field, format)
    ("config", "config", "{}"),
    ("T", "T", "{}"),
    ("backend", "backend", "{}"),
    ("ranks", "world_size", "{}"),
    ("rank", "scope", "{}"),
    ("tokens", "tokens", "{}"),
    ("rows out", "rows_sent", "{}"),
    ("rows in", "rows_received", "{}"),
    ("dispatch ms", "dispatch_ms", "{:.3f}"),
    ("compute ms", "compute_ms", "{:.3f}"),
    ("combine ms", "combine_ms", "{:.3f}"),
    ("comm %", "comm_fraction", "{:.0%}"),
    ("total ms", "total_ms", "{:.3f}"),
    ("vs 1 device", "speedup_vs_single", "{:.2f}x"),
    ("rel err", "rel_err", "{:.1e}"),
    ("status", "status", "{}"),
]


def _cell(rec: dict, field: str, fmt: str) -> str:
    if field == "scope":  # a rank's own row shows its number
        return str(rec["rank"]) if rec[field] == "rank" else rec[field]
    return format_cell(rec[field], fmt)


def format_ep_table(rows) -> str:
    """The printed table: one line per rank, one for the layer ("all"), one for the single device."""
    return render_table(COLUMNS, [r if isinstance(r, dict) else r.as_dict() for r in rows], _cell)


def ep_extra_bytes(cfg: MoEConfig, T: int, world_size: int) -> int:
    """Rough per-rank bytes beyond its weights: the global x, the reference (two [T, H] float32), the
    dispatch buffers of its T/N tokens, and received rows up to T*k (all of them, under all_to_one)."""
    t_local = math.ceil(T / world_size)
    rows_out = t_local * cfg.top_k
    rows_in = T * cfg.top_k
    return (T * cfg.H * (2 + 4 + 4) + rows_out * cfg.H * (2 + 2 + 2 + 4)
            + rows_in * cfg.H * (2 + 2) + rows_in * 2 * cfg.F * 2)


class _Clock:
    """Stage timer: CUDA events on the current stream, or perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "cuda-events" if self.cuda else "cpu-clock"
        self.l2_flush = l2_flush_mode() if self.cuda else ""

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        """ms since `start`, after the device is done."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return (time.perf_counter() - start) * 1e3


def time_expert_parallel(moe: ExpertParallelMoE, x, topk_ids, topk_weights, reps: int,
                         warmup: int = WARMUP) -> tuple[torch.Tensor, str, str]:
    """This rank's times [4, reps] (ms): end to end, dispatch, compute, combine (see the module docstring), the
    clock's method and the L2 flush mode ("" on the CPU)."""
    clock = _Clock(moe.device)
    flush = l2_flusher(clock.l2_flush, device=moe.device) if clock.cuda else None
    for _ in range(warmup):
        moe(x, topk_ids, topk_weights, validate=False)
    times = torch.zeros(4, reps, dtype=torch.float64)
    for i in range(reps):
        if flush is not None:
            flush()
        barrier(moe.group)
        t = clock.start()
        moe(x, topk_ids, topk_weights, validate=False)
        times[0, i] = clock.stop(t)
    for i in range(reps):
        if flush is not None:
            flush()
        barrier(moe.group)
        t = clock.start()
        d = moe.dispatch(x, topk_ids, topk_weights)
        times[1, i] = clock.stop(t)
        barrier(moe.group)
        t = clock.start()
        out = moe.compute(d)
        times[2, i] = clock.stop(t)
        barrier(moe.group)
        t = clock.start()
        moe.combine(d, out)
        times[3, i] = clock.stop(t)
    return times, clock.method, clock.l2_flush


def _all_gather_cpu(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """[N, *t.shape] of every rank's t (moved to the group's device for the collective)."""
    local = t.to(ctx.device)
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(out, local)
    return torch.stack(out).cpu()


def _global_rel_err(y: torch.Tensor, ref: torch.Tensor, ctx: DistContext) -> float:
    """||y - ref|| / ||ref|| over all ranks' rows (sums of squares all_reduced in float64)."""
    sums = torch.stack([(y.double() - ref.double()).square().sum(), ref.double().square().sum()])
    if not torch.isfinite(y).all():
        sums[0] = math.nan
    sums = sums.to(ctx.device)
    dist.all_reduce(sums)
    d2, r2 = sums.tolist()
    return math.sqrt(d2 / r2) if r2 > 0 else math.sqrt(d2)


def _full_reference(x, weights, ids, tw, first_expert: int) -> torch.Tensor:
    ref = partial_reference(x, weights, ids, tw, first_expert)
    dist.all_reduce(ref)
    return ref


def _say(ctx: DistContext, *args, **kw) -> None:
    if ctx.rank == 0:
        print(*args, **kw, flush=True)


def _gather_y(y: torch.Tensor, T: int, ctx: DistContext) -> torch.Tensor | None:
    """Every rank's output rows, in token order, on rank 0 (CPU); None elsewhere. Ranks' row counts
    differ by at most one, so each pads to ceil(T/N) rows for the collective."""
    rows = math.ceil(T / ctx.world_size)
    padded = y.new_zeros(rows, y.shape[1])
    padded[: y.shape[0]] = y
    out = [torch.empty_like(padded) for _ in range(ctx.world_size)] if ctx.rank == 0 else None
    dist.gather(padded, out, dst=0)
    if ctx.rank != 0:
        return None
    parts = [out[r][: token_slice(T, ctx.world_size, r).stop - token_slice(T, ctx.world_size, r).start]
             for r in range(ctx.world_size)]
    return torch.cat(parts).cpu()


def _rank_rows(cfg: MoEConfig, T: int, skew: str, backend: str, ctx: DistContext, base: dict) -> EPRow:
    return EPRow(cfg.name, T, skew, backend, ctx.world_size, "rank", ctx.rank, device=str(ctx.device),
                 dist_backend=ctx.backend, E=cfg.E, H=cfg.H, F=cfg.F, top_k=cfg.top_k, **base)


def _summarise(per_rank: list[EPRow], times: torch.Tensor, method: str) -> EPRow:
    """The "all" row from every rank's row and times [N, 4, reps]: per repetition the slowest rank."""
    first = per_rank[0]
    worst = times.max(dim=0).values  # [4, reps]
    med = worst.median(dim=1).values.tolist()
    row = EPRow(first.config, first.T, first.skew, first.backend, first.world_size, "all", -1, first.status,
                first.reason, method, first.l2_flush, first.device, first.dist_backend, tokens=first.T,
                local_experts=first.local_experts, active_local_experts=sum(r.active_local_experts for r in per_rank),
                rows_sent=sum(r.rows_sent for r in per_rank), rows_received=sum(r.rows_received for r in per_rank),
                dispatch_mb=sum(r.dispatch_mb for r in per_rank), rel_err=first.rel_err,
                rel_err_vs_bf16=first.rel_err_vs_bf16, weight_gb=sum(r.weight_gb for r in per_rank),
                E=first.E, H=first.H, F=first.F, top_k=first.top_k)
    if first.status == "ok":
        row.total_ms, row.dispatch_ms, row.compute_ms, row.combine_ms = med
        row.p20_ms = float(worst[0].quantile(0.2))
        row.p80_ms = float(worst[0].quantile(0.8))
        row.comm_fraction = (med[1] + med[3]) / sum(med[1:])
    return row


def _fill_times(row: EPRow, times: torch.Tensor, method: str, l2_flush: str) -> None:
    med = times.median(dim=1).values.tolist()
    row.timing, row.l2_flush = method, l2_flush
    row.total_ms, row.dispatch_ms, row.compute_ms, row.combine_ms = med
    row.p20_ms, row.p80_ms = float(times[0].quantile(0.2)), float(times[0].quantile(0.8))
    row.comm_fraction = (med[1] + med[3]) / sum(med[1:])


def _run_ep_point(cfg, T, skew, seed, backend_name, weights, experts, x, ids, tw, ref_bf16, reps,
                  ctx: DistContext) -> tuple[list[EPRow] | None, dict]:
    """One (T, backend) over all ranks. Returns the rows (rank 0; None elsewhere) and what the
    single-device comparison needs later (rank 0: the gathered output and the reference used)."""
    sl = token_slice(T, ctx.world_size, ctx.rank)
    x_loc, ids_loc, tw_loc = x[sl], ids[sl], tw[sl]
    base = dict(status="ok", tokens=x_loc.shape[0], local_experts=len(experts), rows_sent=x_loc.shape[0] * cfg.top_k)
    row = _rank_rows(cfg, T, skew, backend_name, ctx, base)
    keep: dict = {}
    times = torch.full((4, reps), math.nan, dtype=torch.float64)
    method = ""
    try:
        moe = ExpertParallelMoE(cfg, weights, backend_name)
    except ExpertParallelError as exc:
        row.status = "unavailable" if "unavailable" in str(exc) else "failed"
        row.reason = str(exc)
        moe = None
    if moe is not None:
        row.weight_gb = getattr(moe.prepared, "nbytes", weights.nbytes) / GB
        y = moe(x_loc, ids_loc, tw_loc, validate=True)
        d = moe.dispatch(x_loc, ids_loc, tw_loc)  # once more, for the traffic columns
        row.rows_received = d.recv_rows.shape[0]
        row.active_local_experts = int((d.recv_per_expert.sum(0) > 0).sum())
        row.dispatch_mb = row.rows_sent * cfg.H * x.element_size() / 1e6
        del d
        ref = ref_bf16
        if moe.backend.dequantized is not None:
            ref = _full_reference(x, moe.backend.dequantized(moe.prepared), ids, tw, experts.start)
            row.rel_err_vs_bf16 = _global_rel_err(y, ref_bf16[sl], ctx)
        row.rel_err = _global_rel_err(y, ref[sl], ctx)
        tol = TOLERANCE.get(moe.backend.weight_format, 2e-2)
        if not row.rel_err <= tol:  # the same on every rank (all_reduced), so all ranks skip timing together
            row.status, row.reason = "failed", f"relative error {row.rel_err:.3g} > {tol:g}"
        else:
            times, method, l2_flush = time_expert_parallel(moe, x_loc, ids_loc, tw_loc, reps)
            _fill_times(row, times, method, l2_flush)
        keep["y"] = _gather_y(y, T, ctx)
        keep["ref"] = ref.cpu() if ctx.rank == 0 else None
        del moe, y
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, row)
    all_times = _all_gather_cpu(times, ctx)
    if ctx.rank != 0:
        return None, keep
    return gathered + [_summarise(gathered, all_times, method)], keep


def _run_single(cfg, T, skew, seed, backend_name, full, ep_keep: dict, device) -> EPRow:
    """The same global forward on one device (rank 0), no torch.distributed involved."""
    row = EPRow(cfg.name, T, skew, backend_name, 1, "single", -1, "ok", device=str(device), tokens=T,
                local_experts=cfg.E, rows_sent=0, E=cfg.E, H=cfg.H, F=cfg.F, top_k=cfg.top_k)
    backend = get_backend(backend_name)
    reason = backend.unavailable(cfg, device)
    if reason:
        row.status, row.reason = "unavailable", reason
        return row
    x, ids, tw = make_inputs(cfg, T, skew, device, seed)
    try:
        prepared = backend.prepare(full)
        row.weight_gb = getattr(prepared, "nbytes", full.nbytes) / GB
        y = backend(x, prepared, RoutingPlan.build(ids, tw, cfg.E))
        if ep_keep.get("ref") is not None:
            row.rel_err = relative_error(y.cpu(), ep_keep["ref"])
        timing = time_call(timed_forward(backend, x, prepared, ids, tw, cfg.E), device, use_graph=False)
        row.timing, row.l2_flush = timing.method, timing.l2_flush
        row.total_ms = row.compute_ms = timing.median_ms
        row.p20_ms, row.p80_ms = timing.p20_ms, timing.p80_ms
        if ep_keep.get("y") is not None:
            ep_keep["rel_err_vs_single"] = relative_error(ep_keep["y"], y.cpu())

    except torch.cuda.OutOfMemoryError as exc:
        row.status, row.reason = "skipped", f"CUDA out of memory on one device: {str(exc).splitlines()[0][:120]}"
    except Exception as exc:  # rank 0 must still reach the barrier the other ranks wait at
        row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return row


def _metadata(ctx: DistContext, command: str, extra: dict) -> dict:
    info = env.device_info()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": git_commit(),
        "device": info.as_dict(),
        "world_size": ctx.world_size,
        "dist_backend": ctx.backend,
        "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if ctx.backend == "nccl" else None,
        "env": {k: os.environ.get(k) for k in RECORDED_ENV},
        "l2_flush": l2_flush_mode(),
        "timing": ("Per rank: 'end to end' forwards after a barrier, and 'phased' forwards with a barrier before "
                   "each of dispatch / compute / combine; GPU: CUDA events, L2 made cold before each forward "
                   "(l2_flush); CPU: "
                   "perf_counter (correctness runs). 'all' rows: median over repetitions of the slowest rank. "
                   "'single' rows: the plain forward on rank 0's device (moe_tut.bench.timing, no CUDA graphs)."),
        **extra,
    }


def run_expert_parallel(cfg: MoEConfig, tokens: list[int], backends: list[str], skew: str = "uniform",
                        seed: int = 0, out_dir: Path | None = Path("out"), reps: int | None = None,
                        timeout_s: float = 300.0, single: bool = True, plots: bool = True,
                        command: str = "") -> int:
    """Run on every rank (torchrun starts them). Rank 0 prints the table and writes the results.
    Returns the process exit code: 0, 1 if a row failed its correctness check, 2 for refused input."""
    ctx = init_distributed(timeout_s=timeout_s)
    try:
        return _run(ctx, cfg, tokens, backends, skew, seed, out_dir, reps, single, plots, command)
    except ExpertParallelError as exc:
        if ctx.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


def _run(ctx: DistContext, cfg, tokens, backends, skew, seed, out_dir, reps, single, plots, command) -> int:
    device, N = ctx.device, ctx.world_size
    reps = reps or (DEFAULT_REPS_GPU if device.type == "cuda" else DEFAULT_REPS_CPU)
    if ctx.rank == 0:
        info = env.device_info(device.index if device.type == "cuda" else None)
        print(f"expert parallel: {N} rank(s), torch.distributed backend {ctx.backend}, "
              f"{cfg.describe()}, E/N = {cfg.E / N:g} experts per rank", flush=True)
        print(f"device (rank 0): {info.summary()}")
        if device.type != "cuda":
            print("NOTE: CPU ranks (gloo). These are correctness runs; their times are not GPU performance.")
    fingerprint = dict(config=cfg.name, E=cfg.E, H=cfg.H, F=cfg.F, top_k=cfg.top_k, tokens=tuple(tokens),
                       backends=tuple(backends), skew=skew, seed=seed, reps=reps)
    agree(local_error(lambda: expert_range(cfg.E, N, ctx.rank)), fingerprint, what="expert-parallel benchmark")
    experts = expert_range(cfg.E, N, ctx.rank)
    shard = replace(cfg, name=f"{cfg.name} (one rank's {cfg.E // N} of {cfg.E} experts)")
    agree(local_error(lambda: check_fits(shard, tokens, device, weight_bytes=cfg.weight_bytes() // N,
                                         extra_bytes=ep_extra_bytes(cfg, max(tokens), N))),
          what="memory check")
    weights = random_expert_weights(cfg, experts, device, seed=seed)
    rows: list[EPRow] = []
    keeps: dict = {}
    for T in tokens:
        x, ids, tw = make_inputs(cfg, T, skew, device, seed)
        dist.broadcast(x, src=0)  # the same x everywhere, whatever each device's random generator does
        ref_bf16 = _full_reference(x, weights, ids, tw, experts.start)
        for name in backends:
            _say(ctx, f"  T={T} {name}: checking, then timing {reps} forwards x 2 passes...")
            got, keep = _run_ep_point(cfg, T, skew, seed, name, weights, experts, x, ids, tw, ref_bf16, reps, ctx)
            keeps[(T, name)] = keep
            if got:
                rows += got
        del x, ref_bf16
    del weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier()
    if single and ctx.rank == 0:
        rows += _single_rows(cfg, tokens, backends, skew, seed, device, keeps, rows)
    barrier()
    if ctx.rank != 0:
        return 0
    print()
    print(format_ep_table(rows))
    if device.type != "cuda":
        print("\n(CPU correctness run: times are not GPU performance)")
    meta = _metadata(ctx, command, {"config": cfg.name, "skew": skew, "tokens": tokens, "seed": seed,
                                    "reps": reps, "backends": backends})
    if out_dir is not None:
        csv_path, json_path = write_results(rows, meta, Path(out_dir), stem=RESULTS_STEM)
        print(f"\nwrote {csv_path} and {json_path}")
        if plots:
            _write_plot(rows, out_dir)
    failed = [r for r in rows if r.status == "failed"]
    if failed:
        print(f"{len(failed)} row(s) FAILED: " + ", ".join(f"T={r.T}/{r.backend}/{r.scope}" for r in failed),
              file=sys.stderr)
        return 1
    return 0


def _single_rows(cfg, tokens, backends, skew, seed, device, keeps, rows) -> list[EPRow]:
    """Rank 0 alone: the single-device baseline for every (T, backend), and the scaling columns."""
    out = []
    try:
        check_fits(cfg, tokens, device)
        full = random_expert_weights(cfg, None, device, seed=seed)
    except (InsufficientMemoryError, torch.cuda.OutOfMemoryError) as exc:
        why = f"all {cfg.E} experts ({cfg.weight_bytes() / GB:.1f} GB bf16) do not fit one device: {exc}"
        return [EPRow(cfg.name, T, skew, b, 1, "single", -1, "skipped", why, device=str(device), tokens=T,
                      E=cfg.E, H=cfg.H, F=cfg.F, top_k=cfg.top_k) for T in tokens for b in backends]
    for T in tokens:
        for name in backends:
            print(f"  T={T} {name}: single-device baseline...", flush=True)
            keep = keeps.get((T, name), {})
            single = _run_single(cfg, T, skew, seed, name, full, keep, device)
            out.append(single)
            summary = next((r for r in rows if r.T == T and r.backend == name and r.scope == "all"), None)
            if summary is not None:
                summary.rel_err_vs_single = keep.get("rel_err_vs_single", math.nan)
                if single.status == "ok" and summary.status == "ok":
                    summary.speedup_vs_single = single.total_ms / summary.total_ms
                    summary.efficiency = summary.speedup_vs_single / summary.world_size
    del full
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _write_plot(rows: list[EPRow], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .report import plot_comm_compute_split

    fig = plot_comm_compute_split(rows)
    path = Path(out_dir) / f"{RESULTS_STEM}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
