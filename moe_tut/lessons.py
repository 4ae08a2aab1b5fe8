"""The logic of lessons 04 (Triton grouped GEMM) and 05 (INT4): tables, estimates, figures, widgets.

Like moe_tut.widgets (lessons 00-03 and 06), every function here is called from a notebook cell, and
every interactive view has a static twin that draws the same figure from arguments. Nothing here
times or computes a kernel of its own: the tile order is read from the Triton kernel's own helper
(grouped_gemm._tile_coords, run in a tiny probe kernel), timings come from the benchmark harness
(widgets.run_sweep), INT4 numbers from moe_tut.quant, and H100 numbers from the committed files
under results/h100/ (each figure names its file).

    grid = gemm_grid(get_preset("mixtral"), 1024)       # GEMM 1's tile grid at T = 1024 (routing only)
    order = launch_order(grid.num_pid_m, grid.num_pid_n, 8)   # tile index of every output tile
    l2_estimate(grid, group_m=8, wave=264)              # blocks the first 264 tiles touch, in MB
    ex = worked_example(torch.randn(8), symmetric=True) # one INT4 group, step by step

Needs Triton (it imports the kernel modules), like the notebooks that use it.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import triton
import triton.language as tl

from . import env, quant
from .backends import get_backend, list_backends
from .bench.ceilings import Ceilings
from .bench.harness import make_inputs
from .bench.results import read_results
from .kernels import grouped_gemm as gg
from .kernels.grouped_gemm import _tile_coords
from .presets import PRESETS, MoEConfig, get_preset
from .reference import moe_reference, relative_error
from .routing import RoutingPlan, simulate_routing
from .weights import ExpertWeights

GB, MB = 1e9, 1e6
REPO_ROOT = Path(__file__).resolve().parents[1]
H100_DIR = REPO_ROOT / "results" / "h100"
# The one H100 run that timed the numbered kernel versions (v1, v4, the fast path) beside grouped_mm.
H100_VERSIONS_CSV = H100_DIR / "triton_v0" / "triton_check.csv"
# The full benchmark on the H100: every preset, every backend (bf16 and INT4), T = 1 .. 8192.
H100_FULL_CSV = H100_DIR / "full_v5" / "moe_bench.csv"
H100_FULL_JSON = H100_DIR / "full_v5" / "moe_bench.json"
# Token counts of the version sweep (lesson 04) and of the INT4 latency sweep (lesson 05). On the CPU
# each forward of a Triton kernel runs under the interpreter (about a second at the debug size) and
# the harness runs each backend 5 times per point (check, warm-up, 3 timed), so T stays tiny.
# How fast one kernel can read N bytes at all (scripts/gpu_read_floor.py), and cuda_int4 v2's T = 1 kernels with
# parts taken away (results/h100/LOG.md, session 8).
H100_READ_FLOOR_CSV = H100_DIR / "read_floor_v2" / "read_floor.csv"
DECODE_DIAG_VARIANTS = {  # gpu_decode_breakdown.py CSV under results/h100 -> what the kernels did
    "cuda_int4_group_incr_v1/decode_breakdown.csv": "v2 now (another H100)",
    "cuda_int4_t1_diag_v1/breakdown_v2_baseline.csv": "v2 before (a division per chunk)",
    "cuda_int4_t1_diag_v1/breakdown_loads_only.csv": "its loads, one FFMA per word",
    "cuda_int4_t1_diag_v1/breakdown_v2_scales_g0.csv": "its math, group 0's scales only",
    "cuda_int4_t1_diag_v1/breakdown_loads_only_scales_g0.csv": "its loads, group 0's scales only",
}
GPU_VERSION_TOKENS = [1, 128, 1024, 8192]
CPU_VERSION_TOKENS = [1, 4]
GPU_INT4_TOKENS = [1, 16, 128, 1024, 8192]
CPU_INT4_TOKENS = [1, 4]
VERSION_BACKENDS = ["triton_v1", "triton_v2", "triton_v3", "triton_v4", "triton"]
GROUP_SIZES = [32, 64, 128, 256]
BF16_BYTES = 2


def on_gpu() -> bool:
    return env.has_cuda()


def version_tokens() -> list[int]:
    return list(GPU_VERSION_TOKENS if on_gpu() else CPU_VERSION_TOKENS)


def int4_tokens() -> list[int]:
    return list(GPU_INT4_TOKENS if on_gpu() else CPU_INT4_TOKENS)


def _records(rows) -> list[dict]:
    return [r if isinstance(r, dict) else r.as_dict() for r in rows]


# ======================================================================================== 04: tile order

@triton.jit
def _probe_tile_coords(out_m_ptr, out_n_ptr, num_tiles, num_pid_m, num_pid_n,
                       GROUP_M: tl.constexpr, BLOCK: tl.constexpr):
    """(row block, column block) of tiles [pid * BLOCK, (pid + 1) * BLOCK), from the kernel's own helper."""
    tile = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tile < num_tiles
    # Lanes past the last tile compute tile 0's coordinates (past the grid a group can have 0 rows,
    # and _tile_coords would divide by 0); their stores are masked off.
    pid_m, pid_n = _tile_coords(tl.where(ok, tile, 0), num_pid_m, num_pid_n, GROUP_M)
    tl.store(out_m_ptr + tile, pid_m, mask=ok)
    tl.store(out_n_ptr + tile, pid_n, mask=ok)


def kernel_tile_coords(num_pid_m: int, num_pid_n: int, group_m: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pid_m, pid_n) of every tile index 0 .. num_pid_m * num_pid_n - 1, as the grouped GEMM kernel
    computes them: grouped_gemm._tile_coords runs in a probe kernel (on the GPU, or under Triton's
    interpreter on the CPU). Returns two int64 CPU tensors of length num_tiles."""
    device = torch.device(device) if device is not None else env.default_device()
    n = num_pid_m * num_pid_n
    out_m = torch.empty(n, dtype=torch.int32, device=device)
    out_n = torch.empty(n, dtype=torch.int32, device=device)
    if n:
        block = 1024
        _probe_tile_coords[(triton.cdiv(n, block),)](out_m, out_n, n, num_pid_m, num_pid_n,
                                                      GROUP_M=group_m, BLOCK=block)
    return out_m.long().cpu(), out_n.long().cpu()


def tile_coords(tile: torch.Tensor, num_pid_m: int, num_pid_n: int, group_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same arithmetic as grouped_gemm._tile_coords, in PyTorch (tests check that the two agree).

    GROUP_M row blocks form a group that is walked column by column; group_m = 1 is row-major order."""
    tiles_per_group = group_m * num_pid_n
    first_m = (tile // tiles_per_group) * group_m
    group_rows = torch.clamp(num_pid_m - first_m, max=group_m)
    in_group = tile % tiles_per_group
    return first_m + in_group % group_rows, in_group // group_rows


def _coords(num_pid_m: int, num_pid_n: int, group_m: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "kernel":
        return kernel_tile_coords(num_pid_m, num_pid_n, group_m)
    if source == "python":
        return tile_coords(torch.arange(num_pid_m * num_pid_n), num_pid_m, num_pid_n, group_m)
    raise ValueError(f"source must be 'kernel' or 'python', got {source!r}")


def launch_order(num_pid_m: int, num_pid_n: int, group_m: int, source: str = "kernel") -> torch.Tensor:
    """[num_pid_m, num_pid_n]: the tile index (launch order) of every output tile."""
    pid_m, pid_n = _coords(num_pid_m, num_pid_n, group_m, source)
    order = torch.full((num_pid_m, num_pid_n), -1, dtype=torch.long)
    order[pid_m, pid_n] = torch.arange(num_pid_m * num_pid_n)
    return order


def persistent_assignment(num_pid_m: int, num_pid_n: int, group_m: int, programs: int,
                          source: str = "kernel") -> tuple[torch.Tensor, torch.Tensor]:
    """([num_pid_m, num_pid_n] program id, [num_pid_m, num_pid_n] loop step) of every tile in v3+.

    The persistent kernel's loop is `for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0))`:
    program p takes tiles p, p + P, p + 2P, ... (P programs), and places each with _tile_coords."""
    order = launch_order(num_pid_m, num_pid_n, group_m, source)
    return order % programs, order // programs


@dataclass(frozen=True)
class GemmGrid:
    """The output tiles of one grouped GEMM of a forward: row blocks of BLOCK_M rows (each within one
    expert, in expert order, as RoutingPlan.block_map makes them) x column blocks of BLOCK_N."""

    config: str
    T: int
    gemm: int  # 1: x @ w13^T (N = 2F, K = H); 2: act @ w2^T (N = H, K = F)
    block_m: int
    block_n: int
    N: int
    K: int
    rows: int  # T * top_k routed rows
    num_experts: int
    row_block_expert: torch.Tensor  # [num_pid_m] expert of each row block

    @property
    def num_pid_m(self) -> int:
        return int(self.row_block_expert.numel())

    @property
    def num_pid_n(self) -> int:
        return triton.cdiv(self.N, self.block_n)

    @property
    def num_tiles(self) -> int:
        return self.num_pid_m * self.num_pid_n

    def describe(self) -> str:
        return (f"{self.config}, T={self.T}, GEMM {self.gemm} (N={self.N}, K={self.K}), {self.block_m}x{self.block_n} "
                f"tiles: {self.num_pid_m} row blocks x {self.num_pid_n} column blocks = {self.num_tiles} tiles")


def gemm_grid(cfg: MoEConfig, T: int, gemm: int = 1, tile: gg.TileConfig | None = None, skew: str = "uniform",
              seed: int = 0) -> GemmGrid:
    """The tile grid of GEMM 1 or 2 of v1..v3 (unfused: GEMM 1 has N = 2F) for a preset at T tokens.

    Needs only the routing (simulated on the CPU, as the benchmark draws it), never the weights, so it
    works for every preset on any machine. `tile` defaults to v1..v3's fixed DEFAULT_CONFIG."""
    tile = tile or gg.DEFAULT_CONFIG
    ids, w = simulate_routing(T, cfg.E, cfg.top_k, skew, seed=seed)
    bmap = RoutingPlan.build(ids, w, cfg.E).block_map(tile.block_m)
    n_blocks = int(bmap.num_blocks)
    N, K = (2 * cfg.F, cfg.H) if gemm == 1 else (cfg.H, cfg.F)
    return GemmGrid(cfg.name, T, gemm, tile.block_m, tile.block_n, N, K, T * cfg.top_k, cfg.E,
                    bmap.block_expert[:n_blocks].long())


def programs_per_wave(grid: GemmGrid, sms: int) -> int:
    """Programs running at once: SMs x the programs per SM the kernel module assumes fit
    (grouped_gemm.persistent_programs_per_sm, by accumulator size)."""
    return sms * gg.persistent_programs_per_sm(grid.block_m, grid.block_n)


def persistent_programs(grid: GemmGrid, sms: int) -> int:
    """v3's grid size, as grouped_gemm.grouped_gemm computes it on a GPU: min(the host-side upper bound
    on the tiles, SMs x programs per SM)."""
    bound = gg.max_row_blocks(grid.rows, grid.num_experts, grid.block_m) * grid.num_pid_n
    return min(bound, programs_per_wave(grid, sms))


def l2_estimate(grid: GemmGrid, group_m: int, wave: int, source: str = "python") -> dict:
    """Napkin math for the L2 cache: what the first `wave` tiles (running together) read, and the
    bytes read from memory over the whole GEMM if nothing survives in L2 from one wave to the next.

    A tile reads its row block of A ([BLOCK_M, K]) and its weight tile ([BLOCK_N, K] of its expert), all
    of K, in bf16. Tiles of the same wave that share a block read it once from memory (it is in L2 for
    the others). An estimate, not a measurement: it ignores what L2 keeps across waves and partial waves.
    """
    pid_m, pid_n = _coords(grid.num_pid_m, grid.num_pid_n, group_m, source)
    w = torch.arange(grid.num_tiles) // wave
    a_bytes = grid.block_m * grid.K * BF16_BYTES
    w_bytes = grid.block_n * grid.K * BF16_BYTES
    expert = grid.row_block_expert[pid_m]
    # Distinct (wave, block) pairs: a block read by several tiles of one wave counts once.
    a_keys = torch.unique(w * grid.num_pid_m + pid_m)
    w_keys = torch.unique((w * (int(expert.max()) + 1) + expert) * grid.num_pid_n + pid_n)
    first = w == 0
    a_first = int(torch.unique(pid_m[first]).numel())
    w_first = int(torch.unique(expert[first] * grid.num_pid_n + pid_n[first]).numel())
    a_all = grid.num_pid_m
    w_all = int(torch.unique(expert * grid.num_pid_n + pid_n).numel())
    traffic = a_keys.numel() * a_bytes + w_keys.numel() * w_bytes
    ideal = a_all * a_bytes + w_all * w_bytes
    return {"order": "row-major" if group_m == 1 else f"GROUP_M={group_m}",
            "tiles in first wave": min(wave, grid.num_tiles), "A blocks": a_first, "weight tiles": w_first,
            "first wave MB": (a_first * a_bytes + w_first * w_bytes) / MB,
            "read over all waves GB": traffic / GB, "each block once GB": ideal / GB,
            "re-reads": traffic / ideal}


def orders_agree(grid: GemmGrid, group_ms: Sequence[int] = (1, gg.DEFAULT_CONFIG.group_m)) -> bool:
    """Whether the kernel's _tile_coords (run in the probe kernel) and tile_coords give the same order."""
    return all(torch.equal(launch_order(grid.num_pid_m, grid.num_pid_n, g, "kernel"),
                           launch_order(grid.num_pid_m, grid.num_pid_n, g, "python")) for g in group_ms)


def l2_summary(grid: GemmGrid, wave: int, group_m: int = gg.DEFAULT_CONFIG.group_m) -> str:
    """Two sentences comparing row-major and GROUP_M order for one grid (from l2_estimate)."""
    lines = []
    for g in (1, group_m):
        e = l2_estimate(grid, g, wave)
        lines.append(f"{e['order']:>10}: the first {e['tiles in first wave']} tiles read {e['A blocks']} A row "
                     f"blocks + {e['weight tiles']} weight tiles = {e['first wave MB']:.0f} MB; over all "
                     f"{math.ceil(grid.num_tiles / wave)} waves {e['read over all waves GB']:.2f} GB "
                     f"({e['re-reads']:.2f}x reading each block once, {e['each block once GB']:.2f} GB)")
    mb, where = l2_cache_mb()
    if mb:
        lines.append(f"L2 cache: {mb:.0f} MB ({where})")
    return "\n".join(lines)


def l2_table(cfgs: Sequence[MoEConfig], tokens: Sequence[int], sms: int, group_m: int = gg.DEFAULT_CONFIG.group_m
             ) -> list[dict]:
    """l2_estimate of GEMM 1 for each preset and T, row-major (v1) next to GROUP_M order (v2)."""
    out = []
    for cfg in cfgs:
        for T in tokens:
            grid = gemm_grid(cfg, T)
            wave = programs_per_wave(grid, sms)
            for g in (1, group_m):
                est = l2_estimate(grid, g, wave)
                out.append({"config": cfg.name, "T": T, "tiles": grid.num_tiles, "wave": wave, **est})
    return out


@functools.cache
def h100_meta() -> dict:
    """The device and ceilings recorded with the committed H100 full benchmark ({} if absent)."""
    return json.loads(H100_FULL_JSON.read_text()) if H100_FULL_JSON.is_file() else {}


def l2_cache_mb() -> tuple[float | None, str]:
    """This GPU's L2 (MB), or the H100's from results/h100/full_v5/moe_bench.json on the CPU; and where from."""
    if on_gpu():
        return env.device_info().l2_cache_mb, "this GPU"
    mb = h100_meta().get("device", {}).get("l2_cache_mb")
    return mb, "the H100 of results/h100/full_v5/moe_bench.json"


def _expert_edges(grid: GemmGrid) -> list[float]:
    e = grid.row_block_expert
    return [i - 0.5 for i in range(1, len(e)) if e[i] != e[i - 1]]


def _draw_order(ax, grid: GemmGrid, order: torch.Tensor, wave: int, title: str) -> None:
    from matplotlib.colors import ListedColormap

    im = ax.imshow(order.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    first = (order < wave).numpy()
    ax.imshow(np.ma.masked_where(~first, first), aspect="auto", cmap=ListedColormap(["red"]), alpha=0.6,
              interpolation="nearest")
    for y in _expert_edges(grid):
        ax.axhline(y, color="white", linewidth=0.6, alpha=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("column block (pid_n): BLOCK_N output columns = one weight tile")
    ax.set_ylabel("row block (pid_m)")
    ax.figure.colorbar(im, ax=ax, label="launch order (tile index)", pad=0.01)


def plot_tile_order(grid: GemmGrid, group_m: int = gg.DEFAULT_CONFIG.group_m, wave: int | None = None,
                    sms: int = 132, source: str = "kernel"):
    """Launch order of every output tile, row-major (v1) above GROUP_M order (v2); the first wave of
    tiles that run together is red, expert boundaries are white lines."""
    wave = wave or programs_per_wave(grid, sms)
    fig, axes = plt.subplots(2, 1, figsize=(12, 7.5))
    for ax, g in zip(axes, (1, group_m)):
        est = l2_estimate(grid, g, wave)
        name = "v1: row-major (GROUP_M = 1)" if g == 1 else f"v2: grouped, GROUP_M = {g}"
        _draw_order(ax, grid, launch_order(grid.num_pid_m, grid.num_pid_n, g, source), wave,
                    f"{name}. First {est['tiles in first wave']} tiles (red) read {est['A blocks']} A row blocks + "
                    f"{est['weight tiles']} weight tiles = {est['first wave MB']:.0f} MB")
    fig.suptitle(grid.describe(), fontsize=10)
    fig.tight_layout()
    return fig


def plot_persistent(grid: GemmGrid, programs: int, group_m: int = gg.DEFAULT_CONFIG.group_m,
                    source: str = "kernel", highlight: Sequence[int] = (0, 1)):
    """v3: which of the `programs` persistent programs computes each tile (left) and at which step of
    its loop (right). The tiles of the programs in `highlight` are marked with their step."""
    prog, step = persistent_assignment(grid.num_pid_m, grid.num_pid_n, group_m, programs, source)
    fig, axes = plt.subplots(2, 1, figsize=(12, 7.5))
    cmap = "tab20" if programs <= 20 else "hsv"
    im0 = axes[0].imshow(prog.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
    fig.colorbar(im0, ax=axes[0], label="program id", pad=0.01)
    axes[0].set_title(f"program of each tile: {programs} programs, each loops over ~{grid.num_tiles / programs:.1f} "
                      f"tiles (p, p + {programs}, p + {2 * programs}, ...)", fontsize=9)
    im1 = axes[1].imshow(step.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im1, ax=axes[1], label="loop step", pad=0.01)
    axes[1].set_title(f"loop step of each tile: step s computes tiles s*{programs} .. s*{programs}+{programs - 1}, "
                      "the grouped order of v2, one wave per step", fontsize=9)
    for p, marker in zip(highlight, ("o", "s", "^", "D")):
        ys, xs = torch.nonzero(prog == p, as_tuple=True)
        for ax in axes:
            ax.scatter(xs.numpy(), ys.numpy(), s=14, marker=marker, facecolors="white", edgecolors="black",
                       linewidths=0.6, label=f"program {p}")
    axes[0].legend(fontsize=7, loc="upper right")
    for ax in axes:
        for y in _expert_edges(grid):
            ax.axhline(y, color="white", linewidth=0.6, alpha=0.8)
        ax.set_xlabel("column block (pid_n)")
        ax.set_ylabel("row block (pid_m)")
    fig.suptitle(f"v3 persistent grid: {grid.describe()}", fontsize=10)
    fig.tight_layout()
    return fig


TILE_TOKENS = [64, 256, 1024, 4096, 8192]


def tile_order_explorer(preset: str = "mixtral", T: int = 1024, group_m: int = 8, sms: int = 132):
    """Interactive: preset, T, GROUP_M and SMs -> launch order of GEMM 1's tiles and its first-wave L2
    footprint. Pure arithmetic (the PyTorch mirror of _tile_coords), so every change redraws at once.
    An ipywidgets.interactive; `.result` is the l2_estimate of the grouped order."""
    import ipywidgets as W

    from .widgets import _show

    preset_w = W.Dropdown(options=[n for n in PRESETS], value=preset, description="preset")
    tokens_w = W.SelectionSlider(options=TILE_TOKENS, value=T if T in TILE_TOKENS else 1024, description="T",
                                 continuous_update=False)
    group_w = W.Dropdown(options=[1, 2, 4, 8, 16, 32], value=group_m, description="GROUP_M")
    sms_w = W.Dropdown(options=sorted({64, 108, 128, 132, sms}), value=sms, description="SMs")

    def draw(preset, T, group_m, sms):
        grid = gemm_grid(get_preset(preset), T)
        wave = programs_per_wave(grid, sms)
        est = l2_estimate(grid, group_m, wave)
        fig, ax = plt.subplots(figsize=(12, 3.8))
        _draw_order(ax, grid, launch_order(grid.num_pid_m, grid.num_pid_n, group_m, "python"), wave,
                    f"GROUP_M={group_m}: first {est['tiles in first wave']} tiles read {est['A blocks']} A blocks + "
                    f"{est['weight tiles']} weight tiles = {est['first wave MB']:.0f} MB; over all waves "
                    f"{est['read over all waves GB']:.2f} GB ({est['re-reads']:.1f}x each block once)")
        fig.suptitle(grid.describe(), fontsize=9)
        fig.tight_layout()
        _show(fig)
        return est

    return W.interactive(draw, preset=preset_w, T=tokens_w, group_m=group_w, sms=sms_w)


# ============================================================================ 04: versions and fusions

def schedule_table() -> list[dict]:
    """What each numbered version's Schedule switches on (grouped_gemm.SCHEDULES, read from the module)."""
    out = []
    for v, s in gg.SCHEDULES.items():
        out.append({"version": f"v{v}", "backend": f"triton_v{v}", "GROUP_M tile order": s.grouped,
                    "persistent programs": s.persistent, "row blocks found in the kernel": s.map_from_offsets,
                    "autotuned tiles": s.autotuned, "what it adds": inspect.getdoc(gg.VERSIONS[f"v{v}"]) or ""})
    return out


def _describe_call(kw: dict) -> tuple[str, str]:
    """(fusions, tile config) of one grouped_gemm call, from its keyword arguments."""
    fused = [name for flag, name in (("gather_rows", "gather x rows into A"), ("swiglu", "SwiGLU epilogue"),
                                     ("scale_rows", "x routing weight"), ("scatter_rows", "scatter to token slot"))
             if kw.get(flag)]
    schedule = gg.SCHEDULES[kw.get("version", 4)]
    if kw.get("config") is not None:
        tile = str(kw["config"])
    elif kw.get("configs"):
        configs = kw["configs"]
        tile = str(configs[0]) + " (the only candidate)" if len(configs) == 1 else f"autotuned over {len(configs)}"
    elif not schedule.autotuned:
        tile = str(gg.INTERPRETER_CONFIG if env.interpreting() else gg.DEFAULT_CONFIG)
    elif env.interpreting():
        tile = f"{gg.INTERPRETER_CONFIG} (interpreter: no autotuning)"
    else:
        tile = "pinned by MOE_TUT_TRITON_CONFIG" if gg.pinned_config() else "autotuned"
    return ", ".join(fused) or "-", tile


def version_check(cfg: MoEConfig, weights: ExpertWeights, T: int, skew: str = "zipf", seed: int = 0,
                  progress: bool = True) -> list[dict]:
    """Run every kernel version once on one routing: its relative error against the float32 reference,
    and what its two grouped GEMM launches fuse (recorded from the calls it makes to
    grouped_gemm.grouped_gemm), one row per version."""
    from tqdm.auto import tqdm

    x, ids, tw = make_inputs(cfg, T, skew, weights.device, seed)
    plan = RoutingPlan.build(ids, tw, cfg.E)
    ref = moe_reference(x, weights, ids, tw)
    real = gg.grouped_gemm
    out = []
    for name, forward in tqdm(list(gg.VERSIONS.items()), desc=f"versions, T={T}", disable=not progress):
        calls: list[dict] = []

        def spy(*args, _calls=calls, **kw):
            _calls.append(kw)
            return real(*args, **kw)

        gg.grouped_gemm = spy  # the forwards look grouped_gemm up in their module at call time
        try:
            y = forward(x, weights, plan)
        finally:
            gg.grouped_gemm = real
        err = relative_error(y, ref)
        (f1, t1), (f2, t2) = (_describe_call(c) for c in calls[:2])
        in_torch = [s for s, missing in (("SwiGLU", not any(c.get("swiglu") for c in calls)),
                                         ("weight + combine", not any(c.get("scatter_rows") for c in calls)))
                    if missing]
        out.append({"version": name, "backend": "triton" if name == "fast" else f"triton_{name}",
                    "rel err vs float32": err, "check": "ok" if err < 2e-2 else "FAILED",
                    "launches": len(calls), "GEMM 1 fuses": f1, "GEMM 2 fuses": f2,
                    "left to PyTorch": ", ".join(in_torch) or "(sum over k)", "GEMM 1 tile": t1, "GEMM 2 tile": t2})
    return out


def version_check_lines(rows: Sequence[dict], cfg: MoEConfig, T: int, skew: str) -> list[str]:
    return [f"{r['version']:>4} ({r['backend']}): relative error {r['rel err vs float32']:.1e} vs the float32 "
            f"reference at {cfg.name}, T={T}, {skew}: {r['check']}" for r in rows]


def version_backends(cfg: MoEConfig, device=None) -> list[str]:
    """v1..v4, the fast `triton` backend and the best PyTorch backend that runs here (grouped_mm, else bmm)."""
    device = torch.device(device) if device is not None else env.default_device()
    torch_best = next((b for b in ("grouped_mm", "bmm") if not get_backend(b).unavailable(cfg, device)), "naive")
    return [b for b in VERSION_BACKENDS if b in list_backends()] + [torch_best]


def autotune_table() -> list[dict]:
    """The tile configs v4 and the fast path's prefill GEMMs autotune over (before the shared-memory filter)."""
    out = []
    for role, fused in (("v4 (both GEMMs), fast path GEMM 2", False), ("fast path GEMM 1 (gate + up tiles)", True)):
        for c in gg.get_autotune_configs(fused_gate_up=fused):
            out.append({"used by": role, "config": str(c), "BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
                        "BLOCK_K": c.block_k, "warps": c.num_warps, "stages": c.num_stages,
                        "shared memory KB": c.smem_bytes(2 if fused else 1) / 1024})
    return out


def metric_pivot(rows, metric: str = "median_ms"):
    """A pandas table of one metric: a row per (preset, backend), a column per T (ok rows only)."""
    import pandas as pd

    df = pd.DataFrame([r for r in _records(rows) if r["status"] == "ok"])
    out = df.pivot_table(index=["config", "backend"], columns="T", values=metric, sort=False)
    out.columns = [f"T={t}" for t in out.columns]
    return out


def tuner_report() -> list[str]:
    """The configs the autotuners of v4 and the fast path chose in this process (empty on the CPU)."""
    return gg.autotune_report()


H100_VERSION_NAMES = {"v1": "triton_v1", "v4": "triton_v4", "fast": "triton (fast, kernel v0)",
                      "grouped_mm": "grouped_mm"}


def h100_ceilings() -> Ceilings | None:
    """The ceilings measured with the committed H100 full benchmark (results/h100/full_v5/moe_bench.json)."""
    c = h100_meta().get("ceilings")
    return Ceilings(**c) if c else None


def h100_version_rows(path: Path | str | None = None) -> list[dict]:
    """The H100 timings of v1, v4 and the fast path beside grouped_mm (results/h100/triton_v0/triton_check.csv),
    in the harness's row shape. That run built the RoutingPlan outside the timed call. `% roofline` is
    recomputed with the ceilings of results/h100/full_v5 (same GPU model): bytes from the run's weight GB/s."""
    p = Path(path) if path is not None else H100_VERSIONS_CSV
    if not p.is_file():
        return []
    ceilings = h100_ceilings()
    out = []
    rank = list(H100_VERSION_NAMES)
    for r in sorted(read_results(p), key=lambda r: rank.index(r["backend"]) if r["backend"] in rank else -1):
        if r["section"] != "speed" or r["status"] != "ok" or r["backend"] not in H100_VERSION_NAMES:
            continue
        cfg = get_preset(r["case"])
        ms = float(r["median_ms"])
        flops = cfg.useful_flops(int(r["T"]))
        nbytes = float(r["weight_gbps"]) * 1e9 * ms * 1e-3
        bound = ceilings.roofline_ms(flops, nbytes) if ceilings else math.nan
        out.append({"config": cfg.name, "T": int(r["T"]), "backend": H100_VERSION_NAMES[r["backend"]],
                    "status": "ok", "median_ms": ms, "tflops": float(r["tflops"]), "roofline_ms": bound,
                    "roofline_pct": 100 * bound / ms, "timing": r["timing"], "source": str(p.relative_to(REPO_ROOT))})
    return out


def gain_lines(rows, chain: Sequence[str] = (*VERSION_BACKENDS,), config: str | None = None) -> list[str]:
    """Per (preset, T): the backends of `chain` that have a row, in order, with each one's speedup over the
    one before it, e.g. 'mixtral T=8192: triton_v1 31.44 ms -> triton_v4 12.92 ms (2.43x) -> ...'."""
    recs = [r for r in _records(rows) if r["status"] == "ok" and (config is None or r["config"] == config)]
    ms = {(r["config"], r["T"], r["backend"]): float(r["median_ms"]) for r in recs}
    out = []
    for cfg, T in dict.fromkeys((r["config"], r["T"]) for r in recs):
        parts, prev = [], None
        for b in chain:
            if (cfg, T, b) in ms:
                t = ms[(cfg, T, b)]
                parts.append(f"{b} {t:.4g} ms" + (f" ({prev / t:.2f}x)" if prev else ""))
                prev = t
        if parts:
            out.append(f"{cfg} T={T}: " + " -> ".join(parts))
    return out


def plot_versions(rows, config: str, title: str = ""):
    """Latency (left) and % of the roofline bound (right) vs T, one line per backend, for one preset."""
    from .plots import plot_latency_vs_tokens, plot_metric_vs_tokens

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    plot_latency_vs_tokens(rows, config, ax=ax1, title="one MoE forward (ms, median)")
    plot_metric_vs_tokens(rows, config, "roofline_pct", ax=ax2, title="efficiency: roofline bound / measured (%)",
                          ylabel="% of the roofline bound", logy=False)
    ax2.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ============================================================================ 05: INT4 worked example

def worked_example(values: torch.Tensor, symmetric: bool = True) -> dict:
    """One group of INT4 weights, step by step, computed by moe_tut.quant itself.

    `values` (an even number of floats) become one group of a [1, 1, G] weight tensor. Returns the bf16
    values, the group's scale (and zero), the codes, the packed bytes, the codes unpacked again, the
    dequantised values and their error."""
    w = torch.as_tensor(values, dtype=torch.float32).flatten().to(torch.bfloat16)
    G = w.numel()
    qt = quant.quantize(w.view(1, 1, G), group_size=G, symmetric=symmetric)
    codes = quant.unpack_int4(qt.packed)[0, 0]
    deq = quant.dequantize(qt, torch.bfloat16)[0, 0]
    scale = qt.scales[0, 0, 0].float().item()
    zero = -8 * scale if symmetric else qt.zeros[0, 0, 0].float().item()
    return {"symmetric": symmetric, "group_size": G, "values": w.float(), "scale": scale, "zero": zero,
            "codes": codes.long(), "packed": qt.packed[0, 0], "unpacked": quant.unpack_int4(qt.packed[0, 0]).long(),
            "dequantized": deq.float(), "error": deq.float() - w.float(), "qt": qt}


def worked_example_table(ex: dict) -> list[dict]:
    """One row per value: w, w's position on the code grid, the code, what it decodes to, the error."""
    rows = []
    for k in range(ex["group_size"]):
        w, c, d = ex["values"][k].item(), int(ex["codes"][k]), ex["dequantized"][k].item()
        grid = (w - ex["zero"]) / ex["scale"] if ex["scale"] else 0.0
        rows.append({"k": k, "w (bf16)": w, "(w - zero) / scale": grid, "code c = round(.)": c,
                     "stored level" if ex["symmetric"] else "code": c - 8 if ex["symmetric"] else c,
                     "dequantised c*scale + zero": d, "error": d - w,
                     "|error| / (scale/2)": abs(d - w) / (ex["scale"] / 2) if ex["scale"] else 0.0})
    return rows


def packing_table(ex: dict) -> list[dict]:
    """One row per byte: which two codes it holds (low nibble = even k, high nibble = odd k)."""
    rows = []
    for j, b in enumerate(ex["packed"].tolist()):
        lo, hi = b & 0xF, b >> 4
        rows.append({"byte j": j, "value": f"0x{b:02X}", "bits (high | low)": f"{hi:04b} | {lo:04b}",
                     "low nibble": f"k={2 * j}: code {lo}", "high nibble": f"k={2 * j + 1}: code {hi}",
                     "unpacked": f"{int(ex['unpacked'][2 * j])}, {int(ex['unpacked'][2 * j + 1])}"})
    return rows


def example_summary(ex: dict) -> str:
    kind = "symmetric" if ex["symmetric"] else "asymmetric"
    how = ("scale = max|w| / 7, zero = -8 * scale (codes 1..15 = levels -7..7)" if ex["symmetric"]
           else "zero = min(w) rounded down to bf16, scale = (max(w) - zero) / 15 (codes 0..15)")
    err = ex["error"].abs()
    return (f"{kind}, one group of {ex['group_size']} values: {how}\n"
            f"scale = {ex['scale']:.6g}, zero = {ex['zero']:.6g} (both stored in bf16)\n"
            f"largest |error| = {err.max().item():.3g}, half a step (scale / 2) = {ex['scale'] / 2:.3g}; relative "
            f"error of the group {err.norm().item() / ex['values'].norm().item():.1%}\n"
            f"packed: {ex['group_size']} codes in {ex['packed'].numel()} bytes; unpack(pack(codes)) == codes: "
            f"{bool(torch.equal(ex['unpacked'], ex['codes']))}")


def plot_worked_example(ex: dict, ax=None):
    """The group's values, the 16 levels its codes can decode to, and the dequantised values."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.6))
    levels = [c * ex["scale"] + ex["zero"] for c in range(16)]
    for lv in levels:
        ax.axhline(lv, color="grey", linewidth=0.5, alpha=0.6)
    k = range(ex["group_size"])
    ax.plot(k, ex["values"].numpy(), "o", color="C0", label="w (bf16)")
    ax.plot(k, ex["dequantized"].numpy(), "x", color="C3", markersize=9, label="dequantised (c * scale + zero)")
    for i, c in zip(k, ex["codes"].tolist()):
        ax.annotate(str(c), (i, ex["dequantized"][i].item()), textcoords="offset points", xytext=(6, 2), fontsize=7)
    ax.set_xlabel("k (position in the group)")
    ax.set_ylabel("value")
    kind = "symmetric" if ex["symmetric"] else "asymmetric"
    ax.set_title(f"{kind}: grey lines = the 16 values a code can decode to; labels = codes", fontsize=9)
    ax.legend(fontsize=8)
    return ax.figure


def worked_example_explorer(seed: int = 0, group_size: int = 8, symmetric: bool = True):
    """Interactive: a random group (seed, size) quantised symmetric or asymmetric. Instant (one tiny
    tensor). An ipywidgets.interactive; `.result` is the worked_example dict."""
    import ipywidgets as W

    from .widgets import _show

    seed_w = W.IntSlider(min=0, max=20, value=seed, description="seed", continuous_update=False)
    size_w = W.Dropdown(options=[8, 16, 32], value=group_size, description="group size")
    sym_w = W.Checkbox(value=symmetric, description="symmetric", indent=False)

    def draw(seed, group_size, symmetric):
        values = torch.randn(group_size, generator=torch.Generator().manual_seed(seed))
        ex = worked_example(values, symmetric)
        print(example_summary(ex))
        _show(plot_worked_example(ex))
        return ex

    return W.interactive(draw, seed=seed_w, group_size=size_w, symmetric=sym_w)


# ======================================================================= 05: error, memory, kernel check

def group_size_sweep(cfg: MoEConfig, weights: ExpertWeights, group_sizes: Sequence[int] = GROUP_SIZES,
                     T: int = 64, skew: str = "uniform", seed: int = 0, progress: bool = True) -> list[dict]:
    """For each group size and mode: the relative error of the dequantised weights (both tensors), and of
    the MoE forward with them vs the same forward with the bf16 weights (both float32 references, so the
    difference is the quantisation alone), with the format's bits per weight."""
    from tqdm.auto import tqdm

    x, ids, tw = make_inputs(cfg, T, skew, weights.device, seed)
    ref = moe_reference(x, weights, ids, tw)
    usable = [G for G in group_sizes if cfg.H % G == 0 and cfg.F % G == 0]
    out = []
    for G, sym in tqdm([(G, s) for G in usable for s in (True, False)], desc="group sizes", disable=not progress):
        q = quant.Int4ExpertWeights.from_bf16(weights, G, sym)
        deq = q.dequantize()
        w_err = _weight_error(weights, deq)
        y = moe_reference(x, deq, ids, tw)
        out.append({"group size": G, "mode": "symmetric" if sym else "asymmetric",
                    "bits per weight": 8 * q.bytes_per_value, "x smaller than bf16": q.compression_vs("bf16"),
                    "weight rel err": w_err, "forward rel err vs bf16": relative_error(y, ref)})
        del q, deq
    return out


def _weight_error(weights: ExpertWeights, deq: ExpertWeights) -> float:
    """||deq - w||_F / ||w||_F over w13 and w2 together, one expert at a time, summed in float64."""
    d2 = r2 = 0.0
    for a, b in ((weights.w13, deq.w13), (weights.w2, deq.w2)):
        for e in range(a.shape[0]):
            d2 += (b[e].float() - a[e].float()).square().sum(dtype=torch.float64).item()
            r2 += a[e].float().square().sum(dtype=torch.float64).item()
    return (d2 / r2) ** 0.5


def sweep_summary(rows: Sequence[dict], group_size: int = quant.DEFAULT_GROUP_SIZE) -> str:
    """One line per mode at one group size: the weight error and the forward error, from group_size_sweep."""
    return "\n".join(f"G = {r['group size']}, {r['mode']}: {r['bits per weight']:.3f} bits per weight, "
                     f"{r['weight rel err']:.1%} relative error of the weights, {r['forward rel err vs bf16']:.1%} "
                     "of the MoE layer's output" for r in rows if r["group size"] == group_size)


def plot_group_size_sweep(rows: Sequence[dict], title: str = ""):
    """Weight error and forward error vs group size, symmetric and asymmetric, with bits per weight."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for mode, style in (("symmetric", "-o"), ("asymmetric", "--s")):
        pts = sorted((r["group size"], r) for r in rows if r["mode"] == mode)
        if not pts:
            continue
        gs = [g for g, _ in pts]
        ax1.plot(gs, [100 * r["weight rel err"] for _, r in pts], style, label=mode)
        ax2.plot(gs, [100 * r["forward rel err vs bf16"] for _, r in pts], style, label=mode)
        for g, r in pts:
            ax1.annotate(f"{r['bits per weight']:.2f} b", (g, 100 * r["weight rel err"]), textcoords="offset points",
                         xytext=(4, -10 if mode == "asymmetric" else 4), fontsize=7)
    ax1.set_ylabel("relative error of the weights (%)")
    ax2.set_ylabel("relative error of the MoE forward vs bf16 (%)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(GROUP_SIZES, [str(g) for g in GROUP_SIZES])
        ax.set_xlabel("group size G (values sharing one scale)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_title("dequantised weights (labels: bits per weight, codes + scales + zeros)", fontsize=9)
    ax2.set_title("one forward, float32 math, INT4 vs bf16 weights", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def int4_bytes(cfg: MoEConfig, group_size: int = quant.DEFAULT_GROUP_SIZE, symmetric: bool = True) -> int:
    """Bytes of a preset's expert weights in moe_tut.quant's INT4 format, from the format's own classes
    (widgets.int4_weight_bytes: Int4ExpertWeights of empty "meta" tensors, nothing allocated or quantised)."""
    from .widgets import int4_weight_bytes

    n = int4_weight_bytes(cfg, group_size, symmetric)
    if isinstance(n, str):
        raise ValueError(f"{cfg.name}: {n}")
    return n


def memory_table(cfgs: Sequence[MoEConfig] | None = None, group_size: int = quant.DEFAULT_GROUP_SIZE) -> list[dict]:
    """Expert-weight bytes per preset: fp32, bf16, INT4 symmetric and asymmetric, and the ratios (naming
    the baseline of each)."""
    cfgs = list(cfgs) if cfgs is not None else list(PRESETS.values())
    out = []
    for cfg in cfgs:
        bf16 = cfg.weight_bytes(2.0)
        sym, asym = int4_bytes(cfg, group_size, True), int4_bytes(cfg, group_size, False)
        out.append({"preset": cfg.name, "fp32 GB": cfg.weight_bytes(4.0) / GB, "bf16 GB": bf16 / GB,
                    f"INT4 G{group_size} sym GB": sym / GB, f"INT4 G{group_size} asym GB": asym / GB,
                    "sym: x smaller than bf16": bf16 / sym, "sym: x smaller than fp32": 2 * bf16 / sym,
                    "asym: x smaller than bf16": bf16 / asym})
    return out


def plot_memory_bars(rows: Sequence[dict], group_size: int = quant.DEFAULT_GROUP_SIZE):
    """bf16 vs INT4 expert-weight GB per preset (log scale), labelled with the ratio against bf16."""
    fig, ax = plt.subplots(figsize=(11, 4))
    names = [r["preset"] for r in rows]
    x = range(len(rows))
    cols = [("bf16 GB", "bf16", "C0"), (f"INT4 G{group_size} sym GB", f"INT4 G={group_size} symmetric", "C2"),
            (f"INT4 G{group_size} asym GB", f"INT4 G={group_size} asymmetric", "C1")]
    width = 0.27
    for j, (key, label, color) in enumerate(cols):
        ax.bar([i + (j - 1) * width for i in x], [r[key] for r in rows], width, label=label, color=color)
    for i, r in enumerate(rows):
        ax.text(i, r[f"INT4 G{group_size} sym GB"], f"{r['sym: x smaller than bf16']:.2f}x", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(list(x), names)
    ax.set_yscale("log")
    ax.set_ylabel("expert weights (GB, log scale)")
    ax.set_title(f"expert weights per preset; labels: how many times smaller INT4 (G={group_size}, symmetric) "
                 "is than bf16", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def int4_backends_here(cfg: MoEConfig, device=None) -> list[str]:
    """`triton` (bf16) and the INT4 backends that can run `cfg` here."""
    device = torch.device(device) if device is not None else env.default_device()
    names = ["triton"] + [n for n in ("triton_int4", "cuda_int4") if n in list_backends()]
    return [n for n in names if not get_backend(n).unavailable(cfg, device)]


def int4_kernel_check(cfg: MoEConfig, weights: ExpertWeights, T: int, skew: str = "zipf", seed: int = 0) -> list[str]:
    """Each INT4 backend that runs here, once: its error against the float32 reference on the dequantised
    weights (what the kernel must compute) and against the bf16 weights (the quantisation error)."""
    x, ids, tw = make_inputs(cfg, T, skew, weights.device, seed)
    plan = RoutingPlan.build(ids, tw, cfg.E)
    ref_bf16 = moe_reference(x, weights, ids, tw)
    lines = []
    for name in [n for n in int4_backends_here(cfg, weights.device) if n != "triton"]:
        backend = get_backend(name)
        q = backend.prepare(weights)
        y = backend(x, q, plan)
        tight = relative_error(y, moe_reference(x, q.dequantize(), ids, tw))
        ok = "ok" if tight < 2e-2 else "FAILED"
        lines.append(f"{name}: {tight:.1e} vs the float32 forward on the dequantised weights ({ok}); "
                     f"{relative_error(y, ref_bf16):.1e} vs the bf16 weights (quantisation), {cfg.name}, T={T}, {skew}")
    return lines


def h100_full_rows(path: Path | str | None = None) -> list[dict]:
    """The committed H100 full benchmark (results/h100/full_v5/moe_bench.csv), [] if absent."""
    p = Path(path) if path is not None else H100_FULL_CSV
    return read_results(p) if p.is_file() else []


def int4_speedups(rows, base: str = "triton", int4: Sequence[str] = ("triton_int4", "cuda_int4")) -> list[dict]:
    """Per (preset, T): each INT4 backend's speedup over the bf16 `base` backend of the same run."""
    recs = [r for r in _records(rows) if r["status"] == "ok"]
    by = {(r["config"], r["T"], r["backend"]): float(r["median_ms"]) for r in recs}
    out = []
    for (cfg, T, b), ms in by.items():
        if b in int4 and (cfg, T, base) in by:
            out.append({"config": cfg, "T": T, "backend": b, "bf16 ms": by[(cfg, T, base)], "int4 ms": ms,
                        "speedup over bf16": by[(cfg, T, base)] / ms})
    return sorted(out, key=lambda r: (r["config"], r["backend"], r["T"]))


def roofline_ratio(cfg: MoEConfig, tokens: Sequence[int], ceilings: Ceilings,
                   group_size: int = quant.DEFAULT_GROUP_SIZE) -> list[dict]:
    """The best INT4 can do, from the roofline: bound(bf16) / bound(INT4) at each T. Same FLOPs, INT4's
    weight bytes (the touched experts' share of int4_bytes); a kernel that spends nothing on dequantising."""
    bf16_total, int4_total = cfg.weight_bytes(2.0), int4_bytes(cfg, group_size)
    out = []
    for T in tokens:
        ids, _ = simulate_routing(T, cfg.E, cfg.top_k, "uniform", seed=0)
        active = int(torch.unique(ids).numel())
        flops = cfg.useful_flops(T)
        b16 = ceilings.roofline_ms(flops, bf16_total * active / cfg.E)
        b4 = ceilings.roofline_ms(flops, int4_total * active / cfg.E)
        mem_bound = bf16_total * active / cfg.E / (ceilings.copy_gbps * 1e9) >= flops / (ceilings.gemm_tflops * 1e12)
        out.append({"config": cfg.name, "T": T, "bf16 bound ms": b16, "INT4 bound ms": b4, "ratio": b16 / b4,
                    "bf16 is": "memory-bound" if mem_bound else "compute-bound"})
    return out


def crossover_lines(rows, backends: Sequence[str] = ("triton_int4", "cuda_int4")) -> list[str]:
    """Per INT4 backend and preset: at which T it was faster than bf16 `triton` in `rows`, and at which slower."""
    sp = int4_speedups(rows, int4=backends)
    lines = []
    for b in backends:
        for cfg in dict.fromkeys(r["config"] for r in sp if r["backend"] == b):
            pts = [r for r in sp if r["backend"] == b and r["config"] == cfg]
            win = ", ".join(f"{r['T']} ({r['speedup over bf16']:.2f}x)" for r in pts if r["speedup over bf16"] > 1)
            lose = ", ".join(f"{r['T']} ({r['speedup over bf16']:.2f}x)" for r in pts if r["speedup over bf16"] <= 1)
            lines.append(f"{b} on {cfg}: faster than bf16 at T = {win or 'none'}; not faster at T = {lose or 'none'}")
    return lines


def plot_int4_latency(rows, config: str, title: str = ""):
    """Latency vs T of bf16 `triton` and the INT4 backends in `rows` for one preset, with both roofline
    bounds: bf16 weight bytes (black) and INT4 weight bytes (grey; the harness's bound of the INT4 rows)."""
    from .plots import plot_latency_vs_tokens

    recs = [r for r in _records(rows)
            if r["config"] == config and r["backend"] in ("triton", "triton_int4", "cuda_int4")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_latency_vs_tokens(recs, config, ax=ax, title=title or f"{config}: bf16 vs INT4")
    int4_bound: dict[int, float] = {}
    for r in recs:
        if r["status"] == "ok" and r["backend"] != "triton":
            int4_bound[r["T"]] = min(int4_bound.get(r["T"], math.inf), float(r["roofline_ms"]))
    if int4_bound:
        ax.plot(*zip(*sorted(int4_bound.items())), color="grey", linestyle="--", label="roofline bound (INT4)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_int4_h100(rows, presets: Sequence[str] = ("mixtral", "deepseek-v3", "qwen3-30b-a3b", "glm-4.5"),
                   source: str = "results/h100/full_v5/moe_bench.csv"):
    """H100 measured: INT4 speedup over the bf16 `triton` backend vs T, one line per preset and INT4
    backend, with the roofline's best case (bound bf16 / bound INT4) for each preset dashed."""
    ceilings = h100_ceilings()
    sp = int4_speedups(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, backend in zip(axes, ("triton_int4", "cuda_int4")):
        for i, cfg in enumerate(presets):
            pts = sorted((r["T"], r["speedup over bf16"]) for r in sp if r["config"] == cfg and r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"{cfg} (measured)")
                if ceilings:
                    best = roofline_ratio(get_preset(cfg), [t for t, _ in pts], ceilings)
                    ax.plot([b["T"] for b in best], [b["ratio"] for b in best], linestyle="--", color=f"C{i}",
                            alpha=0.6, linewidth=1)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.plot([], [], linestyle="--", color="grey", label="roofline best case (per preset)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ticks = [1 / 32, 1 / 8, 1 / 2, 1, 2, 4]
        ax.set_yticks(ticks, [f"{t:g}x" if t >= 0.5 else f"1/{round(1 / t)}x" for t in ticks])
        ax.set_xlabel("tokens T")
        ax.set_title(f"{backend} vs bf16 triton", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup over bf16 (>1: INT4 faster)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"H100 80GB HBM3, measured ({source})")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# How close to the floor: reads, and the decode kernels against them (lesson 05)
# --------------------------------------------------------------------------------------------------


def read_floor_rows(path: Path | str | None = None) -> list[dict]:
    """The committed read-floor run (results/h100/read_floor_v2/read_floor.csv), [] if absent: per buffer size
    (MB), torch.sum, a plain Triton streaming sum in several grid shapes, and the same bytes as two launches."""
    p = Path(path) if path is not None else H100_READ_FLOOR_CSV
    return read_results(p) if p.is_file() else []


def best_stream(rows) -> dict[float, float]:
    """MB -> the fastest single-launch Triton streaming kernel's median us at that size."""
    best: dict[float, float] = {}
    for r in _records(rows):
        if str(r["kernel"]).startswith("stream"):
            best[float(r["MB"])] = min(best.get(float(r["MB"]), math.inf), float(r["median_us"]))
    return best


def read_floor_fit(rows) -> tuple[float, float]:
    """(intercept us, GB/s): the least-squares line through best_stream, time = intercept + bytes / bandwidth."""
    pts = sorted(best_stream(rows).items())
    if len(pts) < 2:
        raise ValueError("need the streaming kernel's times at two sizes or more")
    mb = np.array([m for m, _ in pts])
    us = np.array([u for _, u in pts])
    slope, intercept = np.polyfit(mb, us, 1)  # us per MB
    return float(intercept), float(1e3 / slope)  # 1 MB / (slope us) = 1e3 / slope GB/s


def read_floor_us(rows, megabytes: float) -> float:
    """The fitted time (us) of one plain read of `megabytes` MB (read_floor_fit)."""
    intercept, gbps = read_floor_fit(rows)
    return intercept + megabytes * 1e3 / gbps


def plot_read_floor(rows, source: str = "results/h100/read_floor_v2/read_floor.csv"):
    """Reading N MB once: time (left, with the fitted line) and the share of the device-copy bandwidth it
    reaches (right), for torch.sum, the best plain Triton streaming kernel, and the same bytes split over two
    dependent launches (2/3 then 1/3, as a decode forward's two GEMMs split them)."""
    recs = _records(rows)
    series = {
        "torch.sum": [r for r in recs if r["kernel"] == "torch.sum"],
        "the same bytes in two launches": [r for r in recs if str(r["kernel"]).startswith("two")],
    }
    best = best_stream(rows)
    series["Triton streaming sum (best grid)"] = [
        r for r in recs if str(r["kernel"]).startswith("stream") and float(r["median_us"]) == best[float(r["MB"])]]
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (label, rs) in enumerate(series.items()):
        pts = sorted((float(r["MB"]), float(r["median_us"]), float(r["pct_of_copy"])) for r in rs)
        if not pts:
            continue
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^"[i], color=f"C{i}", label=label)
        ax_p.plot([p[0] for p in pts], [p[2] for p in pts], marker="os^"[i], color=f"C{i}", label=label)
    intercept, gbps = read_floor_fit(rows)
    mb = np.geomspace(min(best), max(best), 50)
    ax_t.plot(mb, intercept + mb * 1e3 / gbps, color="black", linewidth=1, linestyle="--",
              label=f"fit: {intercept:.1f} us + bytes at {gbps / 1e3:.2f} TB/s")
    sizes = sorted(best)
    for ax in (ax_t, ax_p):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{m:g}" for m in sizes])
        ax.minorticks_off()
        ax.set_xlabel("MB read")
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    ticks = [10, 20, 50, 100, 200]
    ax_t.set_yticks(ticks, [str(t) for t in ticks])
    ax_t.set_ylabel("us (CUDA-graph replay, cold L2)")
    ax_p.set_ylabel("% of the device-copy bandwidth")
    ax_p.axhline(100, color="black", linewidth=1)
    fig.suptitle(f"How fast an H100 reads N bytes once ({source})", fontsize=9)
    fig.tight_layout()
    return fig


def decode_gemm_mb(cfg: MoEConfig, gemm: int, experts: int, group_size: int = quant.DEFAULT_GROUP_SIZE) -> float:
    """MB one INT4 decode GEMM reads for `experts` touched experts: packed codes plus bf16 scales (symmetric)
    of w13 (gemm 1: 2F x H) or w2 (gemm 2: H x F)."""
    values = (2 if gemm == 1 else 1) * cfg.F * cfg.H * experts
    return values * (0.5 + BF16_BYTES / group_size) / MB


def _gemm_us(path: Path) -> dict[tuple[str, int], float]:
    """(preset, GEMM number) -> kernel us at T = 1 in a gpu_decode_breakdown.py CSV of cuda_int4."""
    out = {}
    for r in read_results(path):
        name = str(r["kernel"])
        gemm = 1 if "gemm1_" in name else 2 if "gemm2_" in name else None
        if r["T"] == 1 and gemm is not None:
            out[(r["preset"], gemm)] = float(r["us"])
    return out


def decode_floor_table(presets: Sequence[str] = ("mixtral", "deepseek-v3"), root: Path | str | None = None,
                       floor_rows=None) -> list[dict]:
    """cuda_int4 v2's two GEMMs at T = 1 on an H100: now, before session 8 removed a division from its K loop, and
    with parts taken away (DECODE_DIAG_VARIANTS: gpu_decode_breakdown.py runs, the last three of diagnostic
    patches), beside a plain read of the same bytes (read_floor_us). [] if the files are absent."""
    d = Path(root) if root is not None else H100_DIR
    floor_rows = read_floor_rows() if floor_rows is None else floor_rows
    files = {name: d / name for name in DECODE_DIAG_VARIANTS}
    if not floor_rows or not all(f.is_file() for f in files.values()):
        return []
    times = {name: _gemm_us(f) for name, f in files.items()}  # each file read once
    out = []
    for p in presets:
        cfg = get_preset(p)
        for gemm in (1, 2):
            mb = decode_gemm_mb(cfg, gemm, cfg.top_k)  # T = 1: top_k distinct experts
            row = {"preset": p, "GEMM": gemm, "MB read": round(mb, 1)}
            for name, label in DECODE_DIAG_VARIANTS.items():
                row[label + " (us)"] = times[name].get((p, gemm), math.nan)
            row["a plain read (us)"] = round(read_floor_us(floor_rows, mb), 1)
            out.append(row)
    return out

