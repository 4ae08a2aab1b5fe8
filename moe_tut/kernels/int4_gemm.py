"""Triton W4A16 MoE forward: the fused grouped GEMM of grouped_gemm.py with INT4 weights.

What it computes: the same MoE forward as moe_forward_triton (DESIGN.md),

    y[t] += g * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))

with each weight value taken as the bf16 number quant.dequantize gives for it, but read from the
4-bit format of moe_tut/quant.py (Int4ExpertWeights) and dequantised in registers inside the K loop:
no dequantised copy of any weight ever exists in memory, so a forward reads ~0.52 byte per weight
value (group 128, symmetric) instead of 2.

    x        [T, H]            bf16 (or fp16: weights dequantise to the activation dtype)
    w13      QuantizedTensor of [E, 2F, H]: packed [E, 2F, H/2] uint8, scales/zeros [E, H/G, 2F] bf16
    w2       QuantizedTensor of [E, H, F]:  packed [E, H, F/2]  uint8, scales/zeros [E, F/G, H]  bf16
    y        [T, H]            in x.dtype
    one byte packed[e, n, j] = code of k = 2j (low nibble) | code of k = 2j+1 (high nibble) << 4
    w[e, n, k] = bf16(c * s + z) in float32, z = -8 s (symmetric) or the stored zero (asymmetric)

Pipeline (as the bf16 fast path, rows = T*k):

    x --GEMM1: gather rows, INT4 w13, SwiGLU epilogue--> act [rows, F] (sorted order)
      --GEMM2: INT4 w2, * routing weight, scatter to slot t*k+j--> out [T, k, H]
      --sum over k (float32 accumulation)--> y.   For top_k = 1, GEMM2 writes y directly.

Grid: persistent programs (up to four per SM, grouped_gemm.persistent_programs_per_sm) loop over
the output tiles of all experts. A tile is BLOCK_M sorted rows of one expert x BLOCK_N output
columns; the tile -> (expert, rows) map is derived on the device from expert_offsets with
grouped_gemm's helpers (_tile_coords, _locate_row_block), so there is no host sync and a forward
can be captured in a CUDA graph.

One K step of a tile (BLOCK_K values of K):

    bytes [BLOCK_N, BLOCK_K/2] uint8   loaded along K, the packed tensor's contiguous dim: each
                                       column's BLOCK_K/2 bytes are one run (64 B at BLOCK_K = 128)
    c = interleave(bytes & 0xF, bytes >> 4)      [BLOCK_N, BLOCK_K] codes, k = 2j low, 2j+1 high
    w = (c * s + z).to(bf16)                      float32 fma, one rounding: quant.dequantize's bits
    acc[BLOCK_N, BLOCK_M] += w @ x_tile^T         tensor cores (tl.dot), float32 accumulator

Why this unpack idiom: tl.interleave (join + reshape along the last dim) puts the low nibble of
byte j at k = 2j and the high one at 2j+1, exactly the packing order, and because K is the last dim
of both the loaded bytes and the weight tile no permute is needed (loading [BLOCK_K/2, BLOCK_N]
instead would need join -> permute -> reshape). The arithmetic is float32 because quant.py defines
the value as c * s + z computed in float32 and rounded once; c * s is exact there (4-bit integer
times an 8-bit mantissa), so the result is bit-identical to dequantize (on a GPU; Triton's
interpreter truncates float32 -> bf16, ~1 ulp on half the values). Multiplying in bf16 would round
twice for asymmetric weights.

Why the weights are the dot's LEFT operand (acc is [BLOCK_N, BLOCK_M], i.e. out^T = W x^T): the
dequantised tile lives in registers, and Hopper's wgmma reads its left operand from registers but its
right one only from shared memory, so W on the left skips a register -> shared -> register round
trip. It also fits decode: the few token rows become the MMA's N dimension (8..256 allowed), not its
M (64 per warpgroup), so a 16-row tile wastes nothing.

Groups: scales hold one row per G values of K. When BLOCK_K divides G, a K step needs one scale row
(BLOCK_N contiguous bf16); when G divides BLOCK_K (G a power of two), the tile is viewed as
[BLOCK_N, BLOCK_K/G, G] and gets BLOCK_K/G scale rows. Any other pair is refused on the host, so the
group size must be a power of two or a multiple of 16 (tl.dot's smallest BLOCK_K).

Regimes, chosen by shape with the bf16 kernel's rule at its own threshold (grouped_gemm.is_decode: T*k/E <=
DECODE_MAX_ROWS_PER_EXPERT_INT4 = 16 rows per expert on average; MOE_TUT_DECODE_MAX_ROWS sets both kernels'):

    prefill  many rows per expert, compute-bound: the autotuner picks among large tiles
             (get_prefill_configs); the dequant cost per weight value is shared by BLOCK_M rows.
    decode   1-16 rows per expert, memory-bound: the forward is a stream of the touched experts'
             packed weights. BLOCK_M = 16 and N is split: only BLOCK_N (32/64/128) that give at
             least one tile per SM are kept, so every SM streams its share (get_decode_configs).
             K is not split: on the target shapes (mixtral, deepseek-v3, qwen3, glm5) N alone gives
             hundreds to thousands of tiles at T = 1, GEMM1's SwiGLU needs the full sum before its
             epilogue, and a split GEMM2 would need float32 atomics or a second pass.
             Its kernels (GEMMs, finishers, sum over k) use programmatic dependent launch on sm_90+
             (kernels/pdl.py; MOE_TUT_PDL=0 turns it off), except a GEMM 2 of one wave
             (decode_gemm2_one_wave).

Experimental switches (Int4Variant; argument `variant` or MOE_TUT_TRITON_INT4_VARIANT, default off,
measured by scripts/gpu_triton_int4_tune.py): `magic` turns codes into floats with an integer OR into
a float's mantissa instead of I2F; `post` multiplies the raw codes in the dot and applies scale and
zero to each K step's [BLOCK_N, BLOCK_M] partial sum; `split` feeds low and high nibbles to two dots
against the even / odd rows of the A tile instead of interleaving them; `ppsm=N` sets the persistent
programs per SM. v0's decode loop is bound by its two conversions per weight value (I2F, F2F; see
results/h100/LOG.md, section triton_int4), which magic + post remove. `gemv` (or `gemv=N`) sends decode
batches of T <= 4 (N) tokens to the GEMV kernels of int4_gemv.py, which use no tl.dot, and `gemvrows=R` also those
whose experts get at most R rows on average (default gemv=4,gemvrows=1, measured with scripts/gpu_int4_gemv.py and
scripts/gpu_env_ab.py). Prefill runs `stack` (GEMM1's gate and up rows as one weight tile,
alternating in 8-row blocks, one dot) and `packed` (the weight tile built by inline PTX: prmt/lop3 unpack,
then fma.rn.bf16x2 with the scale), measured with scripts/gpu_triton_int4_tune.py and
scripts/gpu_int4_prefill_gemms.py (results/h100/LOG.md, session 6), with `korder` (that unpack in K order, no
interleave; session 16). The decode path's `asm` unpack runs on byte pairs (`pairs`, session 16).

A pinned config (argument `config`, or MOE_TUT_TRITON_INT4_CONFIG="BM,BN,BK,GROUP_M,warps,stages")
overrides both; `path="decode"/"prefill"` forces a regime (tests use it). Under Triton's CPU
interpreter each regime runs one large config (cost there grows with programs x K steps).

The plain-PyTorch reference is int4_moe_reference below: the float32 reference forward on the
dequantised weights, one expert at a time (so glm5-size weights never exist dequantised at once).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..backends.base import check_inputs
from ..env import env_choice, env_parsed, interpreting, programmatic_launch_ok
from ..quant import QuantizedTensor, dequantize, int4_moe_reference  # noqa: F401  (re-exported)
from ..routing import RoutingPlan
from ..weights import ExpertWeights
from .grouped_gemm import (
    TileConfig,
    _alloc,
    _autotune_bench,
    _capability,
    _cuda_index,
    _expert_row_blocks,
    _interpreter_bench,
    _locate_row_block,
    _tile_coords,
    describe_tuners,
    is_decode,
    max_row_blocks,
    num_sms,
    persistent_programs_per_sm,
    smem_limit,
    sum_slots,
)
from .launch import cdiv, launch, next_power_of_2
from .pdl import pdl_launch, wait_for_previous_kernel

CONFIG_ENV = "MOE_TUT_TRITON_INT4_CONFIG"
VARIANT_ENV = "MOE_TUT_TRITON_INT4_VARIANT"
DECODE_MAXNREG_ENV = "MOE_TUT_INT4_DECODE_MAXNREG"  # registers per thread for decode GEMM 2 ("0": no cap)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)  # tl.dot operands; fp32 would run as TF32 on a GPU
GEMV_MAX_TOKENS = 4  # Int4Variant "gemv" without a number: the GEMV kernels (int4_gemv) serve T <= 4
# Under the interpreter: one large tile per regime (64 x 128 x 128 is the notes' measured sweet spot).
INTERPRETER_CONFIG = TileConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=2)
INTERPRETER_DECODE_CONFIG = TileConfig(16, 128, 128, group_m=8, num_warps=4, num_stages=2)


# --------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------


def block_k_fits_group(block_k: int, group_size: int) -> bool:
    """The kernel handles a K step that lies inside one group, or that covers whole groups."""
    return group_size % block_k == 0 or block_k % group_size == 0


def check_group_size(group_size: int, name: str = "weights") -> None:
    """Clear error for a group size no power-of-two BLOCK_K >= 16 can work with."""
    if not (group_size % 16 == 0 or (group_size & (group_size - 1)) == 0):
        raise ValueError(f"{name}: group size {group_size} is not supported by the Triton INT4 kernel: a K step "
                         "(BLOCK_K, a power of two >= 16) must lie inside one group or cover whole groups, so "
                         "the group size must be a power of two or a multiple of 16 (quantise with e.g. 32, 64, "
                         "128)")


def adapt_to_group(cfg: TileConfig, group_size: int) -> TileConfig:
    """cfg with BLOCK_K lowered, if needed, to the largest power of two (>= 16) dividing the group."""
    if block_k_fits_group(cfg.block_k, group_size):
        return cfg
    bk = group_size & -group_size  # largest power of two dividing G; >= 16 when check_group_size passed
    return replace(cfg, block_k=min(cfg.block_k, bk))


def smem_bytes(cfg: TileConfig, weight_tiles: int, group_size: int, has_zeros: bool, elem_bytes: int = 2) -> int:
    """Shared memory estimate: num_stages copies of the activation tile (elem_bytes per value) and of
    the packed weight tile(s) (half a byte per value), plus one dequantised tile's worth (BLOCK_N x
    BLOCK_K x elem_bytes) for the layout-conversion scratch Triton adds (measured on sm_80 and sm_90
    for every candidate: 2-20 KB, always below that allowance). Scales and zeros are loaded into
    registers one step ahead, not staged in shared memory, so group_size and has_zeros do not count;
    they stay in the signature so callers need not know that."""
    per_stage = cfg.block_m * cfg.block_k * elem_bytes + weight_tiles * cfg.block_n * cfg.block_k // 2
    return cfg.num_stages * per_stage + cfg.block_n * cfg.block_k * elem_bytes


def fit(cfg: TileConfig, limit: int, weight_tiles: int, group_size: int, has_zeros: bool) -> TileConfig | None:
    """cfg with as many of its stages (>= 2) as fit in `limit` bytes of shared memory, or None."""
    for stages in range(cfg.num_stages, 1, -1):
        c = replace(cfg, num_stages=stages)
        if smem_bytes(c, weight_tiles, group_size, has_zeros) <= limit:
            return c
    return None


# Candidate tiles. The dequantised tile is float32 in registers before its bf16 rounding, so BLOCK_N x BLOCK_K /
# threads bounds the register use; wider tiles get 8 warps. (16, 64, 256) with 4 warps, (16, 128, 256) and
# (128, 256, 64) were dropped: they spill heavily in GEMM1. The 256-row tiles come first: at many rows per expert
# each dequantised weight value then feeds 256 rows of the MMA, and on the H100 (results/h100/
# triton_int4_prefill_v1) they took the mixtral T=8192 forward from 19.5 to 12.8 ms (with `stack`), although
# ptxas reports small spills outside the K loop (GEMM2's 256x128x64: 248 B; none inside the loop's SASS).
PREFILL_CONFIGS = (  # GEMM2 (one weight tile per step)
    TileConfig(256, 128, 64, 8, 8, 3),
    TileConfig(128, 128, 64, 8, 8, 3),
    TileConfig(128, 128, 128, 8, 8, 3),
    TileConfig(64, 128, 128, 8, 8, 3),
    TileConfig(128, 64, 64, 8, 8, 3),
    TileConfig(64, 64, 128, 8, 4, 4),
)
# (BLOCK_M, BLOCK_N) tiles only used with `packed` on a GPU: on Triton 3.6 / sm_90 the v0 dequantisation computes
# GEMM2 wrongly at 256x128x64 with zero points and group 128 (relative error 0.31 on an H100, every other tile and
# the packed path within 2e-3: results/h100/LOG.md, session 6). Without packed (fp16 activations, or a variant that
# turns it off) the autotuner does not get the tile, and pinning it with zero points is refused.
PACKED_ONLY_TILES = ((256, 128),)


def drop_packed_only(configs: list[TileConfig], has_zeros: bool) -> list[TileConfig]:
    """configs without the PACKED_ONLY_TILES, for the v0 dequantisation on a GPU. If nothing else is left: the list
    as it is for symmetric weights (the miscompile needs zero points), a ValueError with them."""
    kept = [c for c in configs if (c.block_m, c.block_n) not in PACKED_ONLY_TILES]
    if kept:
        return kept
    if has_zeros:
        raise ValueError(f"tile {configs[0]} with zero points needs the `packed` switch (bf16 activations): Triton 3.6 "
                         "computes the plain dequantisation wrongly at this tile (see int4_gemm.PACKED_ONLY_TILES); "
                         "pick another tile")
    return configs
PREFILL_CONFIGS_FUSED = (  # GEMM1 (gate and up tiles per step): half the BLOCK_N of GEMM2's
    TileConfig(256, 64, 64, 8, 8, 3),
    TileConfig(128, 64, 64, 8, 8, 3),
    TileConfig(128, 64, 128, 8, 8, 3),
    TileConfig(64, 64, 128, 8, 8, 3),
    TileConfig(128, 64, 64, 8, 4, 3),
)
# Decode tiles in order of preference (either GEMM; BLOCK_M = 16, the smallest tl.dot tile). H100
# (results/h100/triton_int4_tune_v1, _v2): 16x64x128 with 4 warps was the fastest decode tile at every
# measured point; BLOCK_N 32 runs mma.sync instead of wgmma (mixtral T=1 0.19 -> 0.27-0.31 ms) and 128 / 8
# warps was 5-20% slower. 3 stages rather than 4: 0-2.5% faster at the decode points of sessions 16-17 and never
# slower (mixtral T=16 399.1-400.8 vs 401.1-402.8 us in alternating pairs; results/h100/TRIED.md), and a
# smaller shared-memory footprint (more room on sm_80/sm_89). Too few tiles for the SMs is split-K's job now
# (decode_split_k), so the first tile that fits the GPU's shared memory is used, without autotuning.
DECODE_CONFIGS = (
    TileConfig(16, 64, 128, 8, 4, 3),
    TileConfig(16, 64, 128, 8, 4, 2),
    TileConfig(16, 32, 128, 8, 4, 2),
)
# Decode GEMM 2 under a register cap (the launch's maxnreg). ncu of mixtral T=16 on an H100 (results/h100/
# decode_regs_v1): both decode GEMMs issue 0.53-0.57 instructions per cycle per scheduler with only 3-4 programs
# (12-16 warps) per SM, set by registers (GEMM 1 168 per thread, GEMM 2 127). At 96, GEMM 2 fits 5 programs per SM
# (ptxas spills 72 bytes): where its tiles outnumber 4 programs per SM that took the forward 2.6-4% faster
# (qwen3-30b-a3b T=32/64, glm-4.5 T=32/64/128, deepseek-v3 T=64/128/256); where they fit 4 per SM in one wave
# (mixtral T=8/16/32: 512 tiles on 132 SMs) the spills only cost, +10%. 80 (6 per SM) was slower everywhere, and
# GEMM 1 at 128 (4 per SM, 24 bytes of spills) no faster. Measured on sm_90 only, so applied there only.
DECODE_GEMM2_MAXNREG = 96
DECODE_GEMM2_UNCAPPED_PROGRAMS_PER_SM = 4  # what 127 registers x 128 threads leave room for


TAIL_ENV = "MOE_TUT_INT4_PREFILL_TAIL"  # "auto" (default), "1", "0": prefill row tails in a second launch
PREFILL_TAIL_BLOCK_M = 64  # the tail launch's tile rows on a GPU (a tile of PREFILL_CONFIGS*)
INTERPRETER_TAIL_BLOCK_M = 16


def tail_split(config: TileConfig | None, configs: list[TileConfig] | None, rows_per_expert: float,
               device: torch.device) -> tuple[list[TileConfig], list[TileConfig]] | None:
    """(main launch candidates, tail launch candidates) for a prefill GEMM run as a tail split
    (grouped_gemm._expert_row_blocks), or None for one launch over every row.

    With 256-row tiles an expert's last block is mostly padding when its rows are a little over a multiple of 256
    (deepseek-v3 T=8192: 215-307 rows per expert, 66% of the tiles' rows useful), and in INT4 a padded tile costs
    its whole dequantisation and MMA. So the main launch takes the biggest candidate tiles and the rows past each
    expert's last whole tile only where more than PREFILL_TAIL_BLOCK_M remain; a second launch runs the rest in
    PREFILL_TAIL_BLOCK_M-row tiles. MOE_TUT_INT4_PREFILL_TAIL: "auto" (default) splits on a GPU where the experts
    average at least one biggest tile of rows (below that the autotuner's smaller tiles fit better) and a
    candidate of PREFILL_TAIL_BLOCK_M rows exists; "1" splits wherever it can, the interpreter too (its one tile
    then with INTERPRETER_TAIL_BLOCK_M rows for the tail); "0" never.

    H100, T = 8192 (results/h100/prefill_tail_v1): deepseek-v3 18.7 -> 16.2 ms, qwen3-30b-a3b 1.94 -> 1.84, mixtral
    12.1-12.5 -> 11.8-12.2, glm-4.5 unchanged; mixtral T=1024 2.06 -> 1.90. The bf16 kernel does not take it: there
    the tail launch reads each tailed expert's weights from HBM again (its main tiles read them long before), and a
    bf16 tile is cheap next to that: 2-20% slower on every preset measured."""
    mode = env_choice(TAIL_ENV, ("auto", "1", "0"))
    if mode == "0":
        return None
    cands = [config] if config is not None else list(configs)
    big = max(c.block_m for c in cands)
    main = [c for c in cands if c.block_m == big]
    if torch.device(device).type != "cuda" or interpreting():
        if mode != "1":
            return None
        tail = [replace(main[0], block_m=INTERPRETER_TAIL_BLOCK_M)]
    else:
        tail = [c for c in cands if c.block_m == PREFILL_TAIL_BLOCK_M]
        if mode == "auto" and rows_per_expert < big:
            return None
    if not tail or big < 2 * tail[0].block_m:
        return None
    return main, tail


def decode_tiles(rows: int, num_experts: int, N: int, block_n: int, split_k: int = 1) -> int:
    """The tiles a decode GEMM will have, as far as the host knows: one row block per touched expert (at most
    min(E, rows); decode means <= 8 rows per expert on average, so a second block is rare) x column blocks x K
    slices. The grid's bound (max_row_blocks) counts one more block per 16 rows, which over-counts: mixtral T=16
    has 8 row blocks, not 10."""
    return min(num_experts, rows) * cdiv(N, block_n) * split_k


def decode_register_cap(tiles: int, device: torch.device) -> int | None:
    """maxnreg for a decode GEMM 2 of `tiles` programs: MOE_TUT_INT4_DECODE_MAXNREG if set ("0": none), else
    DECODE_GEMM2_MAXNREG on sm_90+ when the tiles are more than DECODE_GEMM2_UNCAPPED_PROGRAMS_PER_SM per SM, else
    None. Never under the interpreter (no ptxas) or on the CPU."""
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return None
    pinned = env_parsed(DECODE_MAXNREG_ENV, _register_count)
    if pinned is not None:
        return pinned or None
    if _capability(_cuda_index(device))[0] < 9 or decode_gemm2_one_wave(tiles, device):
        return None
    return DECODE_GEMM2_MAXNREG


def decode_gemm2_one_wave(tiles: int, device: torch.device) -> bool:
    """Whether a decode GEMM 2 of `tiles` programs fits one wave of uncapped programs (at most
    DECODE_GEMM2_UNCAPPED_PROGRAMS_PER_SM per SM): such a GEMM 2 is launched after GEMM 1 ends, not under PDL.
    Started early, its programs take the slots GEMM 1 frees first, so they pile onto those SMs while the rest
    idle: on an H100, mixtral T=16 (512 tiles) ran 447-451 us under PDL and 403 us launched plainly (results/h100/
    pairs_unpack_v1); with many waves (qwen3-30b-a3b, glm-4.5, deepseek-v3 at T=32-64) the two were within 2.5 us."""
    return torch.device(device).type == "cuda" and tiles <= DECODE_GEMM2_UNCAPPED_PROGRAMS_PER_SM * num_sms(device)


def _register_count(text: str) -> int:
    regs = int(text)
    if regs and not 24 <= regs <= 255:
        raise ValueError("registers per thread must be 0 (no cap) or 24..255")
    return regs


def get_prefill_configs(fused_gate_up: bool = False) -> list[TileConfig]:
    """Candidate tiles for many rows per expert (before group and shared-memory filters).

    BLOCK_N is the MMA's M (weights on the left), so it stays >= 64 for wgmma's 64-row warpgroup
    tile; BLOCK_M (tokens) is the MMA's N.
    """
    return list(PREFILL_CONFIGS_FUSED if fused_gate_up else PREFILL_CONFIGS)


def get_decode_configs(N: int, est_row_blocks: int, sms: int, fused_gate_up: bool, limit: int,
                       group_size: int, has_zeros: bool) -> list[TileConfig]:
    """The decode tile: the first of DECODE_CONFIGS that fits `limit` bytes of shared memory (one config,
    so no autotuning). N, est_row_blocks and sms are unused since split-K keeps the SMs busy; kept so the
    call matches get_prefill_configs' callers."""
    wt = 2 if fused_gate_up else 1
    for c in DECODE_CONFIGS:
        fitted = fit(adapt_to_group(c, group_size), limit, wt, group_size, has_zeros)
        if fitted is not None:
            return [fitted]
    raise RuntimeError(f"no INT4 decode tile fits {limit // 1024} KB of shared memory per block")


@dataclass(frozen=True)
class Int4Variant:
    """Kernel switches beyond the tile shape (constexprs of _int4_step, and the grid size).

    magic            codes -> float by OR-ing them into a float's mantissa (one integer op) instead of
                     an int -> float conversion (I2F, quarter rate on sm_90: ~1 per weight value in v0)
    post_scale       the dot multiplies the raw codes; scales/zeros are applied to the [BLOCK_N, BLOCK_M]
                     partial sum of each K step (needs BLOCK_K <= group size; lowered if not): no per-value
                     float math, no float32 -> bf16 rounding of the tile. Numerics: exact products c * x
                     summed in float32, then * s, instead of bf16(c * s + z) * x (not bit-identical to
                     dequantize-then-multiply, within a few bf16 ulp of it)
    split            no interleave: the low nibbles (even k) and high nibbles (odd k) go to two dots
                     of K = BLOCK_K / 2 against the even / odd rows of the A tile
    asm              (GPU only; needs magic, post and split) the codes of 4 packed bytes become 8 magic
                     bf16/fp16 values in 8 integer ops (2 prmt, 2 shr, 4 lop3 on 32-bit words, two
                     16-bit values per op) by inline PTX, instead of ~3 ops per value on 8/16-bit lanes.
                     Same values as magic, so the same results; the interpreter runs magic instead
    pairs            (with asm) the unpack takes 2 packed bytes per call instead of 4: the tile is loaded in
                     the dot operand's layout, which holds bytes in K-adjacent pairs, and 4 per call made
                     Triton assemble each 32-bit input byte by byte (_UNPACK_PAIR_PTX)
    pipe_scales      scales (and zeros) loaded as int32 pairs of bf16 (4 bytes per thread, so Triton's
                     cp.async pipeline takes them like the A and packed tiles) in the step that uses
                     them; off: loaded one K step ahead into registers, so every short decode step
                     waits for a scale load issued one step earlier (a loaded memory latency). Needs
                     bf16 scales/zeros, even N and one group per K step; dropped where these fail
    packed           (GPU, bf16 activations; without post_scale / split) the dequantise-then-dot path with the
                     weight tile built by inline PTX on 32-bit words: the asm unpack, then two fma.rn.bf16x2 per
                     pair of values (_dequant_packed); same values as v0. Needs one group per K step (BLOCK_K
                     lowered as for post_scale); the interpreter runs v0
    korder           (with packed) the inline-PTX unpack makes the values of each byte's two nibbles in K order,
                     not low and high nibbles apart for an interleave after (_dequant_packed)
    stack            GEMM1 (SwiGLU): gate and up rows in one [2 BLOCK_N, BLOCK_K] weight tile and one dot (see
                     _int4_tile); not with pipe_scales (dropped there)
    split_k          K slices per decode GEMM tile (0: automatic, decode_split_k; 1: off), each slice's
                     float32 partial sums added up by a finisher (GEMM1: with the SwiGLU)
    programs_per_sm  persistent programs per SM (0: grouped_gemm.persistent_programs_per_sm's rule; a
                     large number means one program per tile)
    gemv             in the decode regime with T <= gemv tokens, run the GEMV kernels of int4_gemv.py
                     (no tl.dot: float32 FFMAs on codes unpacked from int32 words) instead of the tl.dot
                     kernel; 0 = off. The tile switches above do not apply there; split_k does (for both
                     GEMMs). Weights it cannot read (group size not a multiple of 8) take the tl.dot path
    gemv_rows        (with gemv) also run the GEMV kernels for decode batches of any T whose experts get at most
                     this many rows on average (T*k/E <= gemv_rows); 0 = off

    Text form (MOE_TUT_TRITON_INT4_VARIANT): comma-separated flags, e.g. "magic,post,split,ppsm=8";
    "gemv" is gemv=GEMV_MAX_TOKENS (4), "gemv=N" sets N; "" or "v0" is the default (all off).
    """

    magic: bool = False
    post_scale: bool = False
    split: bool = False
    asm: bool = False
    byte_pairs: bool = False
    pipe_scales: bool = False
    stack: bool = False
    packed: bool = False
    korder: bool = False
    split_k: int = 0
    programs_per_sm: int = 0
    gemv: int = 0
    gemv_rows: float = 0.0

    def __post_init__(self):
        if self.split_k < 0 or self.split_k & (self.split_k - 1):
            raise ValueError(f"split_k must be 0 (automatic) or a power of two, got {self.split_k}")
        if self.gemv < 0:
            raise ValueError(f"gemv is a token count (0 = off), got {self.gemv}")
        if self.gemv_rows < 0:
            raise ValueError(f"gemvrows is a mean row count per expert (0 = off), got {self.gemv_rows}")
        if self.asm and not (self.magic and self.post_scale and self.split):
            raise ValueError("the INT4 switch 'asm' needs 'magic', 'post' and 'split' too")
        if self.byte_pairs and not self.asm:
            raise ValueError("the INT4 switch 'pairs' is a form of 'asm': it needs 'asm' (and its switches) too")
        if self.packed and (self.post_scale or self.split):
            raise ValueError("the INT4 switch 'packed' is the dequantise-then-dot path: not with 'post' or 'split'")
        if self.korder and not self.packed:
            raise ValueError("the INT4 switch 'korder' is a form of 'packed': it needs 'packed' too")

    @classmethod
    def parse(cls, text: str) -> Int4Variant:
        kw: dict = {}
        for item in (t.strip() for t in text.split(",")):
            if item in ("", "v0"):
                continue
            if item == "magic":
                kw["magic"] = True
            elif item in ("post", "post_scale"):
                kw["post_scale"] = True
            elif item == "split":
                kw["split"] = True
            elif item == "asm":
                kw["asm"] = True
            elif item == "pairs":
                kw["byte_pairs"] = True
            elif item == "pipe":
                kw["pipe_scales"] = True
            elif item == "stack":
                kw["stack"] = True
            elif item == "packed":
                kw["packed"] = True
            elif item == "korder":
                kw["korder"] = True
            elif item.startswith("splitk="):
                kw["split_k"] = int(item[7:])
            elif item.startswith("ppsm="):
                kw["programs_per_sm"] = int(item[5:])
            elif item == "gemv":
                kw["gemv"] = GEMV_MAX_TOKENS
            elif item.startswith("gemv="):
                kw["gemv"] = int(item[5:])
            elif item.startswith("gemvrows="):
                kw["gemv_rows"] = float(item[9:])
            else:
                raise ValueError(f"unknown INT4 kernel switch {item!r} in {text!r} (magic, post, split, asm, pairs, "
                                 "pipe, stack, packed, korder, splitk=N, ppsm=N, gemv, gemv=N, gemvrows=R)")
        return cls(**kw)

    def label(self) -> str:
        parts = [n for n, on in (("magic", self.magic), ("post", self.post_scale), ("split", self.split),
                                              ("asm", self.asm), ("pairs", self.byte_pairs),
                                              ("pipe", self.pipe_scales),
                                              ("stack", self.stack), ("packed", self.packed),
                                              ("korder", self.korder)) if on]
        if self.split_k:
            parts.append(f"splitk={self.split_k}")
        if self.programs_per_sm:
            parts.append(f"ppsm={self.programs_per_sm}")
        if self.gemv:
            parts.append("gemv" if self.gemv == GEMV_MAX_TOKENS else f"gemv={self.gemv}")
        if self.gemv_rows:
            parts.append(f"gemvrows={self.gemv_rows:g}")
        return ",".join(parts) or "v0"

    def takes_gemv(self, T: int, top_k: int, num_experts: int) -> bool:
        """Whether a decode batch runs the GEMV kernels: T <= gemv, or at most gemv_rows rows per expert."""
        return bool(self.gemv) and (T <= self.gemv or T * top_k <= self.gemv_rows * num_experts)


# The switches each regime runs with unless a variant is passed or pinned (MOE_TUT_TRITON_INT4_VARIANT).
# All off = v0 (results/h100/triton_int4_v0) until scripts/gpu_triton_int4_tune.py has measured them.
# H100 (results/h100/triton_int4_tune_v1): magic + post-scaling + split nibbles with 64 persistent programs
# per SM was the fastest decode variant or within 2% of it at every point: mixtral T=16 0.66 -> 0.51 ms,
# deepseek-v3 T=16 1.95 -> 1.50 ms, qwen3 T=128 0.30 -> 0.24 ms. Prefill: no variant beat v0 then; `stack` did
# (results/h100/triton_int4_prefill_v1, 256-row tiles, GEMM1 alone: mixtral T=8192 9.53 -> 8.54 ms, deepseek-v3
# 13.21 -> 12.42 ms; forward 13.66 -> 12.76 and 19.90 -> 19.24 ms), and so did `packed` on top of it (GEMM alone,
# mixtral: 8.70 -> 8.10 and 4.25 -> 3.91 ms; deepseek-v3 GEMM2 6.45 -> 5.77, GEMM1 12.45 -> 12.69).
# H100 (results/h100/triton_int4_tune_v2): + the inline-PTX unpack (asm) was 1-4% faster at every decode point
# (mixtral T=1 0.152 -> 0.148 ms with split-K); split-K is automatic (decode_split_k).
# H100 (results/h100/int4_gemv_v1, full forward incl. plan, graph replay): the GEMV kernels (int4_gemv) beat
# the tl.dot decode path at T = 1, 2 and 4 on mixtral, deepseek-v3 and qwen3 with the blocks default_configs
# picks (mixtral T=1 0.128 vs 0.157 ms, T=4 0.289 vs 0.318; deepseek-v3 T=1 0.122 vs 0.154, T=4 0.392 vs
# 0.456; qwen3 T=4 0.068 vs 0.078) and lost at T = 8 on mixtral (0.537 vs 0.404): gemv=4.
# H100 (results/h100/gemv_stages_v1, session 12, GEMV GEMM1 pipelined, us): with at most one row per expert the GEMV
# kernels win at T = 8 and 16 too: deepseek-v3 T=16 1423-1430 -> 1303 (55.8 -> 60.9% of copy), T=8 821-824 -> 716;
# glm-4.5 T=16 671-675 -> 631, T=8 418-420 -> 374; qwen3-30b-a3b T=16 (exactly 1 row per expert) 153-154 -> 140,
# T=8 101 -> 86; mixtral (2 and 4 rows per expert) loses: T=8 391-394 -> 526, T=16 428-431 -> 869: gemvrows=1.
DECODE_VARIANT = Int4Variant.parse("magic,post,split,asm,pairs,ppsm=64,gemv=4,gemvrows=1")
# H100 (results/h100/pairs_unpack_v1, call 10, 3 alternating pairs): `korder` (the packed unpack in K order, no
# interleave) took deepseek-v3 T=8192 16.46-16.70 -> 16.14-16.34 ms, T=1024 6.64-6.66 -> 6.53-6.59, qwen3-30b-a3b
# T=8192 1.858-1.866 -> 1.829-1.841, mixtral T=1024 1.857-1.905 -> 1.834-1.871; mixtral T=8192 within its spread.
PREFILL_VARIANT = Int4Variant(stack=True, packed=True, korder=True)


def pinned_variant() -> Int4Variant | None:
    """The variant named by MOE_TUT_TRITON_INT4_VARIANT, if set."""
    text = os.environ.get(VARIANT_ENV)
    if text is None:
        return None
    try:
        return Int4Variant.parse(text)
    except ValueError as exc:
        raise ValueError(f"{VARIANT_ENV}: {exc}") from None


def adapt_to_variant(cfg: TileConfig, group_size: int, variant: Int4Variant) -> tuple[TileConfig, Int4Variant]:
    """post_scale and packed need one group per K step: BLOCK_K lowered to divide the group (or the switch
    dropped where no power of two >= 16 divides it)."""
    cfg = adapt_to_group(cfg, group_size)
    if (variant.post_scale or variant.packed) and group_size % cfg.block_k:
        bk = group_size & -group_size
        if bk < 16:
            return cfg, replace(variant, post_scale=False, asm=False, byte_pairs=False, packed=False, korder=False)
        cfg = replace(cfg, block_k=bk)
    return cfg, variant


@functools.lru_cache(maxsize=256)
def _adapted_candidates(configs: tuple[TileConfig, ...], group_size: int, variant: Int4Variant
                        ) -> tuple[tuple[TileConfig, ...], Int4Variant]:
    """adapt_to_variant over autotuner candidates, duplicates dropped (cached: the same lists come on every call)."""
    adapted = [adapt_to_variant(c, group_size, variant) for c in configs]
    return tuple(dict.fromkeys(c for c, _ in adapted)), adapted[0][1]


def pinned_config() -> TileConfig | None:
    """The config named by MOE_TUT_TRITON_INT4_CONFIG, if set."""
    return env_parsed(CONFIG_ENV, TileConfig.parse)


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _group_params(s_ptrs, z_ptrs, k0, K, n_ok, stride_sg, stride_zg, GROUP_SIZE: tl.constexpr,
                  HAS_ZEROS: tl.constexpr, GROUPS_PER_TILE: tl.constexpr, PAIRED: tl.constexpr = False,
                  BLOCK_N: tl.constexpr = 16):
    """Scales and zeros (float32) of the K step starting at k0: [BLOCK_N] when the step lies inside one
    group, else [BLOCK_N, GROUPS_PER_TILE]. Masked to 0 past K (the prefetch of the last step).

    PAIRED: s_ptrs / z_ptrs are int32 pointers [BLOCK_N / 2] to bf16 pairs (columns 2i, 2i+1), n_ok is
    per pair and the strides count int32 words; a bf16 becomes float32 by a 16-bit shift."""
    if PAIRED:
        tl.static_assert(GROUPS_PER_TILE == 1)
        g = k0 // GROUP_SIZE
        mask = n_ok & (g < K // GROUP_SIZE)
        w = tl.load(s_ptrs + g * stride_sg, mask=mask, other=0)
        s = tl.reshape(tl.join((w << 16).to(tl.float32, bitcast=True),
                               (w & -65536).to(tl.float32, bitcast=True)), (BLOCK_N,))
        if HAS_ZEROS:
            w = tl.load(z_ptrs + g * stride_zg, mask=mask, other=0)
            z = tl.reshape(tl.join((w << 16).to(tl.float32, bitcast=True),
                                   (w & -65536).to(tl.float32, bitcast=True)), (BLOCK_N,))
        else:
            z = -8.0 * s
    elif GROUPS_PER_TILE == 1:
        g = k0 // GROUP_SIZE
        mask = n_ok & (g < K // GROUP_SIZE)
        s = tl.load(s_ptrs + g * stride_sg, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptrs + g * stride_zg, mask=mask, other=0.0).to(tl.float32)
        else:
            z = -8.0 * s  # symmetric: (c - 8) * s == c * s + (-8 s), both exact in float32
    else:
        g = k0 // GROUP_SIZE + tl.arange(0, GROUPS_PER_TILE)
        mask = n_ok[:, None] & (g[None, :] < K // GROUP_SIZE)
        s = tl.load(s_ptrs[:, None] + g[None, :] * stride_sg, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptrs[:, None] + g[None, :] * stride_zg, mask=mask, other=0.0).to(tl.float32)
        else:
            z = -8.0 * s
    return s, z


@triton.jit
def _step_params(s_ptrs, z_ptrs, up_s_ptrs, up_z_ptrs, k0, K, n_ok, stride_sg, stride_zg, GROUP_SIZE: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, GROUPS_PER_TILE: tl.constexpr, SWIGLU: tl.constexpr, PAIRED: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """(s, z, s_up, z_up) of the K step at k0 (_group_params); without SWIGLU the up pair repeats (s, z)."""
    s, z = _group_params(s_ptrs, z_ptrs, k0, K, n_ok, stride_sg, stride_zg, GROUP_SIZE, HAS_ZEROS, GROUPS_PER_TILE,
                         PAIRED, BLOCK_N)
    if SWIGLU:
        s_up, z_up = _group_params(up_s_ptrs, up_z_ptrs, k0, K, n_ok, stride_sg, stride_zg, GROUP_SIZE, HAS_ZEROS,
                                   GROUPS_PER_TILE, PAIRED, BLOCK_N)
    else:
        s_up, z_up = s, z
    return s, z, s_up, z_up


@triton.jit
def _codes(nib, MAGIC: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """4-bit codes (uint8 0..15) as OUT_DTYPE values for the post-scale dot: c itself, or with MAGIC the
    code OR-ed into the mantissa of a power of two (bf16 0x4300 = 128, fp16 0x6400 = 1024), i.e.
    MAGIC_OFFSET + c exactly, with one integer op instead of an int -> float conversion."""
    if MAGIC:
        if OUT_DTYPE == tl.bfloat16:
            v = (nib.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
        else:
            v = (nib.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:  # via float32 (what a GPU does anyway; Triton's interpreter gets uint8 -> bf16 wrong)
        v = nib.to(tl.float32).to(OUT_DTYPE)
    return v


# Four packed bytes b3 b2 b1 b0 (one 32-bit register: Triton packs 4 uint8 per register with pack=4) ->
# low nibbles as two registers of two 16-bit magic values each (element i = byte i, low half first), high
# nibbles likewise. prmt spreads bytes (0, 1) and (2, 3) to the two 16-bit halves of a word; lop3 computes
# (t & 0x000F000F) | MAGIC in one op (lut 0xEA = (a & b) | c); shr moves the high nibbles down.
_UNPACK_PTX = """{
.reg .b32 t0, t1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, MAGIC2, 0xEA;
lop3.b32 $1, t1, 0x000F000F, MAGIC2, 0xEA;
shr.u32 t0, t0, 4;
shr.u32 t1, t1, 4;
lop3.b32 $2, t0, 0x000F000F, MAGIC2, 0xEA;
lop3.b32 $3, t1, 0x000F000F, MAGIC2, 0xEA;
}"""
UNPACK_PTX_BF16 = tl.constexpr(_UNPACK_PTX.replace("MAGIC2", "0x43004300"))
UNPACK_PTX_FP16 = tl.constexpr(_UNPACK_PTX.replace("MAGIC2", "0x64006400"))


# Two packed bytes b1 b0 (one 16-bit register: pack=2 on uint8) -> the low nibbles as one register of two 16-bit
# magic values (element i = byte i, low half first) and the high nibbles likewise. The decode path's packed tile
# sits in the i8 dot-operand layout, where each thread holds K-adjacent bytes in pairs (LDS.U16): fed 4 bytes per
# call, Triton first assembles them byte by byte into one 32-bit register (H100 SASS of mixtral's decode GEMM 1:
# 168 PRMT of 547 instructions per K step), fed 2 it passes the pair as it was loaded (56 PRMT, 435 in all).
_UNPACK_PAIR_PTX = """{
.reg .b32 t;
cvt.u32.u16 t, $2;
prmt.b32 t, t, 0, 0x4140;
lop3.b32 $0, t, 0x000F000F, MAGIC2, 0xEA;
shr.u32 t, t, 4;
lop3.b32 $1, t, 0x000F000F, MAGIC2, 0xEA;
}"""
UNPACK_PAIR_PTX_BF16 = tl.constexpr(_UNPACK_PAIR_PTX.replace("MAGIC2", "0x43004300"))
UNPACK_PAIR_PTX_FP16 = tl.constexpr(_UNPACK_PAIR_PTX.replace("MAGIC2", "0x64006400"))


@triton.jit
def _codes_asm(b, OUT_DTYPE: tl.constexpr, BYTE_PAIRS: tl.constexpr = False):
    """Packed bytes [.., n] -> (low-nibble, high-nibble) magic values [.., n] of OUT_DTYPE (see _codes), by
    inline PTX on whole registers: 4 bytes per call, or 2 with BYTE_PAIRS (for a tile loaded in a dot-operand
    layout, see _UNPACK_PAIR_PTX)."""
    if BYTE_PAIRS:
        if OUT_DTYPE == tl.bfloat16:
            v_lo, v_hi = tl.inline_asm_elementwise(UNPACK_PAIR_PTX_BF16, "=r,=r,h", [b],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            v_lo, v_hi = tl.inline_asm_elementwise(UNPACK_PAIR_PTX_FP16, "=r,=r,h", [b],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    elif OUT_DTYPE == tl.bfloat16:
        v_lo, v_hi = tl.inline_asm_elementwise(UNPACK_PTX_BF16, "=r,=r,=r,=r,r", [b],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        v_lo, v_hi = tl.inline_asm_elementwise(UNPACK_PTX_FP16, "=r,=r,=r,=r,r", [b],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    return v_lo, v_hi


# Magic bf16 codes (128 + c, two per 32-bit register) -> dequantised bf16 pairs, two fma.rn.bf16x2 (sm_80+) per
# pair. Symmetric: t = v * 1 - 136 = c - 8 (exact: small integers), w = t * s + (-0) = (c - 8) s rounded once, the
# bits quant.dequantize gives (its float32 c s - 8 s is exact, then rounded once). With zeros: t = v - 128 = c,
# w = fma(c, s, z) rounded once (dequantize rounds the float32 sum c s + z, itself exact for these magnitudes).
SCALE_PTX_SYM = tl.constexpr("""{
.reg .b32 one, off, nz, t;
mov.b32 one, 0x3F803F80;
mov.b32 off, 0xC308C308;
mov.b32 nz, 0x80008000;
fma.rn.bf16x2 t, $1, one, off;
fma.rn.bf16x2 $0, t, $2, nz;
}""")
SCALE_PTX_ZEROS = tl.constexpr("""{
.reg .b32 one, off, t;
mov.b32 one, 0x3F803F80;
mov.b32 off, 0xC300C300;
fma.rn.bf16x2 t, $1, one, off;
fma.rn.bf16x2 $0, t, $2, $3;
}""")


# Four packed bytes b3 b2 b1 b0 -> the magic values of both nibbles of each byte in one register, so in K order:
# register i = (low, high nibble of byte i). shr brings each high nibble down to its byte's low bits, prmt puts byte
# i of the word and of the shifted word in the two 16-bit halves, and lop3 keeps the nibbles and ORs the magic in:
# 9 ops per word, where _UNPACK_PTX's 8 leave low and high nibbles in separate registers for an interleave after.
UNPACK_KORDER_PTX_BF16 = tl.constexpr("""{
.reg .b32 t, r0, r1, r2, r3;
shr.u32 t, $4, 4;
prmt.b32 r0, $4, t, 0x0400;
prmt.b32 r1, $4, t, 0x0501;
prmt.b32 r2, $4, t, 0x0602;
prmt.b32 r3, $4, t, 0x0703;
lop3.b32 $0, r0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $1, r1, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $2, r2, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 $3, r3, 0x000F000F, 0x43004300, 0xEA;
}""")


@triton.jit
def _dequant_packed(b, s, z, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    KORDER: tl.constexpr = False):
    """Packed bytes [BLOCK_N, BLOCK_K/2] -> the bf16 weight tile [BLOCK_N, BLOCK_K] (k = 2j low nibble, 2j+1
    high), with the scale (and zero) [BLOCK_N] of the step's one group: inline PTX on 32-bit words only (_codes_asm
    then SCALE_PTX_*), about 2 instructions per value instead of v0's ~6 (I2F, FFMA, F2F, byte ops).
    KORDER: unpacked in K order (UNPACK_KORDER_PTX_BF16): the first output holds k 8g..8g+3 of each word g, the
    second k 8g+4..8g+7, which a join and a reshape put in place (H100 SASS of the prefill GEMMs: 274 -> 261
    instructions per K step; the interleave of low and high nibbles took 9 PRMT + 4 SHF of them)."""
    if KORDER:
        v_lo, v_hi = tl.inline_asm_elementwise(UNPACK_KORDER_PTX_BF16, "=r,=r,=r,=r,r", [b],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        v_lo, v_hi = _codes_asm(b, tl.bfloat16)
    s2 = tl.broadcast_to(s.to(tl.bfloat16)[:, None], (BLOCK_N, BLOCK_K // 2))  # exact: the scales are bf16
    if HAS_ZEROS:
        z2 = tl.broadcast_to(z.to(tl.bfloat16)[:, None], (BLOCK_N, BLOCK_K // 2))
        w_lo = tl.inline_asm_elementwise(SCALE_PTX_ZEROS, "=r,r,r,r", [v_lo, s2, z2], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
        w_hi = tl.inline_asm_elementwise(SCALE_PTX_ZEROS, "=r,r,r,r", [v_hi, s2, z2], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    else:
        w_lo = tl.inline_asm_elementwise(SCALE_PTX_SYM, "=r,r,r", [v_lo, s2], dtype=tl.bfloat16, is_pure=True,
                                         pack=2)
        w_hi = tl.inline_asm_elementwise(SCALE_PTX_SYM, "=r,r,r", [v_hi, s2], dtype=tl.bfloat16, is_pure=True,
                                         pack=2)
    if KORDER:  # w_lo / w_hi: the first / last 4 of each 8 values
        w = tl.join(tl.reshape(w_lo, (BLOCK_N, BLOCK_K // 8, 4)), tl.reshape(w_hi, (BLOCK_N, BLOCK_K // 8, 4)))
        return tl.reshape(tl.permute(w, (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
    return tl.interleave(w_lo, w_hi)


@triton.jit
def _codes_f32(nib, MAGIC: tl.constexpr):
    """4-bit codes as exact float32 c: I2F, or (MAGIC) 2**23 + c by OR-ing c into 2**23's mantissa, minus 2**23."""
    if MAGIC:
        c = (nib.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        c = nib.to(tl.float32)
    return c


@triton.jit
def _int4_step(acc, q_ptrs, s, z, a, a_even, a_odd, xsum, k0, K, n_ok, offs_kb, GROUP_SIZE: tl.constexpr,
               GROUPS_PER_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               OUT_DTYPE: tl.constexpr, MAGIC: tl.constexpr, POST_SCALE: tl.constexpr, SPLIT: tl.constexpr,
               ASM: tl.constexpr, PACKED: tl.constexpr = False, HAS_ZEROS: tl.constexpr = False,
               BYTE_PAIRS: tl.constexpr = False, KORDER: tl.constexpr = False):
    """acc [BLOCK_N, BLOCK_M] += this K step's weight tile (packed bytes at q_ptrs) @ its A tile.

    a        [BLOCK_K, BLOCK_M] A^T tile (used unless SPLIT)
    a_even/a_odd  [BLOCK_K/2, BLOCK_M]: its rows k0+2j / k0+2j+1 (SPLIT: the low / high nibbles' rows, so
             no interleave of the codes: two dots of K = BLOCK_K/2)
    xsum     [BLOCK_M] float32 sum of the A tile over K (POST_SCALE only)
    POST_SCALE: the dot multiplies the codes themselves (exact in bf16/fp16, or MAGIC_OFFSET + c) and
             the group's scale and zero are applied to the [BLOCK_N, BLOCK_M] partial sum:
             sum_k (c s + z) x = s * sum_k v x + (z - OFFSET s) * sum_k x. Needs BLOCK_K <= GROUP_SIZE.
    MAGIC    codes -> float by integer OR into a float's mantissa instead of I2F (a quarter-rate op).
    ASM      MAGIC + POST_SCALE + SPLIT with the unpack done by inline PTX on 32-bit words (_codes_asm);
             BYTE_PAIRS: 2 packed bytes per PTX call, not 4.
    PACKED   (bf16, one group per step, GPU only) the dequantise-then-dot path with the tile built by inline PTX
             (_dequant_packed): same values as v0
    """
    q_mask = n_ok[:, None]
    if not EVEN_K:
        q_mask = q_mask & (offs_kb[None, :] < (K - k0) // 2)
    b = tl.load(q_ptrs, mask=q_mask, other=0)
    lo = b & 0xF
    hi = b >> 4
    if POST_SCALE:
        tl.static_assert(GROUPS_PER_TILE == 1)
        if ASM:
            tl.static_assert(MAGIC and SPLIT)
            v_lo, v_hi = _codes_asm(b, OUT_DTYPE, BYTE_PAIRS)
        else:
            v_lo = _codes(lo, MAGIC, OUT_DTYPE)
            v_hi = _codes(hi, MAGIC, OUT_DTYPE)
        if SPLIT:
            part = tl.dot(v_lo, a_even)
            part = tl.dot(v_hi, a_odd, part)
        else:
            part = tl.dot(tl.interleave(v_lo, v_hi), a)
        if MAGIC:
            if OUT_DTYPE == tl.bfloat16:
                zc = z - 128.0 * s
            else:
                zc = z - 1024.0 * s
        else:
            zc = z
        acc = acc + s[:, None] * part + zc[:, None] * xsum[None, :]
    elif SPLIT:
        c_lo = _codes_f32(lo, MAGIC)
        c_hi = _codes_f32(hi, MAGIC)
        if GROUPS_PER_TILE == 1:
            w_lo = c_lo * s[:, None] + z[:, None]
            w_hi = c_hi * s[:, None] + z[:, None]
        else:  # a byte's two codes are in the same group: view [BLOCK_N, groups, G/2]
            HALF_G: tl.constexpr = GROUP_SIZE // 2
            w_lo = tl.reshape(tl.reshape(c_lo, (BLOCK_N, GROUPS_PER_TILE, HALF_G)) * s[:, :, None] + z[:, :, None],
                              (BLOCK_N, BLOCK_K // 2))
            w_hi = tl.reshape(tl.reshape(c_hi, (BLOCK_N, GROUPS_PER_TILE, HALF_G)) * s[:, :, None] + z[:, :, None],
                              (BLOCK_N, BLOCK_K // 2))
        acc = tl.dot(w_lo.to(OUT_DTYPE), a_even, acc)
        acc = tl.dot(w_hi.to(OUT_DTYPE), a_odd, acc)
    elif PACKED:
        tl.static_assert(GROUPS_PER_TILE == 1 and OUT_DTYPE == tl.bfloat16)
        acc = tl.dot(_dequant_packed(b, s, z, HAS_ZEROS, BLOCK_N, BLOCK_K, KORDER), a, acc)
    else:  # v0: interleave the codes (k = 2j low, 2j+1 high), float32 c * s + z, one rounding
        c = _codes_f32(tl.interleave(lo, hi), MAGIC)
        if GROUPS_PER_TILE == 1:
            w = c * s[:, None] + z[:, None]
        else:
            c3 = tl.reshape(c, (BLOCK_N, GROUPS_PER_TILE, GROUP_SIZE))
            w = tl.reshape(c3 * s[:, :, None] + z[:, :, None], (BLOCK_N, BLOCK_K))
        acc = tl.dot(w.to(OUT_DTYPE), a, acc)
    return acc


@triton.jit
def _int4_tile(tile, k_slice, num_pid_m, num_pid_n,
               a_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_rows_ptr, c_rows_ptr, row_scale_ptr, offsets_ptr,
               N, K, stride_am, stride_ak, stride_qe, stride_qn, stride_qk,
               stride_se, stride_sg, stride_sn, stride_ze, stride_zg, stride_zn, stride_cm, stride_cn, stride_cs,
               E: tl.constexpr, E_PAD: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
               GATHER_A: tl.constexpr, SWIGLU: tl.constexpr, SCALE_ROWS: tl.constexpr,
               SCATTER_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
               GROUPS_PER_TILE: tl.constexpr, MAGIC: tl.constexpr, POST_SCALE: tl.constexpr,
               SPLIT: tl.constexpr, ASM: tl.constexpr, PIPE_SCALES: tl.constexpr, SPLIT_K: tl.constexpr,
               STACK: tl.constexpr, PACKED: tl.constexpr, TAIL: tl.constexpr = 0, MAIN_M: tl.constexpr = 0,
               BYTE_PAIRS: tl.constexpr = False, KORDER: tl.constexpr = False):
    """One output tile, computed transposed: acc [BLOCK_N, BLOCK_M] = W_tile @ A_tile^T.

    STACK (SWIGLU only): the gate and up rows of the tile's columns are one [2 BLOCK_N, BLOCK_K] weight tile and
    one dot (split into gate and up after the K loop), not two tiles and two dots. With 8 warps the two
    warpgroups then each take 64 of its rows (wgmma's M) and dequantise only those, instead of both needing
    both tiles (they split the tokens then).

    SPLIT_K > 1: only K slice `k_slice` (K / SPLIT_K long, whole BLOCK_K steps); the tile's float32 partial
    sums go to c[k_slice] (with SWIGLU, gate at column n and up at N + n, no activation): the forward's
    finisher adds the slices up. More programs stream weights at once: decode GEMMs have too few tiles."""
    pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
    # Row blocks from expert_offsets (the BlockMap arguments are unused on that path).
    expert, row_start, row_end = _locate_row_block(pid_m, offsets_ptr, offsets_ptr, offsets_ptr,
                                                   E, E_PAD, BLOCK_M, True, 0, TAIL, MAIN_M)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    if GATHER_A:  # fused gather: row r of the GEMM is token sorted_token_ids[r] of x
        a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0)
    else:
        a_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # Written as multiples of BLOCK_K so the compiler knows the slice's loads stay aligned (vectorised,
    # cp.async-pipelined); the host makes K a multiple of SPLIT_K * BLOCK_K when SPLIT_K > 1.
    k_len = (K // (SPLIT_K * BLOCK_K)) * BLOCK_K if SPLIT_K > 1 else K
    k_begin = k_slice * k_len
    offs_k = k_begin + tl.arange(0, BLOCK_K)
    offs_kb = k_begin // 2 + tl.arange(0, BLOCK_K // 2)
    e64 = expert.to(tl.int64)  # all experts' bytes (glm5: 6.7e9 per tensor) pass 2**31
    # A^T tile [BLOCK_K, BLOCK_M]: the right operand of the dot.
    a_ptrs = a_ptr + a_rows.to(tl.int64)[None, :] * stride_am + offs_k[:, None] * stride_ak
    TWO_TILES: tl.constexpr = SWIGLU and not STACK  # gate and up in separate tiles and dots
    W_ROWS: tl.constexpr = 2 * BLOCK_N if STACK else BLOCK_N  # rows of the weight tile
    if STACK:  # weight rows: 8 gate rows, then the 8 up rows of the same columns, and so on (see below)
        tl.static_assert(SWIGLU and not PIPE_SCALES)
        j = tl.arange(0, W_ROWS)
        w_cols = pid_n * BLOCK_N + (j // 16) * 8 + j % 8
        w_rows = w_cols + ((j // 8) % 2) * N
        w_ok = w_cols < N
    else:
        w_rows = offs_n
        w_ok = n_ok
    q_ptrs = q_ptr + e64 * stride_qe + w_rows[:, None] * stride_qn + offs_kb[None, :] * stride_qk
    offs_kb = tl.arange(0, BLOCK_K // 2)  # relative, for _int4_step's ragged-K mask
    up_q_ptrs = q_ptrs + N * stride_qn  # TWO_TILES: up rows N + n of the same columns, own scales
    if PIPE_SCALES:  # int32 words = bf16 pairs (2i, 2i+1) of the tile's columns; strides in words
        n_pair = pid_n * BLOCK_N + 2 * tl.arange(0, BLOCK_N // 2)
        p_ok = n_pair < N
        s_row = (s_ptr + e64 * stride_se + pid_n * BLOCK_N).to(tl.pointer_type(tl.int32))
        z_row = (z_ptr + e64 * stride_ze + pid_n * BLOCK_N).to(tl.pointer_type(tl.int32))
        s_ptrs = s_row + tl.arange(0, BLOCK_N // 2)
        z_ptrs = z_row + tl.arange(0, BLOCK_N // 2)
        up_s_ptrs = s_ptrs + N // 2
        up_z_ptrs = z_ptrs + N // 2
        p_stride_sg = stride_sg // 2
        p_stride_zg = stride_zg // 2
    else:
        p_ok = w_ok
        s_ptrs = s_ptr + e64 * stride_se + w_rows * stride_sn
        z_ptrs = z_ptr + e64 * stride_ze + w_rows * stride_zn  # z_ptr is s_ptr when symmetric: never loaded
        up_s_ptrs = s_ptrs + N * stride_sn
        up_z_ptrs = z_ptrs + N * stride_zn
        p_stride_sg = stride_sg
        p_stride_zg = stride_zg
    acc = tl.zeros((W_ROWS, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Without PIPE_SCALES, scales are loaded one K step ahead, in registers: 2 bytes per thread is too
    # narrow for Triton's cp.async pipeline (which streams the A and packed tiles), so a load issued in the
    # step that uses it would stall every step for a full memory latency. One step ahead still stalls a
    # short (decode) step; PIPE_SCALES loads them as 4-byte words the pipeline takes, in the step itself.
    s, z, s_up, z_up = _step_params(s_ptrs, z_ptrs, up_s_ptrs, up_z_ptrs, k_begin, K, p_ok, p_stride_sg,
                                    p_stride_zg, GROUP_SIZE, HAS_ZEROS, GROUPS_PER_TILE, TWO_TILES, PIPE_SCALES,
                                    BLOCK_N)
    for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
        if PIPE_SCALES:
            s, z, s_up, z_up = _step_params(s_ptrs, z_ptrs, up_s_ptrs, up_z_ptrs, k0, K, p_ok, p_stride_sg,
                                            p_stride_zg, GROUP_SIZE, HAS_ZEROS, GROUPS_PER_TILE, TWO_TILES, True,
                                            BLOCK_N)
        else:
            s_next, z_next, s_up_next, z_up_next = _step_params(
                s_ptrs, z_ptrs, up_s_ptrs, up_z_ptrs, k0 + BLOCK_K, K, p_ok, p_stride_sg, p_stride_zg, GROUP_SIZE,
                HAS_ZEROS, GROUPS_PER_TILE, TWO_TILES, False, BLOCK_N)
        a_mask = row_ok[None, :]
        if not EVEN_K:
            a_mask = a_mask & (offs_k[:, None] - k_begin < K - k0)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if SPLIT:  # rows 2j / 2j+1 of the A^T tile: the K positions of the low / high nibbles
            a_even, a_odd = tl.split(tl.permute(tl.reshape(a, (BLOCK_K // 2, 2, BLOCK_M)), (0, 2, 1)))
        else:
            a_even = a
            a_odd = a
        if POST_SCALE:
            xsum = tl.sum(a.to(tl.float32), axis=0)
        else:
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = _int4_step(acc, q_ptrs, s, z, a, a_even, a_odd, xsum, k0, K, w_ok, offs_kb, GROUP_SIZE,
                         GROUPS_PER_TILE, W_ROWS, BLOCK_K, EVEN_K, a_ptr.dtype.element_ty, MAGIC, POST_SCALE, SPLIT,
                         ASM, PACKED, HAS_ZEROS, BYTE_PAIRS, KORDER)
        if TWO_TILES:
            acc_up = _int4_step(acc_up, up_q_ptrs, s_up, z_up, a, a_even, a_odd, xsum, k0, K, n_ok, offs_kb,
                                GROUP_SIZE, GROUPS_PER_TILE, BLOCK_N, BLOCK_K, EVEN_K, a_ptr.dtype.element_ty,
                                MAGIC, POST_SCALE, SPLIT, ASM, PACKED, HAS_ZEROS, BYTE_PAIRS, KORDER)
            up_q_ptrs += (BLOCK_K // 2) * stride_qk
        if not PIPE_SCALES:
            s, z, s_up, z_up = s_next, z_next, s_up_next, z_up_next
        a_ptrs += BLOCK_K * stride_ak
        q_ptrs += (BLOCK_K // 2) * stride_qk
    if STACK:  # [2 BLOCK_N, BLOCK_M] -> gate, up [BLOCK_N, BLOCK_M]. In wgmma's accumulator layout a thread
        # holds rows r and r + 8 of each 16: with 8-row blocks of gate and up alternating, each thread has the up
        # value of every gate value it holds, so this split needs no data exchange (one block each would need the
        # whole up half moved through shared memory to the other warpgroup).
        acc = tl.reshape(tl.permute(tl.reshape(acc, (BLOCK_N // 8, 2, 8, BLOCK_M)), (0, 2, 3, 1)),
                         (BLOCK_N, BLOCK_M, 2))
        acc, acc_up = tl.split(acc)
    if SWIGLU and SPLIT_K == 1:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in float32
    if SCALE_ROWS:
        acc = acc * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[None, :]
    if SCATTER_C:  # sorted row -> its token slot t*k + j
        c_rows = tl.load(c_rows_ptr + rows, mask=row_ok, other=0)
    else:
        c_rows = rows
    c_ptrs = c_ptr + k_slice * stride_cs + c_rows.to(tl.int64)[None, :] * stride_cm + offs_n[:, None] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & row_ok[None, :])
    if SWIGLU and SPLIT_K > 1:
        tl.store(c_ptrs + N * stride_cn, acc_up.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & row_ok[None, :])


@triton.heuristics({
    "EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
    "GROUPS_PER_TILE": lambda args: max(1, args["BLOCK_K"] // args["GROUP_SIZE"]),
})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _moe_int4_kernel(a_ptr, q_ptr, s_ptr, z_ptr, c_ptr, a_rows_ptr, c_rows_ptr, row_scale_ptr, offsets_ptr,
                     N, K, M_BUCKET,  # M_BUCKET: rows per expert (power of 2), an autotune key only
                     stride_am, stride_ak, stride_qe, stride_qn, stride_qk,
                     stride_se, stride_sg, stride_sn, stride_ze, stride_zg, stride_zn, stride_cm, stride_cn,
                     stride_cs,  # the output's K-slice stride (SPLIT_K > 1)
                     E: tl.constexpr, E_PAD: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     GATHER_A: tl.constexpr, SWIGLU: tl.constexpr, SCALE_ROWS: tl.constexpr,
                     SCATTER_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                     GROUPS_PER_TILE: tl.constexpr, MAGIC: tl.constexpr = False, POST_SCALE: tl.constexpr = False,
                     SPLIT: tl.constexpr = False, ASM: tl.constexpr = False, PIPE_SCALES: tl.constexpr = False,
                     SPLIT_K: tl.constexpr = 1, STACK: tl.constexpr = False, PACKED: tl.constexpr = False,
                     USE_PDL: tl.constexpr = False, TAIL: tl.constexpr = 0, MAIN_M: tl.constexpr = 0,
                     BYTE_PAIRS: tl.constexpr = False, KORDER: tl.constexpr = False):
    tl.static_assert((GROUP_SIZE % BLOCK_K == 0) or (BLOCK_K % GROUP_SIZE == 0))
    wait_for_previous_kernel(USE_PDL)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Row blocks per expert are only known on the device (they depend on the routing).
    _, _, _, blocks, _ = _expert_row_blocks(offsets_ptr, E, E_PAD, BLOCK_M, TAIL, MAIN_M)
    num_pid_m = tl.sum(blocks, 0)
    num_mn = num_pid_m * num_pid_n
    for tile in range(tl.program_id(0), num_mn * SPLIT_K, tl.num_programs(0)):
        _int4_tile(tile % num_mn, tile // num_mn, num_pid_m, num_pid_n, a_ptr, q_ptr, s_ptr, z_ptr, c_ptr,
                   a_rows_ptr, c_rows_ptr, row_scale_ptr, offsets_ptr, N, K, stride_am, stride_ak, stride_qe,
                   stride_qn, stride_qk, stride_se, stride_sg, stride_sn, stride_ze, stride_zg, stride_zn,
                   stride_cm, stride_cn, stride_cs, E, E_PAD, GROUP_SIZE, HAS_ZEROS, GATHER_A, SWIGLU, SCALE_ROWS,
                   SCATTER_C, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, GROUPS_PER_TILE, MAGIC, POST_SCALE, SPLIT,
                   ASM, PIPE_SCALES, SPLIT_K, STACK, PACKED, TAIL, MAIN_M, BYTE_PAIRS, KORDER)


AUTOTUNE_KEY = ["N", "K", "M_BUCKET", "E", "GROUP_SIZE", "HAS_ZEROS", "GATHER_A", "SWIGLU", "SCALE_ROWS",
                "SCATTER_C", "MAGIC", "POST_SCALE", "SPLIT", "ASM", "PIPE_SCALES", "SPLIT_K", "STACK", "PACKED", "TAIL",
                "MAIN_M", "BYTE_PAIRS", "KORDER"]
_TUNERS: dict[tuple[TileConfig, ...], triton.runtime.Autotuner] = {}


def _autotuned_kernel(configs: tuple[TileConfig, ...]):
    """One autotuner per candidate list (they differ by regime, GEMM role, group size and GPU)."""
    if configs not in _TUNERS:
        _TUNERS[configs] = triton.autotune(
            configs=[c.as_triton() for c in configs], key=AUTOTUNE_KEY,
            do_bench=_interpreter_bench if interpreting() else _autotune_bench,
        )(_moe_int4_kernel)
    return _TUNERS[configs]


def autotune_report() -> list[str]:
    """One line per tuned (GEMM role, shape): the key and the config the autotuner chose."""
    return describe_tuners(_TUNERS.values(), AUTOTUNE_KEY)


# --------------------------------------------------------------------------------------------------
# One grouped GEMM over a RoutingPlan
# --------------------------------------------------------------------------------------------------


def check_quantized(qt, name: str) -> None:
    """Clear errors for a weight object the kernel cannot read, before anything runs."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"{name} must be a QuantizedTensor (moe_tut.quant), got {type(qt).__name__}")
    check_group_size(qt.group_size, name)
    if not qt.scales.is_floating_point():
        raise TypeError(f"{name}.scales must be floating point, got {qt.scales.dtype}")
    if qt.zeros is not None and not qt.zeros.is_floating_point():
        raise TypeError(f"{name}.zeros must be floating point, got {qt.zeros.dtype}")
    devices = {qt.packed.device, qt.scales.device} | ({qt.zeros.device} if qt.zeros is not None else set())
    if len(devices) > 1:
        raise ValueError(f"{name}'s packed codes, scales and zeros are on different devices: {devices}")


def pairable_scales(qt: QuantizedTensor, z: torch.Tensor) -> bool:
    """Scales/zeros can be read as int32 pairs of bf16: bf16, unit column stride, even strides and offsets."""
    return all(t.dtype == torch.bfloat16 and t.stride(2) == 1 and t.stride(0) % 2 == 0 and t.stride(1) % 2 == 0
               and t.data_ptr() % 4 == 0 for t in (qt.scales, z)) and qt.shape[1] % 2 == 0


def int4_grouped_gemm(a: torch.Tensor, qt: QuantizedTensor, plan: RoutingPlan, out: torch.Tensor, *,
                      gather_rows: bool = False, swiglu: bool = False, scale_rows: bool = False,
                      scatter_rows: bool = False, config: TileConfig | None = None,
                      configs: list[TileConfig] | None = None, variant: Int4Variant | None = None,
                      split_k: int = 1, pdl: bool = False, maxnreg: int | None = None,
                      tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """out = one grouped GEMM over the plan's expert-sorted rows with INT4 weights; returns out.

    a        [T, K] with gather_rows (row r reads a[sorted_token_ids[r]]), else [T*k, K] sorted
    qt       QuantizedTensor of W [E, N, K], or [E, 2N, K] with swiglu (out = silu(a Wg^T) * (a Wu^T))
    out      [T*k, N]: row r in sorted order, or at its token slot sorted_slots[r] with scatter_rows
    config   one tile config (no autotuning; must fit the group size), else the autotuner over
             `configs` (required then)
    variant  kernel switches (Int4Variant; default all off); with post_scale, BLOCK_K is lowered to
             divide the group size (adapt_to_variant)
    split_k  K slices (K must be a multiple of split_k * BLOCK_K): out is then float32
             [split_k, T*k, N] (swiglu: [split_k, T*k, 2N], gate then up, no activation) of partial sums
    pdl      launch with programmatic dependent launch (kernels/pdl.py)
    maxnreg  registers per thread the launch may use (GPU only; None: as ptxas chooses)
    tail     (TAIL, MAIN_M): one launch of a tail split (grouped_gemm._expert_row_blocks): (TAIL, 0) the main launch,
             each expert's rows but its last n % BLOCK_M when those are <= TAIL; (TAIL, MAIN_M) the tail launch,
             those rows only (BLOCK_M >= TAIL, MAIN_M the main launch's BLOCK_M). (0, 0): every row, one launch
    """
    check_quantized(qt, "weights")
    E, n_w, K = qt.shape
    N = n_w // 2 if swiglu else n_w
    rows = plan.num_rows
    G = qt.group_size
    if swiglu and n_w % 2:
        raise ValueError(f"swiglu needs weights [E, 2N, K], got {qt.shape}")
    out_shape = (rows, N) if split_k == 1 else (split_k, rows, 2 * N if swiglu else N)
    if a.dim() != 2 or a.shape[1] != K or out.shape != out_shape or E != plan.num_experts:
        raise ValueError(f"shapes do not fit: a {tuple(a.shape)}, weights {qt.shape}, out {tuple(out.shape)}, "
                         f"plan with E={plan.num_experts} and {rows} rows (swiglu={swiglu})")
    if a.shape[0] != (plan.num_tokens if gather_rows else rows):
        raise ValueError(f"a has {a.shape[0]} rows; expected {plan.num_tokens if gather_rows else rows}")
    if split_k != 1 and out.dtype != torch.float32:
        raise TypeError(f"with split_k={split_k} the output holds float32 partial sums, got {out.dtype}")
    if a.dtype not in ACTIVATION_DTYPES or (split_k == 1 and out.dtype != a.dtype):
        raise TypeError(f"activations and output must both be one of {ACTIVATION_DTYPES}, got {a.dtype} and "
                        f"{out.dtype}")
    if config is not None and not block_k_fits_group(config.block_k, G):
        raise ValueError(f"config {config}: BLOCK_K={config.block_k} neither divides nor is a multiple of the "
                         f"group size {G}")
    if config is None and not configs:
        raise ValueError("int4_grouped_gemm needs a config or a list of configs to autotune over")
    if rows == 0:
        return out
    variant = variant or Int4Variant()
    sms, on_gpu = num_sms(a.device), a.device.type == "cuda"
    if config is not None:
        config, variant = adapt_to_variant(config, G, variant)
    else:
        configs, variant = _adapted_candidates(tuple(configs), G, variant)
    packed = variant.packed and on_gpu and a.dtype == torch.bfloat16  # else the v0 dequantisation: the same values
    asm = variant.asm and variant.post_scale and on_gpu  # interpreter: no inline PTX (magic gives the same values)
    if on_gpu and not packed:
        if config is not None:
            config = drop_packed_only([config], qt.zeros is not None)[0]
        else:
            configs = drop_packed_only(configs, qt.zeros is not None)
    if config is None and len(configs) == 1:
        config = configs[0]
    cands = [config] if config is not None else configs  # the tiles this launch may run
    block_k = max(c.block_k for c in cands)
    if split_k < 1 or (split_k > 1 and K % (split_k * block_k)):
        raise ValueError(f"split_k={split_k}: K={K} must be a multiple of split_k * BLOCK_K")

    tail_rows, main_m = tail
    if main_m and (tail_rows <= 0 or any(c.block_m < tail_rows or main_m < 2 * c.block_m for c in cands)):
        raise ValueError(f"tail launch {tail}: its BLOCK_M must hold the TAIL rows and be at most half of MAIN_M")

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        row_blocks = min(E, rows) * cdiv(tail_rows, bm) if main_m else max_row_blocks(rows, E, bm)
        tiles = row_blocks * cdiv(N, bn) * split_k
        per_sm = (variant.programs_per_sm or persistent_programs_per_sm(bm, bn * (2 if swiglu else 1))
                  if on_gpu else 1)
        return (min(tiles, sms * per_sm),)

    z = qt.zeros if qt.zeros is not None else qt.scales  # a valid pointer; HAS_ZEROS=False never reads it
    pipe_scales = variant.pipe_scales and pairable_scales(qt, z) and block_k <= G
    args = (a, qt.packed, qt.scales, z, out, plan.sorted_token_ids, plan.sorted_slots, plan.sorted_weights,
            plan.expert_offsets, N, K, min(4096, next_power_of_2(cdiv(rows, E))),
            a.stride(0), a.stride(1), *qt.packed.stride(), *qt.scales.stride(), *z.stride(),
            out.stride(-2), out.stride(-1), out.stride(0) if split_k > 1 else 0)
    flags = dict(E=E, E_PAD=max(16, next_power_of_2(E)), GROUP_SIZE=G, HAS_ZEROS=qt.zeros is not None,
                 GATHER_A=gather_rows, SWIGLU=swiglu, SCALE_ROWS=scale_rows, SCATTER_C=scatter_rows,
                 MAGIC=variant.magic, POST_SCALE=variant.post_scale, SPLIT=variant.split,
                 ASM=asm, BYTE_PAIRS=asm and variant.byte_pairs,
                 PIPE_SCALES=pipe_scales, SPLIT_K=split_k, STACK=variant.stack and swiglu and not pipe_scales,
                 PACKED=packed, KORDER=packed and variant.korder, TAIL=tail_rows, MAIN_M=main_m, **pdl_launch(pdl))
    if maxnreg is not None and on_gpu and not interpreting():
        flags["maxnreg"] = maxnreg
    if config is not None:
        flags.update(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
                     num_warps=config.num_warps, num_stages=config.num_stages)
        launch(_moe_int4_kernel, grid, args, flags)
    else:
        launch(_autotuned_kernel(tuple(configs)), grid, args, flags)
    return out


# --------------------------------------------------------------------------------------------------
# The MoE forward
# --------------------------------------------------------------------------------------------------


def check_int4_inputs(x: torch.Tensor, weights, plan: RoutingPlan) -> None:
    """Every check of the forward, host-side only (no sync): type, shapes, devices, dtypes, group sizes."""
    from ..quant import Int4ExpertWeights

    if not isinstance(weights, Int4ExpertWeights):
        raise TypeError(f"triton_int4 takes Int4ExpertWeights (get_backend('triton_int4').prepare(bf16_weights) "
                        f"makes them), got {type(weights).__name__}")
    check_quantized(weights.w13, "w13")
    check_quantized(weights.w2, "w2")
    check_inputs(x, weights, plan)
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"triton_int4 computes with bf16 or fp16 activations (tl.dot operands), got {x.dtype}")


# Mean rows per expert at or below which the INT4 forward takes the decode regime; the bf16 kernel's threshold is 8.
# H100 (results/h100/pairs_unpack_v1, call 7): at 16 rows the decode regime was 18-38% faster than prefill tiles
# (mixtral T=64 884-897 -> 550-552 us, qwen3-30b-a3b T=256 830-869 -> 697-698, glm-4.5 T=320 2216-2228 -> 1379-1387,
# deepseek-v3 T=512 6582-6630 -> 4116); at 32 rows it was mixed (qwen3 T=512 -11%, mixtral T=128 -3.5%, glm-4.5
# T=640 +3%, deepseek-v3 T=1024 +2%).
DECODE_MAX_ROWS_PER_EXPERT_INT4 = 16


def path_for(num_tokens: int, top_k: int, num_experts: int) -> str:
    """'decode' or 'prefill': decode at most decode_max_rows(DECODE_MAX_ROWS_PER_EXPERT_INT4) rows per expert."""
    return "decode" if is_decode(num_tokens, top_k, num_experts, DECODE_MAX_ROWS_PER_EXPERT_INT4) else "prefill"


def fast_path_configs(x: torch.Tensor, weights, plan: RoutingPlan, path: str | None = None
                      ) -> tuple[str, list[TileConfig], list[TileConfig]]:
    """(regime, GEMM1 candidates, GEMM2 candidates) the forward autotunes over on a GPU."""
    E, H, F = weights.num_experts, weights.hidden_size, weights.ffn_size
    path = path or path_for(plan.num_tokens, plan.top_k, E)
    blocks = min(E, plan.num_rows) if path == "decode" else 0
    w13, w2 = weights.w13, weights.w2
    c1, c2 = _fast_path_configs(path, H, F, blocks, smem_limit(x.device), num_sms(x.device),
                                (w13.group_size, w13.zeros is not None), (w2.group_size, w2.zeros is not None))
    return path, list(c1), list(c2)


# Cached for the reason grouped_gemm._fast_path_configs is: the lists are the same on every call, and
# rebuilding them (a fit per candidate) is host time in every eager forward.
@functools.lru_cache(maxsize=256)
def _fast_path_configs(path: str, H: int, F: int, blocks: int, limit: int, sms: int, quant13: tuple[int, bool],
                       quant2: tuple[int, bool]) -> tuple[tuple[TileConfig, ...], tuple[TileConfig, ...]]:
    out = []
    for (G, hz), n, fused in ((quant13, F, True), (quant2, H, False)):
        if path == "decode":
            out.append(tuple(get_decode_configs(n, blocks, sms, fused, limit, G, hz)))
        else:
            fitted = [fit(adapt_to_group(c, G), limit, 2 if fused else 1, G, hz) for c in get_prefill_configs(fused)]
            kept = tuple(dict.fromkeys(c for c in fitted if c is not None))
            if not kept:
                raise RuntimeError(f"no INT4 tile config fits {limit // 1024} KB of shared memory per block")
            out.append(kept)
    return out[0], out[1]


@torch.no_grad()
def moe_forward_triton_int4(x: torch.Tensor, weights, plan: RoutingPlan, *, config: TileConfig | None = None,
                            path: str | None = None, variant: Int4Variant | None = None,
                            config2: TileConfig | None = None) -> torch.Tensor:
    """y [T, H]: the MoE forward with INT4 weights dequantised in registers (see the module docstring).

    config  pins one tile config for both GEMMs (it must fit both group sizes)
    config2 pins GEMM2's tile config alone (with config: config is GEMM1's)
    path    'decode' or 'prefill' forces a regime; default: chosen by shape (path_for)
    variant kernel switches (Int4Variant); default MOE_TUT_TRITON_INT4_VARIANT if set, else the
            regime's DECODE_VARIANT / PREFILL_VARIANT. Decode batches variant.takes_gemv accepts (T <= gemv
            tokens, or <= gemv_rows rows per expert) run int4_gemv.moe_forward_int4_gemv (its own block sizes:
            config / config2 pin tl.dot tiles and do not apply there)
    """
    check_int4_inputs(x, weights, plan)
    if path not in (None, "decode", "prefill"):
        raise ValueError(f"path must be None, 'decode' or 'prefill', got {path!r}")
    T, H = x.shape
    F, k, rows = weights.ffn_size, plan.top_k, plan.num_rows
    if config is None:
        config = pinned_config()
    for cfg, names in ((config, ("w13", "w2") if config2 is None else ("w13",)), (config2, ("w2",))):
        for name in names if cfg is not None else ():
            qt = getattr(weights, name)
            if not block_k_fits_group(cfg.block_k, qt.group_size):
                raise ValueError(f"pinned config {cfg}: BLOCK_K={cfg.block_k} neither divides nor is a "
                                 f"multiple of {name}'s group size {qt.group_size}")
    if T == 0:
        return x.new_zeros(0, H)
    regime = path or path_for(T, k, weights.num_experts)
    if variant is None:
        variant = pinned_variant() or (DECODE_VARIANT if regime == "decode" else PREFILL_VARIANT)
    if regime == "decode" and variant.takes_gemv(T, k, weights.num_experts):
        from . import int4_gemv  # here, not at import: int4_gemv imports from this module

        if int4_gemv.gemv_unsupported(weights) is None:  # inputs checked above
            return int4_gemv.gemv_forward(x, weights, plan, split_k=variant.split_k)
    pdl = regime == "decode" and programmatic_launch_ok(x.device)  # per call: MOE_TUT_PDL may change
    configs1 = configs2 = None
    config1, config2 = config, (config2 if config2 is not None else config)
    if config1 is None and config2 is not None:
        raise ValueError("config2 pins GEMM2's tile; pass config (GEMM1's) with it")
    if config is None:
        if interpreting():
            base = INTERPRETER_DECODE_CONFIG if regime == "decode" else INTERPRETER_CONFIG
            config1, config2 = adapt_to_group(base, weights.w13.group_size), adapt_to_group(base, weights.w2.group_size)
        else:
            _, configs1, configs2 = fast_path_configs(x, weights, plan, path)
    split1 = split2 = 1
    cap2 = None
    pdl2 = pdl
    gemm1 = gemm2 = int4_grouped_gemm
    if regime == "decode":
        split1 = gemm_split_k(variant, weights.w13, F, rows, config1, configs1, x.device)
        split2 = gemm_split_k(variant, weights.w2, H, rows, config2, configs2, x.device)
        c2 = config2 if config2 is not None else configs2[0]
        tiles2 = decode_tiles(rows, weights.num_experts, H, c2.block_n, split2)
        cap2 = decode_register_cap(tiles2, x.device)
        pdl2 = pdl and not decode_gemm2_one_wave(tiles2, x.device)
    else:  # prefill: each GEMM in one launch, or as a tail split
        gemm1 = _with_tails(tail_split(config1, configs1, rows / weights.num_experts, x.device))
        gemm2 = _with_tails(tail_split(config2, configs2, rows / weights.num_experts, x.device))
    if split1 == 1:
        act = gemm1(x, weights.w13, plan, _alloc((rows, F), x), gather_rows=True, swiglu=True, config=config1,
                    configs=configs1, variant=variant, pdl=pdl)
    else:
        part = int4_grouped_gemm(x, weights.w13, plan, _alloc_f32((split1, rows, 2 * F), x), gather_rows=True,
                                 swiglu=True, config=config1, configs=configs1, variant=variant, split_k=split1,
                                 pdl=pdl)
        act = swiglu_slices(part, x.dtype, pdl=pdl)
    if split2 > 1:  # slices of every token slot: y = sum over slices and slots, float32, fixed order
        part = int4_grouped_gemm(act, weights.w2, plan, _alloc_f32((split2, rows, H), x), scale_rows=True,
                                 scatter_rows=True, config=config2, configs=configs2, variant=variant, split_k=split2,
                                 pdl=pdl2, maxnreg=cap2)
        return sum_slots(part, T, k, x, pdl=pdl)
    # Slot t*k + j is row t*k + j of a [T*k, H] buffer, i.e. [T, k, H]; with k = 1 that is y itself.
    out = _alloc((rows, H), x)
    gemm2(act, weights.w2, plan, out, scale_rows=True, scatter_rows=True, config=config2, configs=configs2,
          variant=variant, pdl=pdl2, maxnreg=cap2)
    if k == 1:
        return out
    return sum_slots(out, T, k, x, pdl=pdl)


def _with_tails(split: tuple[list[TileConfig], list[TileConfig]] | None):
    """int4_grouped_gemm, or (split = tail_split's answer) a function with its arguments that runs the main launch
    and then the tail launch, each over its own candidates (config / configs replaced)."""
    if split is None:
        return int4_grouped_gemm
    main, tail = split
    tail_rows = tail[0].block_m

    def run(a, qt, plan, out, **kw):
        for cands, which in ((main, (tail_rows, 0)), (tail, (tail_rows, main[0].block_m))):
            kw.update(config=cands[0] if len(cands) == 1 else None, configs=cands)
            int4_grouped_gemm(a, qt, plan, out, tail=which, **kw)
        return out

    return run


def _alloc_f32(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A float32 buffer of partial sums, from _alloc (so the tests' NaN-filled allocator covers it)."""
    return _alloc(shape, like, torch.float32)


# Decode split-K (measured on an H100, results/h100/LOG.md): ncu showed GEMM2 of mixtral T=1 with 128 tiles,
# i.e. one 4-warp program per SM and 0.32 instructions issued per cycle per scheduler. Two slices took
# mixtral T=1 from 0.181 to 0.150 ms; more slices, or splitting GEMMs that already have >= 1.5 tiles per
# SM (deepseek-v3 T=1: 256 and 896 tiles; qwen3 T=4), cost 3-15% (partial sums, finisher).
SPLIT_K_PROGRAMS_PER_SM = 1.5
SPLIT_K_MAX = 8
SPLIT_K_MIN_SLICE = 512  # K per slice: shorter slices spend more on partial sums than they win


def decode_split_k(tiles: int, K: int, block_k: int, sms: int) -> int:
    """K slices for a decode GEMM of `tiles` output tiles: the smallest power of two that gives at least
    SPLIT_K_PROGRAMS_PER_SM programs per SM, within SPLIT_K_MAX, whole BLOCK_K steps and SPLIT_K_MIN_SLICE."""
    s = 1
    while (tiles * s < SPLIT_K_PROGRAMS_PER_SM * sms and s < SPLIT_K_MAX and K % (2 * s * block_k) == 0
           and K // (2 * s) >= SPLIT_K_MIN_SLICE):
        s *= 2
    return s


def gemm_split_k(variant: Int4Variant, qt: QuantizedTensor, N: int, rows: int, config: TileConfig | None,
                 configs: list[TileConfig] | None, device: torch.device) -> int:
    """The split_k one decode GEMM runs with: variant.split_k if set (lowered until K allows it), else
    decode_split_k on the tile the kernel will use (after adapt_to_variant)."""
    E, _, K = qt.shape
    adapted, _ = _adapted_candidates((config,) if config is not None else tuple(configs), qt.group_size, variant)
    bk = max(c.block_k for c in adapted)
    if variant.split_k:
        s = variant.split_k
        while s > 1 and K % (s * bk):
            s //= 2
        return s
    first = adapted[0]
    tiles = max_row_blocks(rows, E, first.block_m) * cdiv(N, first.block_n)
    return decode_split_k(tiles, K, bk, num_sms(device))


@triton.jit
def _swiglu_slices_kernel(p_ptr, out_ptr, n_elem, N, stride_ps, stride_pm, stride_om, SPLIT_K: tl.constexpr,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    wait_for_previous_kernel(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elem
    m = offs // N
    n = offs % N
    gate = tl.zeros((BLOCK,), dtype=tl.float32)
    up = tl.zeros((BLOCK,), dtype=tl.float32)
    for sl in tl.static_range(SPLIT_K):  # fixed order: deterministic
        base = p_ptr + sl * stride_ps + m * stride_pm + n
        gate += tl.load(base, mask=ok, other=0.0)
        up += tl.load(base + N, mask=ok, other=0.0)
    tl.store(out_ptr + m * stride_om + n, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


def swiglu_slices(part: torch.Tensor, dtype: torch.dtype, pdl: bool = False) -> torch.Tensor:
    """[S, rows, 2F] float32 partial sums (gate | up) -> silu(sum gate) * (sum up) [rows, F] in dtype.
    pdl: launch with programmatic dependent launch (kernels/pdl.py)."""
    S, rows, two_f = part.shape
    F = two_f // 2
    out = _alloc((rows, F), part, dtype)
    block = 1024
    if rows:
        launch(_swiglu_slices_kernel, (cdiv(rows * F, block),),
               (part, out, rows * F, F, part.stride(0), part.stride(1), out.stride(0)),
               dict(SPLIT_K=S, BLOCK=block, **pdl_launch(pdl)))
    return out


def dequantized_weights(weights) -> ExpertWeights:
    """The bf16 ExpertWeights holding exactly the values the kernel multiplies with."""
    return weights.dequantize()


def int4_extra_bytes(T: int, top_k: int, H: int, F: int, elem_bytes: int = 2) -> int:
    """Temporaries of moe_forward_triton_int4: the SwiGLU output [T*k, F] and, for k > 1, the slot rows
    [T*k, H]. No weight is ever dequantised into memory."""
    rows = T * top_k
    return rows * F * elem_bytes + (rows * H * elem_bytes if top_k > 1 else 0)
