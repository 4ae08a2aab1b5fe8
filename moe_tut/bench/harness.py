"""The one benchmark harness behind the CLI, the notebooks and the tests.

For each (preset, T): simulate routing, draw x, compute the float32 reference once, then for every
backend: check availability and memory, run once and check the error against the reference (a
backend that fails is reported as failed and not timed), then time one full MoE forward, i.e.
RoutingPlan.build + the backend, on the same inputs in the same process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch

from ..backends import get_backend
from ..env import environment
from ..presets import MoEConfig, get_preset
from ..reference import moe_reference, relative_error
from ..routing import RoutingPlan, RoutingStats, simulate_routing
from ..weights import ExpertWeights
from .ceilings import Ceilings
from .memory import GPU_HEADROOM_BYTES, free_bytes
from .timing import time_call

GB = 1e9
# Relative Frobenius error vs the float32 reference above which a backend fails (BENCHMARKING.md).
TOLERANCE = {"bf16": 2e-2, "int4": 2e-2}
# At or below this many tokens, graph-safe backends are timed by CUDA-graph replay (launch-bound).
GRAPH_MAX_TOKENS = 64


@dataclass
class Row:
    config: str
    T: int
    skew: str
    backend: str
    status: str  # "ok", "failed", "unavailable", "skipped"
    reason: str = ""
    timing: str = ""
    l2_flush: str = ""  # how L2 was made cold before each timed call (moe_tut.bench.timing.L2_FLUSH_MODES)
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    speedup_vs_naive: float = math.nan
    tflops: float = math.nan
    weight_gbps: float = math.nan
    roofline_ms: float = math.nan
    roofline_pct: float = math.nan
    weight_gb: float = math.nan
    active_weight_gb: float = math.nan
    peak_extra_gb: float = math.nan
    rel_err: float = math.nan
    max_abs_err: float = math.nan
    rel_err_vs_bf16: float = math.nan
    useful_gflop: float = math.nan
    active_experts: int = 0
    imbalance: float = math.nan
    E: int = 0
    H: int = 0
    F: int = 0
    top_k: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def make_inputs(cfg: MoEConfig, T: int, skew: str, device, seed: int = 0):
    """x [T, H] bf16 (random, never zeros), topk_ids [T, k], topk_weights [T, k], seeded."""
    topk_ids, topk_weights = simulate_routing(T, cfg.E, cfg.top_k, skew, seed=seed, device=device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(T, cfg.H, device=device, dtype=torch.bfloat16, generator=gen)
    return x, topk_ids, topk_weights


def timed_forward(backend, x: torch.Tensor, prepared, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                  num_experts: int) -> Callable[[], torch.Tensor]:
    """The unit the harness times: RoutingPlan.build (without its host-syncing validation, so the call can be
    captured in a CUDA graph) + the backend's forward. The plan is deferred: its sorting runs inside the forward
    when the backend reads it, and not at all for a backend that works from topk_ids alone."""
    return lambda: backend(x, prepared, RoutingPlan.build(topk_ids, topk_weights, num_experts, validate=False,
                                                          defer=True))


def _peak_extra_bytes(fn: Callable[[], torch.Tensor], device) -> tuple[torch.Tensor, float]:
    """Run fn once; return its output and the peak memory it allocated beyond what was live (GPU only)."""
    if torch.device(device).type != "cuda":
        return fn(), math.nan
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - base) / GB


def run_point(cfg: MoEConfig, T: int, weights: ExpertWeights, backend_names: Iterable[str], ceilings: Ceilings,
              skew: str = "uniform", seed: int = 0, progress: Callable[[str], None] | None = None,
              prepared_cache: dict | None = None) -> list[Row]:
    """All backends at one (preset, T). Rows come back in the order of backend_names.

    prepared_cache: pass the same dict for every T of one `weights` to quantise them once, not once per
    point and backend (glm5: 54 GB per quantisation). It keeps one prepared copy, keyed by weight format:
    backends of one format (triton_int4, cuda_int4) prepare identical weights (group 128, symmetric).
    """
    device = weights.device
    x, topk_ids, topk_weights = make_inputs(cfg, T, skew, device, seed)
    plan = RoutingPlan.build(topk_ids, topk_weights, cfg.E)
    stats = plan.stats()
    ref = moe_reference(x, weights, topk_ids, topk_weights)
    flops = cfg.useful_flops(T)
    rows = []
    for name in backend_names:
        backend = get_backend(name)
        row = Row(cfg.name, T, skew, name, status="ok", E=cfg.E, H=cfg.H, F=cfg.F, top_k=cfg.top_k,
                  useful_gflop=flops / 1e9, active_experts=stats.active_experts, imbalance=stats.imbalance)
        rows.append(row)
        if progress:
            progress(f"{cfg.name} T={T} {name}")
        reason = backend.unavailable(cfg, device)
        if reason:
            row.status, row.reason = "unavailable", reason
            continue
        free = free_bytes(device)
        need = backend.extra_bytes(cfg, T, stats)
        if free is not None and need + GPU_HEADROOM_BYTES > free:
            row.status = "skipped"
            row.reason = f"needs ~{need / GB:.1f} GB of temporaries, {free / GB:.1f} GB free"
            continue
        try:
            row_out = _measure(backend, cfg, x, weights, plan, topk_ids, topk_weights, ref, stats, ceilings, row,
                               prepared_cache)
        except torch.cuda.OutOfMemoryError as exc:
            row.status, row.reason = "skipped", f"CUDA out of memory: {str(exc).splitlines()[0][:120]}"
            row_out = None
        except Exception as exc:  # a crashing backend is a failed row, not a crashed benchmark
            row.status, row.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            row_out = None
        del row_out
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    naive = next((r for r in rows if r.backend == "naive" and r.status == "ok"), None)
    for r in rows:
        if naive and r.status == "ok":
            r.speedup_vs_naive = naive.median_ms / r.median_ms
    return rows


def compare_settings(presets: Iterable[str], tokens: Iterable[int], backend_names: Iterable[str],
                     settings: dict[Hashable, dict[str, str]], passes: int, ceilings: Ceilings, device,
                     seed: int = 0) -> Iterator[tuple[str, int, int, Hashable, Row]]:
    """run_point under each of several settings, side by side in one process, for A/B scripts: yields
    (preset, T, pass, setting label, Row) for every preset, T, pass, setting and backend.

    `settings` maps a label (any hashable: a name, a tuple of knob values) to the environment variables it
    sets (moe_tut.env.environment: set around the point, restored after). The settings run in their given
    order on even passes and in reverse on odd ones, so a drift over the run favours none. Each preset's
    weights are made once for all its points and freed before the next preset's."""
    backend_names, tokens, labels = list(backend_names), list(tokens), list(settings)
    for name in presets:
        cfg = get_preset(name)
        weights = ExpertWeights.random(cfg, device=device, seed=seed)
        cache: dict = {}
        for T in tokens:
            for p in range(passes):
                for label in labels if p % 2 == 0 else labels[::-1]:
                    with environment(settings[label]):
                        point = run_point(cfg, T, weights, backend_names, ceilings, seed=seed,
                                          prepared_cache=cache)
                    for row in point:
                        yield name, T, p, label, row
        del weights, cache
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _measure(backend, cfg, x, weights, plan, topk_ids, topk_weights, ref, stats: RoutingStats,
             ceilings: Ceilings, row: Row, prepared_cache: dict | None = None):
    device = weights.device
    if prepared_cache is None or backend.weight_format == "bf16":
        prepared = backend.prepare(weights)
    else:
        if backend.weight_format not in prepared_cache:
            prepared_cache.clear()  # one prepared copy at a time
            prepared_cache[backend.weight_format] = backend.prepare(weights)
        prepared = prepared_cache[backend.weight_format]
    nbytes = getattr(prepared, "nbytes", weights.nbytes)
    row.weight_gb = nbytes / GB
    active_bytes = nbytes / cfg.E * stats.active_experts
    row.active_weight_gb = active_bytes / GB
    y, row.peak_extra_gb = _peak_extra_bytes(lambda: backend(x, prepared, plan), device)
    if tuple(y.shape) != tuple(x.shape):
        row.status, row.reason = "failed", f"returned shape {tuple(y.shape)}, expected {tuple(x.shape)}"
        return y
    tight_ref = ref
    if backend.reference is not None:
        tight_ref = backend.reference(x, prepared, topk_ids, topk_weights)
        row.rel_err_vs_bf16 = relative_error(y, ref)
    elif backend.dequantized is not None:
        tight_ref = moe_reference(x, backend.dequantized(prepared), topk_ids, topk_weights)
        row.rel_err_vs_bf16 = relative_error(y, ref)
    row.rel_err = relative_error(y, tight_ref)
    row.max_abs_err = (y.float() - tight_ref).abs().max().item() if y.numel() else 0.0
    tol = TOLERANCE.get(backend.weight_format, 2e-2)
    if not row.rel_err <= tol:  # also catches NaN
        row.status, row.reason = "failed", f"relative error {row.rel_err:.3g} > {tol:g}"
        return y
    use_graph = backend.graph_safe and row.T <= GRAPH_MAX_TOKENS
    timing = time_call(timed_forward(backend, x, prepared, topk_ids, topk_weights, cfg.E), device,
                       use_graph=use_graph)
    row.timing, row.l2_flush = timing.method, timing.l2_flush
    row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
    seconds = timing.median_ms * 1e-3
    row.tflops = cfg.useful_flops(row.T) / seconds / 1e12
    row.weight_gbps = active_bytes / seconds / 1e9
    row.roofline_ms = ceilings.roofline_ms(cfg.useful_flops(row.T), active_bytes)
    row.roofline_pct = 100.0 * row.roofline_ms / timing.median_ms
    return y
