"""Triton grouped GEMM for one MoE forward (bf16 weights), grown in numbered versions.

What it computes (DESIGN.md): for each token t and each of its top-k experts e with routing weight g,

    y[t] += g * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))

    x   [T, H]       activations (bf16; any float dtype works, the accumulators are float32)
    w13 [E, 2F, H]   W1 (gate, rows 0..F-1) and W3 (up, rows F..2F-1) stacked, as in HF / vLLM
    w2  [E, H, F]
    y   [T, H]       in x.dtype

The RoutingPlan lists the T*k token slots sorted by expert: expert e owns sorted rows
[expert_offsets[e], expert_offsets[e+1]). One kernel, `_moe_gemm_kernel`, computes one grouped GEMM
over those rows,

    C[row] = A[row] @ W[e(row)]^T          A [rows or T, K], W [E, N (or 2N), K], C [rows, N]

in output tiles of BLOCK_M sorted rows (all of one expert) x BLOCK_N columns, with a float32
accumulator and a K loop of BLOCK_K. Grid: one program per tile (v1, v2; a host-side upper bound
on the tile count, the programs past the real count exit at once), or persistent programs, one to
four per SM (persistent_programs_per_sm), that loop over the tiles (v3 onward). The
tile -> (expert, rows) map never leaves the device: no host sync, so a forward can be captured in a
CUDA graph. Constexpr flags switch on what a version adds: GATHER_A loads A's rows through
sorted_token_ids (x is never permuted into a copy), SWIGLU keeps a gate and an up accumulator and
writes silu(gate) * up, SCALE_ROWS multiplies each row by its routing weight, SCATTER_C stores each
row at its token slot instead of its sorted position.

Pipeline of intermediate tensors (rows = T*k):

    v1..v4   x --GEMM1, gather--> h [rows, 2F] --torch swiglu--> a [rows, F] --GEMM2--> o [rows, H]
             (sorted order) --torch combine: gather by slot, * weight, sum over k in float32--> y
    fast     x --GEMM1, gather, SwiGLU--> a [rows, F] --GEMM2, * weight, scatter to slot--> o [T, k, H]
             --sum over k (float32 accumulation)--> y.  For top_k = 1, GEMM2 writes y directly.

Versions (each adds one idea; all stay callable so a notebook can plot what each idea bought):

    v1  moe_forward_v1  one launch for all experts: a program per (row block, column block) tile of
                        the BlockMap, tiles in row-major order, token gather fused into the A load.
    v2  moe_forward_v2  grouped tile order: GROUP_M row blocks walk the columns together, so programs
                        running at the same time read the same weight tiles from L2.
    v3  moe_forward_v3  persistent: one program per SM (up to 4 for small tiles) loops over the
                        tiles; the tile count is read on the device (BlockMap.num_blocks), so no
                        program starts just to exit.
    v4  moe_forward_v4  autotuned tile shapes (get_autotune_configs); because BLOCK_M is tuned, the
                        kernel derives its row blocks from expert_offsets itself (a cumsum over E).
    fast moe_forward_triton  v4 plus the fusions: SwiGLU in GEMM1's epilogue (gate and up tiles of
                        the same columns, with TMA one box and one dot split in registers after the K
                        loop, else two accumulators; so [rows, 2F] is never written), the
                        routing weight and the scatter to token slots in GEMM2's epilogue, and a
                        decode path for small T (see below).

Decode rule (fast path): when the mean number of rows per expert, T*k/E, is at most 8
(DECODE_MAX_ROWS_PER_EXPERT, or MOE_TUT_DECODE_MAX_ROWS), the forward only has to stream the weights
of the experts it touches. It then uses BLOCK_M = 16 (the smallest tl.dot tile) and splits N: only
the BLOCK_N (32, 64, 128) for which the (row block, column block) tiles, about min(E, T*k) * ceil(N
/ BLOCK_N), are at least as many as the SMs are kept, so every SM streams its share of the weights;
the autotuner picks among those and BLOCK_K 128 / 256 (get_decode_configs). K is not split: GEMM1's
SwiGLU needs the full sum before its epilogue, and a split GEMM2 would need atomics or a second
pass. Larger T uses the general autotuned list. A pinned config (MOE_TUT_TRITON_CONFIG) overrides
the rule. Decode shapes launch GEMM1 and the sum over k with programmatic dependent launch on sm_90+
(kernels/pdl.py: each kernel may start while the previous one drains; MOE_TUT_PDL=0 turns it off); GEMM2
keeps the plain launch (see moe_forward_triton).

One token (fast path, T = 1): its k slots need no sorting, so the kernels read the router's topk_ids and
topk_weights directly (ONE_TOKEN_TOPK = k; one_token_routing says when the plan allows it): row block j is slot
j, one load finds its expert, and the RoutingPlan's sorted tensors are never read, so a plan built with
defer=True launches nothing. 2.5-3.5 us less per T = 1 forward on an H100 (results/h100/triton_one_token_v1).
There is no slot-sum kernel either (MOE_TUT_ONE_TOKEN_SUM=gemm2, the default): each GEMM2 program counts itself in
at its column block's arrival counter once its slot's row is stored, and the k-th to arrive sums the k rows into y
(_last_arrival_sums_slots; GEMM1 zeroes the counters). Same bits as the kernel; on an H100 deepseek-v3 T = 1 is
1.9 us faster, mixtral, glm-4.5 and qwen3-30b-a3b within their spread (results/h100/one_token_sum_v1).

Combine: each token's k rows come from k different experts, so they are written by different
programs. We store them (already multiplied by their routing weight, rounded to x.dtype) at their
slot t*k+j and sum over k afterwards. That costs one write and one read of [T, k, H] in x.dtype, but
it is deterministic and needs no zero-fill; float32 atomics into y would avoid the buffer but need a
zeroed float32 y, a cast pass, and give run-to-run differences in the last bits.

Sizes: any H, F and T work (loads and stores are masked); block sizes are powers of two >= 16 (what
tl.arange and tl.dot need). Under Triton's CPU interpreter every version runs with one large config
(the interpreter's cost grows with programs x K steps, not with FLOPs) and persistent grids use
CPU_PERSISTENT_PROGRAMS programs; env.patch_interpreter_scalar_index fixes the interpreter's loops for
NumPy >= 2.4. No block pointers are used.

Experiment switches (off by default until measured; scripts/gpu_triton_tune.py times them), read at
call time so one process can compare them:

    MOE_TUT_TRITON_TMA=1     (or tma=True) v4 / fast path: weight tiles through TMA tensor descriptors
                             made in the kernel on a 2-D view W [E * N_W, K], and GEMM2's A (sorted,
                             contiguous rows) too; GEMM1's A stays a pointer gather (Hopper's TMA has
                             no gather). Only on sm_90+ (tma_supported; also under the interpreter) and
                             for 16-byte aligned rows; else the pointer loads. Sets a torch allocator
                             (triton.set_allocator) for the descriptors' scratch unless one is set.
    MOE_TUT_TRITON_GATE_UP   "box" (default) / "two": with TMA, the fast path's GEMM1 loads a tile's gate and up
                             weight rows as one 3-D box [2, BLOCK_N, BLOCK_K] of w13 viewed as [E * 2, N, K] and
                             multiplies them in one dot (a 64 x 2 BLOCK_N wgmma per k16 instead of two 64 x BLOCK_N);
                             "two" loads two boxes and runs two dots. Same bits either way.
    MOE_TUT_TRITON_CONFIG2   pins GEMM2's tile config apart from GEMM1's (MOE_TUT_TRITON_CONFIG)
    MOE_TUT_TRITON_LOOP      "flatten" / "ws": tl.range(flatten=, warp_specialize=) on the persistent loop
    MOE_TUT_DECODE_MAX_ROWS  the decode threshold in place of DECODE_MAX_ROWS_PER_EXPERT
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..backends.base import check_inputs, combine
from ..env import cuda_capability as _capability
from ..env import env_choice, env_parsed, interpreting, max_shared_memory_per_block, programmatic_launch_ok
from ..reference import swiglu
from ..routing import RoutingPlan
from ..weights import ExpertWeights
from .launch import cdiv, launch, next_power_of_2
from .pdl import pdl_launch, wait_for_previous_kernel

CONFIG_ENV = "MOE_TUT_TRITON_CONFIG"  # "BM,BN,BK,GROUP_M,warps,stages" pins v4's and the fast path's config
CONFIG2_ENV = "MOE_TUT_TRITON_CONFIG2"  # same format: pins the fast path's GEMM2 only (overrides CONFIG_ENV there)
TMA_ENV = "MOE_TUT_TRITON_TMA"  # "1": weights (and GEMM2's A) through TMA tensor descriptors where supported
GATE_UP_ENV = "MOE_TUT_TRITON_GATE_UP"  # "box" (default): GEMM1's gate and up rows in one TMA box and one dot; "two"
LOOP_ENV = "MOE_TUT_TRITON_LOOP"  # "flatten", "ws" or "flatten,ws": tl.range options of the persistent loop
DECODE_ENV = "MOE_TUT_DECODE_MAX_ROWS"  # overrides DECODE_MAX_ROWS_PER_EXPERT (an integer, 0 = never decode)
ONE_TOKEN_SUM_ENV = "MOE_TUT_ONE_TOKEN_SUM"  # "gemm2" (default): T = 1 slots summed by GEMM2's last programs; "kernel"
DECODE_MAX_ROWS_PER_EXPERT = 8  # at or below this many rows per expert (mean), use the decode config (H100: see LOG)
DECODE_FILL_MARGIN = 0.2  # get_decode_configs: a narrower decode tile must fill the SMs this much better
USE_TMA_DEFAULT = True  # TMA loads on sm_90+ for prefill shapes (H100, results/h100/LOG.md: v1)
CPU_PERSISTENT_PROGRAMS = 4  # "SMs" of the interpreter: small, so each program still loops over tiles
DEFAULT_SMEM_BYTES = 99 * 1024  # assumed when the GPU's limit cannot be read: sm_86/sm_89, the smallest


# --------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """One tile shape: BLOCK_M sorted rows x BLOCK_N output columns, K in steps of BLOCK_K."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's smallest tile), got {v}")
        if self.group_m < 1 or self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"bad config {self}: group_m >= 1, num_stages >= 1, num_warps a power of 2 <= 16")
        # Hashed once: tuples of configs key the caches an eager forward looks up several times per call
        object.__setattr__(self, "_hash", hash((self.block_m, self.block_n, self.block_k, self.group_m,
                                                self.num_warps, self.num_stages)))

    def __hash__(self) -> int:
        return self._hash

    def smem_bytes(self, weight_tiles: int = 1, elem_bytes: int = 2) -> int:
        """Shared memory of the software pipeline: num_stages copies of the A tile and the weight tile(s).

        An estimate (Triton may keep one stage fewer, or need a little more for the epilogue); it is
        used to drop configs that cannot fit, and the autotuner skips any that still fail to compile.
        """
        per_stage = self.block_m * self.block_k + weight_tiles * self.block_n * self.block_k
        return self.num_stages * per_stage * elem_bytes

    def fit(self, smem_limit: int, weight_tiles: int = 1, elem_bytes: int = 2) -> TileConfig | None:
        """This config with as many of its stages (>= 2) as fit in `smem_limit`, or None."""
        for stages in range(self.num_stages, 1, -1):
            cfg = replace(self, num_stages=stages)
            if cfg.smem_bytes(weight_tiles, elem_bytes) <= smem_limit:
                return cfg
        return None

    def as_triton(self) -> triton.Config:
        return triton.Config(dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                                  GROUP_M=self.group_m), num_warps=self.num_warps, num_stages=self.num_stages)

    @classmethod
    def parse(cls, text: str) -> TileConfig:
        """'64,128,64,8,4,3' -> TileConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=3)."""
        try:
            values = [int(v) for v in text.replace(" ", "").split(",")]
            if len(values) != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"a tile config is six integers 'BM,BN,BK,GROUP_M,warps,stages' (e.g. 64,128,64,8,4,3), "
                             f"got {text!r}") from None
        return cls(*values)

    def __str__(self) -> str:
        return (f"BM{self.block_m}-BN{self.block_n}-BK{self.block_k}-G{self.group_m}"
                f"-w{self.num_warps}-s{self.num_stages}")


# v1..v3 run one fixed, untuned config: 72 KB of shared memory, so it fits every GPU we target.
DEFAULT_CONFIG = TileConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=3)
# Under the interpreter the cost is per program and per K step, so one large tile is fastest.
INTERPRETER_CONFIG = TileConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=2)
INTERPRETER_DECODE_CONFIG = TileConfig(16, 128, 128, group_m=8, num_warps=4, num_stages=2)


def get_autotune_configs(fused_gate_up: bool = False) -> list[TileConfig]:
    """Candidate tiles for v4 and the fast path's non-decode shapes, before the shared-memory filter.

    Shapes drawn from the list in Triton's matmul tutorial (its first entry is the 128x256x64 tile
    with 8 warps), plus small-BLOCK_M tiles for few rows per expert. With fused gate/up, a tile
    of BLOCK_N output columns loads and accumulates 2*BLOCK_N weight rows, so BLOCK_N is halved to
    keep the same register and shared-memory footprint.
    """
    plain = [
        TileConfig(128, 256, 64, 8, 8, 3),
        TileConfig(128, 128, 64, 8, 8, 3),
        TileConfig(128, 128, 32, 8, 4, 4),
        TileConfig(64, 128, 64, 8, 4, 4),
        TileConfig(32, 64, 128, 8, 4, 4),
        TileConfig(16, 64, 128, 8, 4, 4),
    ]
    if not fused_gate_up:
        return plain
    # + 64-row tiles with 8 warps for GEMM1: H100 (results/h100/prefill_knobs_v1) deepseek T=1024 (128 rows per
    # expert, memory-bound) 8.01-8.07 -> 7.73-7.81 ms; slower at every compute-bound shape measured
    return [replace(c, block_n=max(16, c.block_n // 2)) for c in plain] + [TileConfig(64, 128, 64, 8, 8, 4)]


def get_decode_configs(N: int, est_row_blocks: int, num_sms: int, fused_gate_up: bool = False,
                       smem_limit: int = DEFAULT_SMEM_BYTES, elem_bytes: int = 2) -> list[TileConfig]:
    """The decode tile: BLOCK_M = 16, BLOCK_N = 64, BLOCK_K = 128, not autotuned.

    With few rows per expert the work is streaming the touched experts' weights once. Measured on an
    H100 (results/h100/triton_tune_v1), 16x64x128 was the best or within 3% of the best decode tile at
    every decode point of five presets, while the autotuner, timing 1-16 rows with short repetitions,
    picked tiles up to 1.8x slower (qwen3-30b-a3b at T=128). The 32-wide tile is used instead where
    64-wide tiles would leave SMs idle (est_row_blocks * ceil(N / 64) < SMs) and a 32-wide one does not,
    or where the 32-wide tiles fill the SMs' last round of tiles clearly better (sm_fill, by at least
    DECODE_FILL_MARGIN). Measured on an H100 (results/h100/decode_tiles_v1): glm-4.5 at T = 1, GEMM1's 192 tiles
    of 64 on 132 SMs (fill 0.73) against 384 of 32 (0.97): forward 145 -> 141 us; qwen3-30b-a3b at T = 2, the
    same fills: 66.0 -> 64.7 us; but mixtral at T = 1, GEMM1's 448 tiles of 64 (0.85) against 896 of 32 (0.97):
    249 -> 252 us, slower, hence the margin.
    """
    fitted = [c for c in (TileConfig(16, bn, 128, 8, 4, 4).fit(smem_limit, 2 if fused_gate_up else 1, elem_bytes)
                          for bn in (64, 32)) if c is not None]
    if not fitted:
        raise RuntimeError(f"no decode tile fits {smem_limit // 1024} KB of shared memory per block")
    tiles = {c: est_row_blocks * cdiv(N, c.block_n) for c in fitted}
    busy = [c for c in fitted if tiles[c] >= num_sms]
    choice = (busy or fitted)[0]
    for c in busy:
        if sm_fill(tiles[c], num_sms) >= sm_fill(tiles[choice], num_sms) + DECODE_FILL_MARGIN:
            choice = c
    return [choice]


def sm_fill(tiles: int, num_sms: int) -> float:
    """tiles / (rounds * SMs), rounds = ceil(tiles / SMs): how full the SMs are, counted in whole tiles per SM."""
    return tiles / (cdiv(tiles, num_sms) * num_sms) if tiles else 0.0


def pinned_config(env: str = CONFIG_ENV) -> TileConfig | None:
    """The config named by MOE_TUT_TRITON_CONFIG (or another variable of the same format), if set; a bad value is a
    ValueError naming the variable."""
    return env_parsed(env, TileConfig.parse)


def decode_max_rows(default: int = DECODE_MAX_ROWS_PER_EXPERT) -> int:
    """The decode threshold: MOE_TUT_DECODE_MAX_ROWS if set (an integer >= 0), else `default` (the bf16 kernel's
    DECODE_MAX_ROWS_PER_EXPERT unless a caller with its own rule passes one)."""
    rows = env_parsed(DECODE_ENV, _rows_threshold)
    return default if rows is None else rows


def _rows_threshold(text: str) -> int:
    rows = int(text)
    if rows < 0:
        raise ValueError("rows per expert must be >= 0 (0: never decode)")
    return rows


def one_token_sum_in_gemm2() -> bool:
    """MOE_TUT_ONE_TOKEN_SUM: whether a one-token forward sums its k slots in GEMM2 ("gemm2", the default) or in
    a slot-sum kernel after it ("kernel")."""
    return env_choice(ONE_TOKEN_SUM_ENV, ("gemm2", "kernel")) == "gemm2"


def is_decode(num_tokens: int, top_k: int, num_experts: int, default_rows: int = DECODE_MAX_ROWS_PER_EXPERT) -> bool:
    """The fast path's shape rule: decode when T*k / E <= decode_max_rows(default_rows) (8 for the bf16 kernel)."""
    return num_tokens * top_k <= decode_max_rows(default_rows) * num_experts


def gate_up_in_one_box() -> bool:
    """MOE_TUT_TRITON_GATE_UP: whether a fused gate/up GEMM with TMA loads both halves' rows as one box and
    multiplies them in one dot ("box", the default) or in two ("two"). On an H100 one box made GEMM1 alone 3-4.5%
    faster at prefill (T=8192: mixtral 6080 -> 5806 us, deepseek-v3 8511 -> 8234, glm-4.5 4033 -> 3878,
    qwen3-30b-a3b 855 -> 817; results/h100/gate_up_box_v1), with the same bits: wgmma m64n256k16 reads the A tile
    from shared memory once per k16 where two m64n128k16 read it twice. The whole forward: deepseek-v3 and qwen3
    -1.7-1.8%, glm-4.5 +-1%, mixtral +3% in one run of 2 passes, inside mixtral's 8.6-10.7 ms power-cap drift."""
    return env_choice(GATE_UP_ENV, ("box", "two")) == "box"


def loop_options() -> tuple[bool, bool]:
    """(flatten, warp_specialize) for the persistent tile loop, from MOE_TUT_TRITON_LOOP."""
    opts = {o.strip() for o in os.environ.get(LOOP_ENV, "").split(",") if o.strip()}
    unknown = opts - {"flatten", "ws"}
    if unknown:
        raise ValueError(f"{LOOP_ENV} takes 'flatten' and/or 'ws', got {sorted(unknown)}")
    return "flatten" in opts, "ws" in opts


def max_row_blocks(rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the row blocks of a plan, known on the host: each non-empty expert adds at most
    one partial block, and each block holds at least one row."""
    return max(1, min(rows, cdiv(rows, block_m) + min(num_experts, rows)))


# --------------------------------------------------------------------------------------------------
# Device facts (cached: properties are read once per device, never a sync)
# --------------------------------------------------------------------------------------------------


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _smem_limit(index: int) -> int:
    return max_shared_memory_per_block(index) or DEFAULT_SMEM_BYTES


def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; CPU_PERSISTENT_PROGRAMS on the CPU (the interpreter)."""
    device = torch.device(device)
    return _sm_count(_cuda_index(device)) if device.type == "cuda" else CPU_PERSISTENT_PROGRAMS


def smem_limit(device: torch.device) -> int:
    device = torch.device(device)
    return _smem_limit(_cuda_index(device)) if device.type == "cuda" else DEFAULT_SMEM_BYTES


def tma_supported(device: torch.device) -> bool:
    """TMA tensor descriptors: sm_90+ on a GPU; under the interpreter too (it runs them since triton
    3.6), so the CPU tests cover that code path. sm_80/sm_89 keep the pointer loads."""
    device = torch.device(device)
    if device.type == "cuda":
        return _capability(_cuda_index(device))[0] >= 9
    return interpreting()


def want_tma(device: torch.device, tma: bool | None = None) -> bool:
    """Whether to use TMA loads: `tma` if given, else MOE_TUT_TRITON_TMA, else USE_TMA_DEFAULT;
    never where tma_supported() is False."""
    if tma is None:
        text = os.environ.get(TMA_ENV, "").strip().lower()
        tma = USE_TMA_DEFAULT if not text else text not in ("0", "false", "off", "no")
    return bool(tma) and tma_supported(device)


def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D view of t ([rows, K], unit stride in K) meets TMA's rules: 16-byte aligned base and row stride."""
    e = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(-2) * e) % 16 == 0
            and (t.dim() == 2 or t.stride(0) == t.shape[1] * t.stride(1)))


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """In-kernel tensor descriptors need a small global scratch per program, allocated by the
    allocator given to triton.set_allocator. Set a torch one, unless the caller has set their own."""
    try:
        from triton.runtime import _allocation
        unset = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    except (ImportError, AttributeError):  # another triton: set ours
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)


def persistent_programs_per_sm(block_m: int, acc_cols: int) -> int:
    """Persistent programs to launch per SM: one for big tiles, up to 4 for small ones.

    A program's float32 accumulators take block_m * acc_cols registers. At 16384 (a 128 x 128 tile)
    one program is all that fits: compiled for sm_90, that kernel uses 139 registers x 256 threads,
    36K of the SM's 64K. Smaller tiles leave room for more programs per SM (the 16 x 32 decode tile:
    72 registers x 128 threads), which hide each other's memory latency. Launching more programs
    than fit costs little: the extra ones start as others finish, each with an equal share of tiles.
    """
    return max(1, min(4, 16384 // (block_m * acc_cols)))


def _fit_all(configs: list[TileConfig], device, weight_tiles: int, elem_bytes: int) -> list[TileConfig]:
    return list(_fit_all_cached(tuple(configs), smem_limit(device), weight_tiles, elem_bytes))


# Cached: every forward asks for the same fitted lists, and building them (dataclasses.replace per
# candidate) was a visible part of an eager forward's host time (scripts/gpu_profile_host.py on an H100).
@functools.lru_cache(maxsize=256)
def _fit_all_cached(configs: tuple[TileConfig, ...], limit: int, weight_tiles: int,
                    elem_bytes: int) -> tuple[TileConfig, ...]:
    fitted = [c.fit(limit, weight_tiles, elem_bytes) for c in configs]
    kept = tuple(dict.fromkeys(c for c in fitted if c is not None))
    if not kept:
        raise RuntimeError(f"no tile config fits {limit // 1024} KB of shared memory per block")
    return kept


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block). GROUP_M row blocks form a group that is walked
    column by column (Triton's matmul tutorial, "L2 cache optimizations"); GROUP_M = 1 is plain
    row-major order, where every row block sweeps all of the weight's columns on its own."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    in_group = tile % tiles_per_group
    return first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def _expert_row_blocks(offsets_ptr, E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                       TAIL: tl.constexpr = 0, MAIN_M: tl.constexpr = 0):
    """Per expert: first row, end row, number of BLOCK_M row blocks, and their inclusive cumsum.

    A tail split (TAIL > 0) serves each expert in two launches: the main one (MAIN_M = 0) takes its whole BLOCK_M
    blocks and its last partial block only where that has more than TAIL rows; the tail one (MAIN_M = the main
    launch's BLOCK_M, BLOCK_M >= TAIL here) takes the rest, the last n % MAIN_M <= TAIL rows, so a few leftover rows
    run in a small tile instead of a big one that is mostly padding."""
    e = tl.arange(0, E_PAD)
    valid = e < E
    start = tl.load(offsets_ptr + e, mask=valid, other=0)
    end = tl.load(offsets_ptr + e + 1, mask=valid, other=0)
    n = end - start
    if MAIN_M > 0:
        rest = n % MAIN_M
        take = (rest > 0) & (rest <= TAIL)
        start = tl.where(take, end - rest, end)
        blocks = tl.where(take, tl.cdiv(rest, BLOCK_M), 0)
    elif TAIL > 0:
        blocks = n // BLOCK_M + (n % BLOCK_M > TAIL).to(tl.int32)
    else:
        blocks = tl.cdiv(n, BLOCK_M)
    return e, start, end, blocks, tl.cumsum(blocks, 0)


@triton.jit
def _locate_row_block(pid_m, offsets_ptr, block_expert_ptr, block_row_start_ptr,
                      E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                      MAP_FROM_OFFSETS: tl.constexpr, ONE_TOKEN_TOPK: tl.constexpr = 0, TAIL: tl.constexpr = 0,
                      MAIN_M: tl.constexpr = 0):
    """Row block -> (expert, first sorted row, end of the expert's rows).

    ONE_TOKEN_TOPK = k > 0: the rows are one token's k top-k slots in slot order, read from the router's
    topk_ids (passed as block_expert_ptr, contiguous) with no RoutingPlan: row block pid_m is row pid_m alone,
    of expert topk_ids[pid_m]; an id outside [0, E) gives expert -1 (the callers then read expert 0's weights
    and give the row weight 0, so the slot adds nothing). TAIL, MAIN_M (MAP_FROM_OFFSETS): a tail split's launch
    (_expert_row_blocks)."""
    if ONE_TOKEN_TOPK > 0:
        ids = tl.load(block_expert_ptr + pid_m)
        expert = tl.where((ids >= 0) & (ids < E), ids, -1).to(tl.int32)
        row_start = pid_m
        row_end = pid_m + 1
    elif MAP_FROM_OFFSETS:
        e, start, end, blocks, cum = _expert_row_blocks(offsets_ptr, E, E_PAD, BLOCK_M, TAIL, MAIN_M)
        # Block pid_m belongs to the expert whose cumulative block range covers it: the number of
        # experts whose range ends at or before pid_m (empty experts end where the previous one does).
        expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
        mine = e == expert
        first_block = tl.sum(tl.where(mine, cum - blocks, 0), 0)
        row_start = tl.sum(tl.where(mine, start, 0), 0) + (pid_m - first_block) * BLOCK_M
        row_end = tl.sum(tl.where(mine, end, 0), 0)
    else:
        # Only blocks below BlockMap.num_blocks are visited, so the expert is never the -1 filler.
        expert = tl.load(block_expert_ptr + pid_m)
        row_start = tl.load(block_row_start_ptr + pid_m)
        row_end = tl.load(offsets_ptr + expert + 1)
    return expert, row_start, row_end


@triton.jit
def _zero_arrivals(arrivals_ptr, num_arrivals):
    """Program 0 sets the int32 counters arrivals[0 : num_arrivals] to zero, for a later launch that counts arrivals
    (SUM_SLOTS_LAST here, FINISH_LAST in int4_gemv). Per call, in a kernel already on the stream: no memset launch."""
    if tl.program_id(0) + tl.program_id(1) + tl.program_id(2) == 0:
        for i in range(0, num_arrivals, 1024):
            offs = i + tl.arange(0, 1024)
            tl.store(arrivals_ptr + offs, tl.zeros((1024,), dtype=tl.int32), mask=offs < num_arrivals)


@triton.jit
def _last_arrival_sums_slots(part_ptr, stride_ps, stride_pm, stride_pn, offs_n, n_ok, y_ptr, arrivals_ptr, pid_n,
                             SLICES: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Called by each program of a one-token launch after it stored its part of part[slice, slot, offs_n]: the
    SLICES * TOP_K-th program to arrive at column block pid_n writes y[0, offs_n] = the sum over slices and slots
    of part, float32 in sum_slots' order, rounded once to y's dtype (so the same bits as sum_slots).

    Every thread's stores come before the barrier, which comes before thread 0's release (a scalar atomic is one
    thread's); its acquire and the barrier after it order the loads below after every other program's stores
    (the pattern of CUDA's threadfence reduction sample). .cg: read at L2, where the other SMs' stores are."""
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == SLICES * TOP_K - 1:
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sl in tl.static_range(SLICES):
            for j in tl.static_range(TOP_K):
                total += tl.load(part_ptr + sl * stride_ps + j * stride_pm + offs_n * stride_pn, mask=n_ok, other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
        tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemm_tile(tile, num_pid_m, num_pid_n,
               a_ptr, w_ptr, c_ptr, a_rows_ptr, c_rows_ptr, row_scale_ptr,
               offsets_ptr, block_expert_ptr, block_row_start_ptr, N, K,
               stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
               a_desc, w_desc,
               E: tl.constexpr, E_PAD: tl.constexpr, GATHER_A: tl.constexpr, SWIGLU: tl.constexpr,
               SCALE_ROWS: tl.constexpr, SCATTER_C: tl.constexpr, MAP_FROM_OFFSETS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, TMA_W: tl.constexpr, TMA_A: tl.constexpr,
               ONE_TOKEN_TOPK: tl.constexpr, y_ptr, arrivals_ptr, SUM_SLOTS_LAST: tl.constexpr,
               GATE_UP_BOX: tl.constexpr):
    """One BLOCK_M x BLOCK_N output tile: K loop, epilogue, masked store.

    SUM_SLOTS_LAST (ONE_TOKEN_TOPK = k > 1): after storing its slot's row, the program counts itself in at
    arrivals[pid_n]; the k-th to arrive for a column block sums the k stored rows of those columns into y,
    in slot order and float32, rounded once (sum_slots' arithmetic, so the same bits), and no slot-sum
    kernel runs. The counters must be zero at launch (the GEMM1 before it zeroes them: ZERO_COUNTERS)."""
    pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
    expert, row_start, row_end = _locate_row_block(pid_m, offsets_ptr, block_expert_ptr,
                                                   block_row_start_ptr, E, E_PAD, BLOCK_M,
                                                   MAP_FROM_OFFSETS, ONE_TOKEN_TOPK)
    if ONE_TOKEN_TOPK > 0:  # a slot with an out-of-range id reads expert 0 and adds nothing (weight 0)
        id_ok = expert >= 0
        expert = tl.maximum(expert, 0)
    rows = row_start + tl.arange(0, BLOCK_M)  # sorted rows; the last block of an expert is partial
    row_ok = rows < row_end
    if GATHER_A and ONE_TOKEN_TOPK > 0:  # every slot is token 0's
        a_rows = rows * 0
    elif GATHER_A:  # fused gather: A's row is the token's row of x, no permuted copy of x exists
        a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0)
    else:
        a_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # int64 for the expert and row offsets: all experts' weights (deepseek-v3: 7.5e9 values) or a
    # [T*k, H] buffer at large T pass 2**31 elements; offsets inside one expert's weights do not.
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    # Weight rows are W's output columns: load a [BLOCK_K, BLOCK_N] slice of W[e]^T.
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    if GATE_UP_BOX:  # gate columns [0, BLOCK_N), up columns [BLOCK_N, 2 BLOCK_N)
        acc_gate_up = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:  # up rows F + n of the same columns n, in a second accumulator
            up_ptrs = w_ptrs + N * stride_wn
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # TMA (sm_90+): the weight tile [BLOCK_N, BLOCK_K] comes from a 2-D view W [E * N_W, K] by one
        # bulk copy; rows past N (the up half, or the next expert) are read but their columns are never
        # stored, and K past the end is zero-filled by the hardware. GEMM2's A (sorted rows, contiguous)
        # likewise: rows of the next expert land in rows that are masked at the store.
        w_row = expert * (stride_we // stride_wn) + pid_n * BLOCK_N
    for k0 in range(0, K, BLOCK_K):
        a_mask = row_ok[:, None]
        w_mask = n_ok[None, :]
        if not EVEN_K:
            a_mask = a_mask & (offs_k[None, :] < K - k0)
            w_mask = w_mask & (offs_k[:, None] < K - k0)
        if TMA_A:
            a = a_desc.load([row_start, k0])
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if GATE_UP_BOX:  # one box [gate/up, BLOCK_N, BLOCK_K] of w13 viewed as [E * 2, N, K]: one wgmma, N = 2 BLOCK_N
            w = tl.reshape(w_desc.load([expert * 2, pid_n * BLOCK_N, k0]), (2 * BLOCK_N, BLOCK_K))
            acc_gate_up = tl.dot(a, w.T, acc_gate_up)
        elif TMA_W:
            acc = tl.dot(a, w_desc.load([w_row, k0]).T, acc)
            if SWIGLU:
                acc_up = tl.dot(a, w_desc.load([w_row + N, k0]).T, acc_up)
        else:
            acc = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc)
            if SWIGLU:
                acc_up = tl.dot(a, tl.load(up_ptrs, mask=w_mask, other=0.0), acc_up)
                up_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if GATE_UP_BOX:  # wgmma's accumulator gives a thread all 2 BLOCK_N columns of its rows: a split in registers
        acc, acc_up = tl.split(tl.permute(tl.reshape(acc_gate_up, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in float32
    if SCALE_ROWS:
        scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        if ONE_TOKEN_TOPK > 0:  # the router's weights, in their own dtype
            scale = tl.where(id_ok, scale.to(tl.float32), 0.0)
        acc = acc * scale[:, None]
    if SCATTER_C and ONE_TOKEN_TOPK == 0:  # sorted row -> its token slot t*k + j (ONE_TOKEN_TOPK: rows are slots)
        c_rows = tl.load(c_rows_ptr + rows, mask=row_ok, other=0)
    else:
        c_rows = rows
    c_ptrs = c_ptr + c_rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
    if SUM_SLOTS_LAST:
        _last_arrival_sums_slots(c_ptr, 0, stride_cm, stride_cn, offs_n, n_ok, y_ptr, arrivals_ptr, pid_n, 1,
                                 ONE_TOKEN_TOPK, BLOCK_N)


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _moe_gemm_kernel(a_ptr, w_ptr, c_ptr, a_rows_ptr, c_rows_ptr, row_scale_ptr,
                     offsets_ptr, block_expert_ptr, block_row_start_ptr, num_blocks_ptr,
                     N, K, M_BUCKET, A_ROWS,  # M_BUCKET: rows per expert (power of 2), an autotune key only
                     stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
                     E: tl.constexpr, E_PAD: tl.constexpr, GATHER_A: tl.constexpr,
                     SWIGLU: tl.constexpr, SCALE_ROWS: tl.constexpr, SCATTER_C: tl.constexpr,
                     MAP_FROM_OFFSETS: tl.constexpr, PERSISTENT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                     TMA_W: tl.constexpr = False, TMA_A: tl.constexpr = False,
                     FLATTEN: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
                     USE_PDL: tl.constexpr = False, ONE_TOKEN_TOPK: tl.constexpr = 0,
                     y_ptr=None, arrivals_ptr=None, num_arrivals=0, SUM_SLOTS_LAST: tl.constexpr = False,
                     ZERO_COUNTERS: tl.constexpr = False, GATE_UP_BOX: tl.constexpr = False):
    wait_for_previous_kernel(USE_PDL)  # first: making a TMA descriptor below writes global scratch
    if ZERO_COUNTERS:  # for the GEMM2 that follows (SUM_SLOTS_LAST): its arrival counters start at zero
        _zero_arrivals(arrivals_ptr, num_arrivals)
    # Descriptors are made once per program (in-kernel: a little global scratch from the allocator
    # given to triton.set_allocator), not per tile.
    if GATE_UP_BOX:  # w13 [E, 2N, K] as [E * 2, N, K]: rows past N of a half are zero-filled, not the next half's
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * 2, N, K], strides=[N * stride_wn, stride_wn, 1],
                                           block_shape=[2, BLOCK_N, BLOCK_K])
    elif TMA_W:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E * (stride_we // stride_wn), K],
                                           strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        w_desc = w_ptr
    if TMA_A:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[A_ROWS, K], strides=[stride_am, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
    else:
        a_desc = a_ptr
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # The number of row blocks is only known on the device (it depends on the routing).
    if ONE_TOKEN_TOPK > 0:
        num_pid_m = ONE_TOKEN_TOPK
    elif MAP_FROM_OFFSETS:
        _, _, _, blocks, _ = _expert_row_blocks(offsets_ptr, E, E_PAD, BLOCK_M)
        num_pid_m = tl.sum(blocks, 0)
    else:
        num_pid_m = tl.load(num_blocks_ptr)
    num_tiles = num_pid_m * num_pid_n
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN,
                             warp_specialize=WARP_SPECIALIZE):
            _gemm_tile(tile, num_pid_m, num_pid_n, a_ptr, w_ptr, c_ptr, a_rows_ptr, c_rows_ptr,
                       row_scale_ptr, offsets_ptr, block_expert_ptr, block_row_start_ptr, N, K,
                       stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
                       a_desc, w_desc, E, E_PAD, GATHER_A, SWIGLU, SCALE_ROWS, SCATTER_C,
                       MAP_FROM_OFFSETS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, TMA_W, TMA_A,
                       ONE_TOKEN_TOPK, y_ptr, arrivals_ptr, SUM_SLOTS_LAST, GATE_UP_BOX)
    else:
        tile = tl.program_id(0)
        if tile < num_tiles:  # the grid is a host-side upper bound; the rest exit at once
            _gemm_tile(tile, num_pid_m, num_pid_n, a_ptr, w_ptr, c_ptr, a_rows_ptr, c_rows_ptr,
                       row_scale_ptr, offsets_ptr, block_expert_ptr, block_row_start_ptr, N, K,
                       stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
                       a_desc, w_desc, E, E_PAD, GATHER_A, SWIGLU, SCALE_ROWS, SCATTER_C,
                       MAP_FROM_OFFSETS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, TMA_W, TMA_A,
                       ONE_TOKEN_TOPK, y_ptr, arrivals_ptr, SUM_SLOTS_LAST, GATE_UP_BOX)


def _autotune_bench(fn, quantiles):
    # Shorter than the autotuner's default (25 ms warm-up, 100 ms of reps per config), because a
    # preset sweep tunes every (GEMM role, shape) key over every config: hundreds of measurements.
    return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles)


def _interpreter_bench(fn, quantiles):
    # do_bench needs a GPU driver; under the interpreter a host clock lets the autotuner code path
    # run (in tests). The choice it makes means nothing for a GPU.
    fn()
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


AUTOTUNE_KEY = ["N", "K", "M_BUCKET", "E", "GATHER_A", "SWIGLU", "SCALE_ROWS", "SCATTER_C",
                "MAP_FROM_OFFSETS", "PERSISTENT", "TMA_W", "TMA_A", "FLATTEN", "WARP_SPECIALIZE", "GATE_UP_BOX"]
_TUNERS: dict[tuple[TileConfig, ...], triton.runtime.Autotuner] = {}
# From this many rows per expert (M_BUCKET, a power of two) on, the autotuner is not offered tiles of fewer than
# WIDE_ROWS_MIN_BLOCK_M rows.
WIDE_ROWS_BUCKET = 32
WIDE_ROWS_MIN_BLOCK_M = 64


def _drop_small_row_tiles(configs, named_args, **kwargs):
    """The autotuner's early prune: at M_BUCKET >= WIDE_ROWS_BUCKET (more than 16 rows per expert on average),
    only tiles of at least WIDE_ROWS_MIN_BLOCK_M rows (all configs if none is that tall).

    Why (H100, results/h100/cli_s14): at mixtral T = 128 (32 rows per expert) the 16- and 32-row GEMM1 tiles
    take 1.42-1.59 ms against 1.01 for the 64-row one the autotuner picks in every other sweep: an expert whose
    rows take two short blocks streams its weights twice, while the padded rows of one taller block cost little
    at so few rows. One full CLI sweep still picked a slow one (1.567 ms, slower than grouped_mm), once in many
    runs: with 40 ms of timing per candidate, a candidate that never wins is only a chance to lose."""
    if named_args["M_BUCKET"] < WIDE_ROWS_BUCKET:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] >= WIDE_ROWS_MIN_BLOCK_M] or configs


def _autotuned_kernel(configs: tuple[TileConfig, ...]):
    """One autotuner per config list (they differ by GPU, fused gate/up and decode), all around the
    same kernel. The key holds every flag, so each GEMM role keeps its own best config."""
    if configs not in _TUNERS:
        _TUNERS[configs] = triton.autotune(
            configs=[c.as_triton() for c in configs], key=AUTOTUNE_KEY,
            prune_configs_by=dict(early_config_prune=_drop_small_row_tiles),
            do_bench=_interpreter_bench if interpreting() else _autotune_bench,
        )(_moe_gemm_kernel)
    return _TUNERS[configs]


def autotune_report() -> list[str]:
    """One line per tuned (GEMM role, shape): the key and the config the autotuner chose."""
    return describe_tuners(_TUNERS.values(), AUTOTUNE_KEY)


def describe_tuners(tuners, key_names) -> list[str]:
    """The autotuners' choices as lines "key=value ... -> BM..-BN..-BK..-G..-w..-s.." (shared with int4)."""
    lines = []
    for tuner in tuners:
        for key, cfg in tuner.cache.items():
            named = " ".join(f"{k}={v}" for k, v in zip(key_names, key, strict=False))
            kw = cfg.kwargs
            lines.append(f"{named} -> BM{kw['BLOCK_M']}-BN{kw['BLOCK_N']}-BK{kw['BLOCK_K']}-G{kw['GROUP_M']}"
                         f"-w{cfg.num_warps}-s{cfg.num_stages}")
    return lines


# --------------------------------------------------------------------------------------------------
# One grouped GEMM over a RoutingPlan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How tiles are ordered and handed to programs: what v1..v4 change."""

    grouped: bool  # GROUP_M tile order (v2+); else row-major
    persistent: bool  # one program per SM looping over tiles (v3+)
    map_from_offsets: bool  # row blocks derived in the kernel from expert_offsets (v4+), else BlockMap
    autotuned: bool  # tile shapes from the autotuner (v4+)


SCHEDULES = {
    1: Schedule(grouped=False, persistent=False, map_from_offsets=False, autotuned=False),
    2: Schedule(grouped=True, persistent=False, map_from_offsets=False, autotuned=False),
    3: Schedule(grouped=True, persistent=True, map_from_offsets=False, autotuned=False),
    4: Schedule(grouped=True, persistent=True, map_from_offsets=True, autotuned=True),
}


def _alloc(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every intermediate buffer comes from here (uninitialised; the kernels write every element): on like's
    device, in dtype (default: like's). The tests replace it with a NaN-filled allocator to prove that."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


@triton.jit
def _sum_slots_kernel(part_ptr, y_ptr, H, stride_ps, stride_pm, stride_ym, TOP_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """y[t] = sum over K slices s and slots j of part[s, t*k + j], in float32 and this fixed order, rounded once
    to y's dtype. Grid (T, H blocks)."""
    wait_for_previous_kernel(USE_PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for sl in tl.static_range(SPLIT_K):
        for j in tl.static_range(TOP_K):
            acc += tl.load(part_ptr + sl * stride_ps + (t * TOP_K + j).to(tl.int64) * stride_pm + offs, mask=ok,
                           other=0.0).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


SUM_SLOTS_BLOCK = 1024  # columns per program of _sum_slots_kernel


def sum_slots(part: torch.Tensor, num_tokens: int, top_k: int, like: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """y [T, H] (like's dtype) = the sum over token slots (and K slices) of part: [T*k, H], or [S, T*k, H] of S
    K slices' partial sums. One launch. It replaces torch's part.view(T, k, H).sum(1), which took 5 us at T = 1
    on an H100 (results/h100/decode_breakdown_v1) for a few KB, with the same arithmetic: float32 sums in a
    fixed order (deterministic), rounded once. pdl: launch with programmatic dependent launch (kernels/pdl.py)."""
    slices = part if part.dim() == 3 else part[None]
    H = slices.shape[-1]
    if slices.shape[1] != num_tokens * top_k or slices.stride(-1) != 1:
        raise ValueError(f"part {tuple(part.shape)} is not [(S,) T*k = {num_tokens * top_k}, H], unit column stride")
    y = _alloc((num_tokens, H), like)
    if num_tokens == 0:
        return y
    block = min(SUM_SLOTS_BLOCK, next_power_of_2(H))
    launch(_sum_slots_kernel, (num_tokens, cdiv(H, block)),
           (slices, y, H, slices.stride(0), slices.stride(1), y.stride(0)),
           dict(TOP_K=top_k, SPLIT_K=slices.shape[0], BLOCK=block, **pdl_launch(pdl)))
    return y


def one_token_routing(plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(topk_ids [k], topk_weights [k]) as views, when a single token's forward can read the router's top-k
    directly instead of the plan's sorted tensors: T = 1, integer ids of 32 or 64 bits and float weights, each
    with unit stride along k (one load per slot). None otherwise (the caller uses the plan). A single token's k
    slots need no sorting; row j is slot j."""
    ids, route_w = plan.topk_ids, plan.topk_weights
    if plan.num_tokens != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.stride(1) != 1 \
            or route_w.stride(1) != 1:
        return None
    return ids.view(-1), route_w.view(-1)


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, plan: RoutingPlan, out: torch.Tensor, *,
                 gather_rows: bool = False, swiglu: bool = False, scale_rows: bool = False,
                 scatter_rows: bool = False, version: int = 4, config: TileConfig | None = None,
                 configs: list[TileConfig] | None = None, tma: bool | None = None, pdl: bool = False,
                 topk_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                 sum_into: tuple[torch.Tensor, torch.Tensor] | None = None,
                 zero_arrivals: torch.Tensor | None = None) -> torch.Tensor:
    """out = one grouped GEMM over the plan's expert-sorted rows; returns out.

    a            [T, K] with gather_rows (row r reads a[sorted_token_ids[r]]), else [T*k, K] sorted
    w            [E, N, K], or [E, 2N, K] with swiglu (out = silu(a @ w[:N]^T) * (a @ w[N:]^T))
    out          [T*k, N]: row r in sorted order, or at its token slot sorted_slots[r] with scatter_rows
    scale_rows   multiplies row r by sorted_weights[r]
    version      1..4: the Schedule (see SCHEDULES)
    config       one tile config (no autotuning); default: DEFAULT_CONFIG for v1..v3, else the
                 MOE_TUT_TRITON_CONFIG pin, else the autotuner over `configs`
                 (get_autotune_configs filtered by shared memory when not given)
    tma          (v4 only) load the weights, and a sorted A, through TMA tensor descriptors: True,
                 False, or None for MOE_TUT_TRITON_TMA / USE_TMA_DEFAULT; only where tma_supported()
                 and the tensors meet TMA's alignment rules, else the pointer loads
    pdl          launch with programmatic dependent launch (kernels/pdl.py)
    topk_rows    (T = 1, version 4) one_token_routing(plan): the rows are the token's k slots in slot order,
                 read from these views of the router's top-k; the plan's sorted tensors are not read (a deferred
                 plan stays unbuilt), out's row j is slot j, and scatter_rows changes nothing
    sum_into     (with topk_rows and k > 1, one fixed config) (y [1, N], arrivals [>= cdiv(N, BLOCK_N)] int32,
                 all zero): also y = the sum of out's k rows, done by the last program of each column block to
                 store its slot's row (_gemm_tile, SUM_SLOTS_LAST); the counters are left at k, not zero
    zero_arrivals int32 counters this launch zeroes (before its own work) for a later sum_into launch
    """
    schedule = SCHEDULES[version]
    E, n_w, K = w.shape
    N = n_w // 2 if swiglu else n_w
    rows = plan.num_rows
    if swiglu and n_w % 2:
        raise ValueError(f"swiglu needs w [E, 2N, K], got {tuple(w.shape)}")
    if a.shape[1] != K or out.shape != (rows, N) or E != plan.num_experts:
        raise ValueError(f"shapes do not fit: a {tuple(a.shape)}, w {tuple(w.shape)}, out {tuple(out.shape)}, "
                         f"plan with E={plan.num_experts} and {rows} rows (swiglu={swiglu})")
    if a.shape[0] != (plan.num_tokens if gather_rows else rows):
        raise ValueError(f"a has {a.shape[0]} rows; expected {plan.num_tokens if gather_rows else rows}")
    if rows == 0:
        return out

    if config is None and not schedule.autotuned:
        config = INTERPRETER_CONFIG if interpreting() else DEFAULT_CONFIG
    if config is None:
        config = pinned_config()
    if config is None and configs is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is not None and not schedule.grouped:
        config = replace(config, group_m=1)
    if config is None:
        elem = w.element_size()
        configs = _fit_all(configs or get_autotune_configs(fused_gate_up=swiglu), w.device,
                           2 if swiglu else 1, elem)
        if len(configs) == 1:
            config = configs[0]

    if sum_into is not None:
        if topk_rows is None or plan.top_k < 2 or config is None:
            raise ValueError("sum_into needs topk_rows, top_k > 1 and one tile config (the autotuner's trial "
                             "launches would count arrivals too)")
        y, arrivals = sum_into
        if y.shape != (1, N) or not y.is_contiguous() or arrivals.dtype != torch.int32 \
                or arrivals.numel() < cdiv(N, config.block_n):
            raise ValueError(f"sum_into: y must be [1, {N}] contiguous and arrivals int32 with at least "
                             f"{cdiv(N, config.block_n)} counters; got y {tuple(y.shape)}, arrivals "
                             f"{tuple(arrivals.shape)} {arrivals.dtype}")
    if zero_arrivals is not None and zero_arrivals.dtype != torch.int32:
        raise ValueError(f"zero_arrivals must be int32, got {zero_arrivals.dtype}")
    if topk_rows is not None:
        if version != 4:
            raise ValueError(f"topk_rows needs version 4 (v4's schedule), got version {version}")
        ids, route_w = topk_rows
        routing = (ids, ids, route_w, ids, ids, ids, ids)  # the kernel reads ids as each row block's expert
    elif schedule.map_from_offsets:
        block_expert = block_row_start = num_blocks = plan.expert_offsets  # unused by the kernel
    else:
        block_map = plan.block_map(config.block_m)  # v1..v3 never autotune, so BLOCK_M is known
        block_expert, block_row_start = block_map.block_expert, block_map.block_row_start
        num_blocks = block_map.num_blocks
    sms, on_gpu = num_sms(w.device), w.device.type == "cuda"
    tma_w = schedule.map_from_offsets and want_tma(w.device, tma) and _tma_ok(w)
    tma_a = tma_w and not gather_rows and _tma_ok(a)
    gate_up_box = tma_w and swiglu and w.stride(0) == n_w * w.stride(1) and gate_up_in_one_box()
    flatten, warp_specialize = loop_options() if schedule.persistent else (False, False)
    if tma_w and on_gpu:
        _ensure_allocator()

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        tiles = max_row_blocks(rows, E, bm) * cdiv(N, bn)
        if not schedule.persistent:
            return (tiles,)
        per_sm = persistent_programs_per_sm(bm, bn * (2 if swiglu else 1)) if on_gpu else 1
        return (min(tiles, sms * per_sm),)

    if topk_rows is None:
        routing = (plan.sorted_token_ids, plan.sorted_slots, plan.sorted_weights, plan.expert_offsets, block_expert,
                   block_row_start, num_blocks)
    args = (a, w, out, *routing,
            N, K, min(4096, next_power_of_2(cdiv(rows, E))), a.shape[0],
            a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1))
    flags = dict(E=E, E_PAD=max(16, next_power_of_2(E)), GATHER_A=gather_rows, SWIGLU=swiglu,
                 SCALE_ROWS=scale_rows, SCATTER_C=scatter_rows, MAP_FROM_OFFSETS=schedule.map_from_offsets,
                 PERSISTENT=schedule.persistent, TMA_W=tma_w, TMA_A=tma_a, GATE_UP_BOX=gate_up_box, FLATTEN=flatten,
                 WARP_SPECIALIZE=warp_specialize, ONE_TOKEN_TOPK=0 if topk_rows is None else plan.top_k,
                 **pdl_launch(pdl))
    if sum_into is not None:
        flags.update(y_ptr=sum_into[0], arrivals_ptr=sum_into[1], SUM_SLOTS_LAST=True)
    elif zero_arrivals is not None:
        flags.update(arrivals_ptr=zero_arrivals, num_arrivals=zero_arrivals.numel(), ZERO_COUNTERS=True)
    if config is not None:
        flags.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                     num_warps=config.num_warps, num_stages=config.num_stages)
        launch(_moe_gemm_kernel, grid, args, flags)
    else:
        launch(_autotuned_kernel(tuple(configs)), grid, args, flags)
    return out


def grouped_gemm_reference(a: torch.Tensor, w: torch.Tensor, plan: RoutingPlan, *, gather_rows=False,
                           swiglu=False, scale_rows=False, scatter_rows=False) -> torch.Tensor:
    """What grouped_gemm computes, in plain PyTorch and float32 (returns float32)."""
    rows = plan.num_rows
    a_sorted = a[plan.sorted_token_ids.long()] if gather_rows else a
    N = w.shape[1] // 2 if swiglu else w.shape[1]
    out = torch.zeros(rows, N, dtype=torch.float32, device=a.device)
    offsets = plan.expert_offsets.tolist()
    for e in range(plan.num_experts):
        r = slice(offsets[e], offsets[e + 1])
        h = a_sorted[r].float() @ w[e].float().t()
        out[r] = torch.nn.functional.silu(h[:, :N]) * h[:, N:] if swiglu else h
    if scale_rows:
        out = out * plan.sorted_weights[:, None]
    if scatter_rows:
        out = out[plan.slot_to_sorted.long()]
    return out


# --------------------------------------------------------------------------------------------------
# MoE forwards
# --------------------------------------------------------------------------------------------------


def _unfused_forward(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan, version: int,
                     config: TileConfig | None) -> torch.Tensor:
    """v1..v4: GEMM1 over all 2F columns, SwiGLU and the combine in PyTorch, GEMM2 in between."""
    check_inputs(x, weights, plan)
    T, H = x.shape
    F = weights.ffn_size
    if T == 0:  # nothing routed (e.g. an expert-parallel rank with no tokens)
        return x.new_zeros(0, H)
    h = grouped_gemm(x, weights.w13, plan, _alloc((plan.num_rows, 2 * F), x), gather_rows=True,
                     version=version, config=config)
    out_sorted = grouped_gemm(swiglu(h), weights.w2, plan, _alloc((plan.num_rows, H), x),
                              version=version, config=config)
    return combine(out_sorted, plan, x.dtype)


@torch.no_grad()
def moe_forward_v1(x, weights, plan, *, config: TileConfig | None = None) -> torch.Tensor:
    """One launch per GEMM over every expert's tiles (BlockMap), row-major tile order, fused gather."""
    return _unfused_forward(x, weights, plan, 1, config)


@torch.no_grad()
def moe_forward_v2(x, weights, plan, *, config: TileConfig | None = None) -> torch.Tensor:
    """v1 + grouped (GROUP_M) tile order, so concurrent programs share weight tiles in L2."""
    return _unfused_forward(x, weights, plan, 2, config)


@torch.no_grad()
def moe_forward_v3(x, weights, plan, *, config: TileConfig | None = None) -> torch.Tensor:
    """v2 + persistent programs (one per SM) looping over a tile count read on the device."""
    return _unfused_forward(x, weights, plan, 3, config)


@torch.no_grad()
def moe_forward_v4(x, weights, plan, *, config: TileConfig | None = None) -> torch.Tensor:
    """v3 + autotuned tile shapes (row blocks derived in the kernel, since BLOCK_M is tuned)."""
    return _unfused_forward(x, weights, plan, 4, config)


def fast_path_configs(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan
                      ) -> tuple[str, list[TileConfig], list[TileConfig]]:
    """("decode" or "prefill", GEMM1 candidates, GEMM2 candidates) the fast path would autotune over
    (on the GPU, without a pinned config)."""
    E, H, F = weights.num_experts, weights.hidden_size, weights.ffn_size
    decode = is_decode(plan.num_tokens, plan.top_k, E)
    blocks = min(E, plan.num_rows) if decode else 0  # touched experts, one 16-row block each on average
    regime, c1, c2 = _fast_path_configs(decode, E, H, F, weights.w13.element_size(), blocks, torch.device(x.device))
    return regime, list(c1), list(c2)


@functools.lru_cache(maxsize=256)
def _fast_path_configs(decode: bool, E: int, H: int, F: int, elem: int, blocks: int, device: torch.device
                       ) -> tuple[str, tuple[TileConfig, ...], tuple[TileConfig, ...]]:
    if decode:
        sms, limit = num_sms(device), smem_limit(device)
        return ("decode", tuple(get_decode_configs(F, blocks, sms, True, limit, elem)),
                tuple(get_decode_configs(H, blocks, sms, False, limit, elem)))
    return ("prefill", tuple(_fit_all(get_autotune_configs(True), device, 2, elem)),
            tuple(_fit_all(get_autotune_configs(False), device, 1, elem)))


@torch.no_grad()
def moe_forward_triton(x: torch.Tensor, weights: ExpertWeights, plan: RoutingPlan, *,
                       config: TileConfig | None = None, config2: TileConfig | None = None,
                       tma: bool | None = None) -> torch.Tensor:
    """The fast path: v4's schedule, SwiGLU fused into GEMM1, routing weight and slot scatter fused
    into GEMM2, decode configs for small T. `config` pins one tile config for both GEMMs, `config2`
    GEMM2's alone (else MOE_TUT_TRITON_CONFIG2, else `config`); `tma` as in grouped_gemm. Decode shapes
    launch their kernels with programmatic dependent launch where env.programmatic_launch_ok allows it."""
    check_inputs(x, weights, plan)
    T, H = x.shape
    F, k, rows = weights.ffn_size, plan.top_k, plan.num_rows
    if T == 0:
        return x.new_zeros(0, H)
    decode = is_decode(T, k, weights.num_experts)
    pdl = decode and programmatic_launch_ok(x.device)  # per call: MOE_TUT_PDL may change between captures
    config = config or pinned_config()
    config2 = config2 or pinned_config(CONFIG2_ENV) or config
    if tma is None and not os.environ.get(TMA_ENV, "").strip() and decode:
        tma = False  # decode tiles were no faster with TMA on the H100 (0-7% slower at T = 1; LOG v1)
    configs1 = configs2 = None
    if config is None or config2 is None:
        if interpreting():
            big = INTERPRETER_DECODE_CONFIG if decode else INTERPRETER_CONFIG
            config, config2 = config or big, config2 or big
        else:
            _, configs1, configs2 = fast_path_configs(x, weights, plan)
    topk_rows = one_token_routing(plan)  # T = 1: from the router's top-k, no sorting
    # T = 1, k > 1, one known GEMM2 tile: GEMM2's last program per column block sums the slots (no third kernel)
    gemm2_config = config2 or (configs2[0] if configs2 is not None and len(configs2) == 1 else None)
    sum_in_gemm2 = topk_rows is not None and k > 1 and gemm2_config is not None and one_token_sum_in_gemm2()
    arrivals = torch.empty(cdiv(H, gemm2_config.block_n), dtype=torch.int32, device=x.device) \
        if sum_in_gemm2 else None
    inter = grouped_gemm(x, weights.w13, plan, _alloc((rows, F), x), gather_rows=True, swiglu=True,
                         version=4, config=config, configs=configs1, tma=tma, pdl=pdl, topk_rows=topk_rows,
                         zero_arrivals=arrivals)
    # Slot t*k + j is row t*k + j of a [T*k, H] buffer, i.e. [T, k, H]; with k = 1 that is y itself.
    out = _alloc((rows, H), x)
    y = _alloc((T, H), x) if sum_in_gemm2 else None
    # GEMM2 keeps the plain launch: started early it made mixtral T=1 26 us slower on an H100 (249 -> 274 us,
    # results/h100/pdl_v1), most likely because its persistent programs then land on the SMs GEMM1 frees first,
    # more than one per SM, instead of one on each (the cause cuda_int4's GEMM2 showed, see csrc/moe_int4.cu).
    grouped_gemm(inter, weights.w2, plan, out, scale_rows=True, scatter_rows=True, version=4,
                 config=gemm2_config, configs=configs2, tma=tma, topk_rows=topk_rows,
                 sum_into=(y, arrivals) if sum_in_gemm2 else None)
    if k == 1:
        return out
    return y if sum_in_gemm2 else sum_slots(out, T, k, x, pdl=pdl)


VERSIONS = {
    "v1": moe_forward_v1,
    "v2": moe_forward_v2,
    "v3": moe_forward_v3,
    "v4": moe_forward_v4,
    "fast": moe_forward_triton,
}


def fast_path_extra_bytes(T: int, top_k: int, H: int, F: int, elem_bytes: int = 2) -> int:
    """Temporaries of moe_forward_triton: the SwiGLU output [T*k, F] and, for k > 1, the slot rows
    [T*k, H] (y itself is the output, not extra)."""
    rows = T * top_k
    return rows * F * elem_bytes + (rows * H * elem_bytes if top_k > 1 else 0)


def unfused_extra_bytes(T: int, top_k: int, H: int, F: int, elem_bytes: int = 2) -> int:
    """Temporaries of v1..v4: h [T*k, 2F], its SwiGLU [T*k, F], GEMM2's rows [T*k, H], the combine."""
    rows = T * top_k
    return rows * (3 * F + H) * elem_bytes + rows * H * (elem_bytes + 8) + T * H * 4

