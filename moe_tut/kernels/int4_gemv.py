"""Triton W4A16 MoE forward for decode (a few rows per expert): GEMV kernels without tl.dot.

What it computes: the MoE forward of int4_gemm.moe_forward_triton_int4 (DESIGN.md),

    y[t] += g * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))

on the same inputs (x [T, H] bf16/fp16, Int4ExpertWeights in the format of moe_tut/quant.py, a
RoutingPlan), meant for decode batches (T <= ~4) where each expert gets one or a few rows and the forward
is a stream of the touched experts' packed weights. Why not tl.dot: the tl.dot decode path (int4_gemm)
runs a 16-row MMA tile on 1-4 real rows and, measured on an H100 (results/h100/LOG.md), is bound by
instruction issue: ~4.1 SASS instructions per weight value, most of them register repacking for the MMA
operand layout, at 3 blocks per SM. Here every multiply-add is a float32 FFMA on CUDA cores, fed straight
from 32-bit words of packed codes: no shared memory, no operand layout, so many programs per SM.

Pipeline (5 launches at most; none needs a host sync, so a forward can be captured in a CUDA graph):

    x [T, H] --prep--> x' [T, H] float32 + word sums [T, H/8]
      --GEMM1 (gather rows, w13, SwiGLU)--> act' [T*k, F] float32 + word sums     (sorted row order)
      --GEMM2 (w2, * routing weight, scatter to slot t*k+j)--> part [S, T*k, H] float32
      --sum over K slices, then over the k slots, fixed order--> y [T, H]
    (one token, ROWS 1: GEMM2's last program per column block does that sum, no slot-sum kernel: see
    grouped_gemm._last_arrival_sums_slots; the prep kernel zeroes its counters)
    With split-K, GEMM1 writes float32 partial sums [S, T*k, 2F] and the last K slice of each tile to finish adds
    them and applies the SwiGLU (FINISH_LAST; MOE_TUT_GEMV_FINISH=kernel: a finisher kernel instead);
    with one K slice and top_k = 1, GEMM2 writes y itself. No float atomics: deterministic. On sm_90+ every
    launch uses programmatic dependent launch (kernels/pdl.py; MOE_TUT_PDL=0 turns it off).
    One token whose GEMM2 is split along K runs GEMM1 and GEMM2 as one launch (_gemv_fused_kernel, fuse_gemms,
    MOE_TUT_GEMV_FUSED): GEMM2's tiles start on the SMs GEMM1's last tiles leave idle, each once the block of act'
    it reads is complete (ready counters), instead of after the whole of GEMM1. Same bits as two launches.

The inner loop. Packed bytes are read as int32 words, [BLOCK_N rows, BLOCK_K/8 words] per K step; each
row's BLOCK_K/2 bytes are one contiguous run (64 B at BLOCK_K = 128) and each thread loads 16 B (one
128-bit load, 32 codes). Word j of a row holds the codes of k = 8j..8j+7, code i at bits 4i..4i+3
(quant.py packs k = 2j' in the low nibble of byte j'; words are little-endian). A code becomes a float32
with one LOP3 and one FADD, without shifting it down and without I2F (a quarter-rate conversion):

    f_i = bitcast_f32((w & (0xF << 4p)) | 0x3F800000) - B  =  (c_i - o) * 2**(4p - 23)   (exact)

the code OR-ed, in place, into the mantissa of 1.0 (bits 4p..4p+3: p = i for codes 0..4, and p = i - 3
in w >> 12 for codes 5..7, one shift per word), minus B = 1 + o * 2**(4p - 23) with o = 8 for symmetric
weights (their -8 offset) and 0 for asymmetric ones; both numbers lie in [1, 2), so the difference is
exact. (Where ptxas would not keep 1.0's bits in a register, the same bits come as
(w | ONE) & (mask | ONE), one OR per word: one_in_mask.) The power of two is undone on the activation
side: the prep pass stores x permuted and scaled, x'[r, i*K/8 + j] = x[r, 8j+i] * 2**(23 - 4p_i), so a
thread's 8 activation vectors for its words are 8 128-bit loads at constant offsets (K is a constexpr),
with no shuffle. Then per word and row

    p = sum_i f_i * x'_i = sum_i (c_i - o) * x_i   (8 FFMA, the first an FMUL; every product exact)
    acc += s * p                                    (1 FFMA; s = the word's group scale)
    acc += z * X                                    (asymmetric only: zero z, X = sum of x over the word)

which is sum_k (c_k s + z) x_k over the word, z = -8 s for symmetric weights. The accumulator is
[ROWS, BLOCK_N, BLOCK_K/8] float32, reduced over the words (tl.sum) once, after the K loop. All tiles are
3-D with size-1 dims, so the packed-word load's layout is the accumulator's and the loop converts no
layout. Checked in the sm_90 code Triton 3.6 generates (ptxas on a CPU machine, ROWS 1): 3.8
instructions per weight value in GEMM1's K loop (LOP3, FADD, FFMA one each, the rest loads and
addresses), 56 registers at BLOCK_N 32; each extra row per program adds ~1.1 FFMA per value (sm_80: 4.1).
Numerics: each product c * x is exact and the sums are float32, with the scale applied per word to the
partial sum; the result differs from dequantize-then-multiply (bf16(c s + z) * x summed) only by float32
rounding (not bit-identical). quant.dequantize's values remain what the weights mean. The activations
stay float32 between the GEMMs (the tl.dot path rounds them to bf16). x * 2**23 overflows float32 only
for |x| >= 2**105.

Grid (GEMM1, GEMM2): (row block, N block, K slice). A row block is ROWS consecutive sorted rows of one
expert, located on the device from plan.expert_offsets (grouped_gemm._locate_row_block); the host launches
grouped_gemm.max_row_blocks row blocks, an upper bound, and those past the routing's last one exit at once
(empty experts own none; with ROWS = 1 there are exactly T*k, none idle). ROWS (a power of two <= 8,
rows_per_block) follows the mean rows per expert T*k/E: 1 at every decode shape of the presets. Row blocks
of one expert are adjacent in the grid's fastest axis, so an expert with more rows than ROWS has its
weights streamed by several programs at the same time, from DRAM once and then L2. Each row a program
carries costs ~1 FFMA per weight value whether it exists or not, hence the small ROWS. A single token (T = 1,
ROWS 1) reads the router's top-k instead of the plan (ONE_TOKEN_TOPK, as in grouped_gemm): row j is slot j, so
no sorting runs at all.

Split-K (gemv_split_k): a GEMM with fewer than GEMV_PROGRAMS_PER_SM programs (row blocks x N blocks) per
SM has its K range cut into S slices (a power of two, whole BLOCK_K steps, slices >= GEMV_MIN_SLICE long),
each writing float32 partial sums that the finisher adds in a fixed order. mixtral T=1 GEMM2 (2 experts x
4096 rows, K = 14336) is the case: 128 programs of BLOCK_N 64 for 132 SMs, cut in 8.

Block sizes (GemvConfig: BLOCK_N, BLOCK_K, num_warps, split_k) are constexprs, not autotuned (under the
interpreter there is no GPU to time; on a GPU the caller passes one, scripts/gpu_int4_gemv.py measures the
candidates). BLOCK_K is lowered to divide the group size: every K step lies in one group (one scale per
row) and K, a multiple of the group, is a multiple of BLOCK_K, so the K loop has no masks; rows and
columns past the end are clamped to valid ones instead of masked, and never stored.

The plain-PyTorch reference is quant.int4_moe_reference (float32 on the dequantised weights);
prepare_activations_reference spells out the x' layout.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ..env import env_choice, env_parsed, interpreting, programmatic_launch_ok
from ..quant import QuantizedTensor
from ..routing import RoutingPlan
from .grouped_gemm import (
    ONE_TOKEN_SUM_ENV,
    _alloc,
    _capability,
    _cuda_index,
    _last_arrival_sums_slots,
    _locate_row_block,
    _zero_arrivals,
    max_row_blocks,
    num_sms,
    one_token_routing,
    one_token_sum_in_gemm2,
    sum_slots,
)
from .int4_gemm import GEMV_MAX_TOKENS, check_int4_inputs  # noqa: F401  (GEMV_MAX_TOKENS re-exported)
from .launch import cdiv, launch, next_power_of_2
from .pdl import pdl_launch, wait_for_previous_kernel

FINISH_ENV = "MOE_TUT_GEMV_FINISH"  # "gemm1" (default): split GEMM1's last K slice applies the SwiGLU; "kernel"
CONFIG_ENV = "MOE_TUT_GEMV_CONFIG"  # "GEMM1[;GEMM2]" (GemvConfig.parse each): pins what default_configs returns
FUSED_ENV = "MOE_TUT_GEMV_FUSED"  # "auto" (default, fuse_gemms), "1" or "0": GEMM1 and GEMM2 in one launch or two
MAX_ROWS_PER_BLOCK = 8  # ROWS: rows of one expert per program; each is one more FFMA per weight value
# Split K until a GEMM has this many programs per SM (or the limits below). 7, not 4: mixtral T=1's GEMM1 (896
# programs, 6.8 per SM, up to 9 resident) waited on DRAM latency (ncu: 43% of DRAM peak; results/h100/
# int4_gemv_ncu_v1) and two K slices took the forward from 0.128 to 0.120 ms on an H100 (results/h100/LOG.md).
# It counts programs, not warps: with the 2-warp GEMM 1 (session 12) deepseek-v3 T=1 keeps 1024 programs, 23% achieved
# occupancy (ncu), but two slices (full occupancy) were not faster (105.9 vs 105.5-106.1 us; gemv_stages_v1).
GEMV_PROGRAMS_PER_SM = 7
GEMV_SPLIT_K_MAX = 8
# K per slice: shorter slices spend more on partial sums than they win. 256, not 512 (session 13, results/h100/
# fused_gemv_v1): qwen3-30b-a3b T=1's GEMM2 (K = 768, 256 programs) is cut in 2, 23.2-23.7 -> 21.8-22.1 us; no other
# GEMV shape of mixtral, deepseek-v3, glm-4.5, qwen3 at T = 1, 4, 16 moved outside its spread (128: the same).
GEMV_MIN_SLICE = 256
WORD_VALUES = 8  # 4-bit codes per int32 word
ONE_BITS = 0x3F800000  # float32 1.0


@dataclass(frozen=True)
class GemvConfig:
    """Block sizes of one GEMV GEMM: BLOCK_N weight rows x BLOCK_K values of K per step, num_warps, split_k (K
    slices, a power of two; 0 = automatic, gemv_split_k) and stages (the K loop's software pipeline).

    BLOCK_K is lowered to the group size's largest power-of-two divisor where it is larger (adapt_block_k),
    so a step always lies in one group and K (a multiple of the group) is a multiple of BLOCK_K. stages 1: each
    step's loads are plain register loads, and the step waits on its packed words before its first FFMA (sm_90
    SASS), so a program has one step of weights in flight; only many resident programs per SM hide DRAM latency.
    stages s > 1 (tl.range num_stages): Triton copies each step's words and activations into shared memory with
    cp.async, s - 1 steps ahead of the one computed (sm_90, GEMM1 at BLOCK_N 16, 2 warps, s = 3: 71 registers,
    9 KB of shared memory, 299 SASS instructions per step instead of 246).
    """

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    split_k: int = 0
    stages: int = 1

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < WORD_VALUES or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= {WORD_VALUES}, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.split_k < 0 or self.split_k & (self.split_k - 1):
            raise ValueError(f"split_k must be 0 (automatic) or a power of two, got {self.split_k}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")

    @classmethod
    def parse(cls, text: str) -> GemvConfig:
        """'BLOCK_N,BLOCK_K,warps[,split_k[,stages]]', e.g. '32,128,4', '64,128,8,2' or '16,128,2,0,3'."""
        try:
            values = [int(v) for v in text.replace(" ", "").split(",")]
            if not 3 <= len(values) <= 5:
                raise ValueError
        except ValueError:
            raise ValueError(f"a GEMV config is 'BLOCK_N,BLOCK_K,warps[,split_k[,stages]]' (e.g. 32,128,4), got "
                             f"{text!r}") from None
        return cls(*values)

    def label(self) -> str:
        return (f"n{self.block_n}k{self.block_k}w{self.num_warps}" + (f"s{self.split_k}" if self.split_k else "")
                + (f"st{self.stages}" if self.stages > 1 else ""))


# Defaults before any GPU timing (scripts/gpu_int4_gemv.py measures the candidates), chosen from the sm_90
# code Triton 3.6 generates (ptxas on the CPU machine, ROWS 1, group 128): with BLOCK_K 128 each thread loads
# 16 B of packed words per weight tile and step (4 threads per row). GEMM1 (gate and up tiles) at BLOCK_N 32:
# 56 registers (up to 9 programs per SM), K loop 3.8 instructions per weight value, ~3.1 of them the LOP3,
# FADD and FFMA per value (BLOCK_N 64: 3.6 per value but 96 registers, 5 programs per SM). GEMM2 (one tile)
# at BLOCK_N 64: 64 registers, 3.8 per value (BLOCK_N 32: 4.2, the per-step overhead shared by fewer values).
# GEMM1 pipelined (stages 3) in 16-row, 2-warp programs; GEMM2 not pipelined. H100, session 12 (results/h100/
# gemv_stages_v1, forward under graph replay, us, unpipelined n32 4 warps -> this): mixtral T=1 106.4-106.8 ->
# 99.7-100.0, glm-4.5 67.0-67.2 -> 61.3-61.4, qwen3-30b-a3b 24.1 -> 23.7, deepseek-v3 104.9 -> 105.5-105.6; T=4
# -2 to -10% on all four. GEMM2 pipelined as well was mixed (one pass: mixtral T=1 +1 us, T=4 +17; qwen3 T=1 -1.3,
# deepseek-v3 T=4 -3.8), so it is not.
DEFAULT_GEMM1_CONFIG = GemvConfig(16, 128, 2, stages=3)
DEFAULT_GEMM2_CONFIG = GemvConfig(64, 128, 4)
# GEMM1 at BLOCK_N 64 where experts get half a row or more on average (T*k/E >= 0.5: few large experts, whose
# rows' programs share weights through L2). H100 (results/h100/int4_gemv_v1, BLOCK_N 64 vs 32): mixtral T=2
# 0.196 vs 0.204 ms, T=4 0.289 vs 0.366; where T*k/E < 0.5 it tied or lost by 1-6% (deepseek-v3 T=1-4,
# qwen3-30b-a3b T=1-4, mixtral T=1). Pipelined (session 12): mixtral T=4 275.5-276.1 -> 261.6-263.7 us.
WIDE_GEMM1_CONFIG = GemvConfig(64, 128, 4, stages=3)
WIDE_GEMM1_MIN_ROWS_PER_EXPERT = 0.5
# Under the interpreter the cost grows with programs x K steps: one wide block.
INTERPRETER_GEMV_CONFIG = GemvConfig(64, 128, 4)
# The fused launch (one warp count for both GEMMs). H100, session 13 (results/h100/fused_gemv_v1, one launch, us at
# T = 1, GEMM2 64 x 128): GEMM1 64 x 128 mixtral 96.2-96.9, deepseek-v3 98.3-98.7; 32 x 128 (DEFAULT_GEMM1_CONFIG's
# work per thread at 4 warps) 103.0 and 127.6; 128 x 128 112.3 and 110.5. GEMM1 cut in 8 K slices rather than by
# GEMV_PROGRAMS_PER_SM's 2-4 and GEMM2 in 128 x 128 blocks: mixtral 95.4, deepseek-v3 96.3-96.5 (glm-4.5 the same).
FUSED_GEMM1_CONFIG = GemvConfig(64, 128, 4, stages=3)
FUSED_GEMM2_CONFIG = GemvConfig(128, 128, 4)
# fuse_gemms' floor: glm-4.5 T = 1 (94 MB of packed weights) gained 2 us fused, qwen3-30b-a3b (19 MB, ~23 us)
# lost 2-3 us even with its GEMM2 split (session 13, call 6)
FUSED_MIN_WEIGHT_BYTES = 48 << 20
# Register cap of the fused launch. Uncapped, GEMM1's 96 registers also hold GEMM2's tiles to 5 blocks per SM (GEMM2
# alone: 64 registers, 8 blocks; ncu, results/h100/fused_gemv_v1). At 80 (6 blocks; ptxas spills 8 bytes), H100 T = 1:
# mixtral 95.3-95.5 -> 93.0-93.2 us, deepseek-v3 96.9 -> 94.7-94.9, glm-4.5 59.6-59.7 -> 56.6-56.8; 72 and 64 (more
# spills) were slower than uncapped (glm-4.5 at 72: the same).
FUSED_MAXNREG = 80
FUSED_GEMM1_PROGRAMS_PER_SM = 28  # GEMM1's split-K target in the fused launch: up to GEMV_SPLIT_K_MAX on the presets
# Candidates the GPU script measures.
CANDIDATE_CONFIGS = (
    GemvConfig(32, 128, 4),
    GemvConfig(64, 128, 4),
    GemvConfig(16, 128, 2),
    GemvConfig(64, 128, 8),
    GemvConfig(128, 128, 8),
)


def fuse_gemms(one_token: bool, split2: int, weight_bytes: int) -> bool:
    """Whether GEMM1 and GEMM2 should share one launch (_gemv_fused_kernel, where fusion_blocker allows), by
    MOE_TUT_GEMV_FUSED: "1" always, "0" never, "auto" (the default) for one token whose GEMM2 is split along K and
    whose touched experts' packed weights (weight_bytes, an upper bound) are at least FUSED_MIN_WEIGHT_BYTES.

    Measured on an H100 (session 13, results/h100/fused_gemv_v1; forward us): T = 1 two launches -> one (call 5) ->
    one capped at FUSED_MAXNREG (call 11, another process): mixtral 99.8-100.2 -> 95.2-95.7, then 95.3-95.5 ->
    93.0-93.2; deepseek-v3 105.8 -> 97.0-97.1, then 96.9 -> 94.7-94.9; glm-4.5 61.4-61.6 -> 59.5-59.6, then 59.6-59.7
    -> 56.6-56.8. qwen3-30b-a3b lost 2-3 us fused, with or without its GEMM2 split. T = 4 (call 11, two launches ->
    capped one): deepseek-v3 373.6-374.4 -> 358.1-358.4, but mixtral 262.3 -> 279.3 and glm-4.5 207.1 -> 208.5, so
    batches of two or more tokens keep two launches."""
    mode = env_choice(FUSED_ENV, ("auto", "1", "0"))
    return mode == "1" or (mode == "auto" and one_token and split2 > 1 and weight_bytes >= FUSED_MIN_WEIGHT_BYTES)


def fusion_blocker(F: int, config1: GemvConfig, config2: GemvConfig, split1: int, split2: int) -> str | None:
    """Why GEMM1 and GEMM2 (resolved configs and splits) cannot share one launch, or None: the launch has one warp
    count, each block of BLOCK_N1 act' columns must lie in one GEMM2 K slice, and a split GEMM1 must finish the
    SwiGLU itself (MOE_TUT_GEMV_FINISH=gemm1)."""
    if config1.num_warps != config2.num_warps:
        return f"GEMM1 has {config1.num_warps} warps, GEMM2 {config2.num_warps}"
    if (F // split2) % config1.block_n:
        return f"GEMM2's K slices of {F // split2} are not whole blocks of {config1.block_n} GEMM1 columns"
    if split1 > 1 and not finish_in_gemm():
        return f"{FINISH_ENV}=kernel"
    return None


def finish_in_gemm() -> bool:
    """MOE_TUT_GEMV_FINISH: whether a GEMM1 split along K applies the SwiGLU in its last K slice per tile ("gemm1",
    the default) or in a finisher kernel after it ("kernel")."""
    return env_choice(FINISH_ENV, ("gemm1", "kernel")) == "gemm1"


def rows_per_block(num_tokens: int, top_k: int, num_experts: int) -> int:
    """ROWS: the largest power of two <= the mean rows per expert T*k/E (at least 1, at most
    MAX_ROWS_PER_BLOCK).

    An expert's rows beyond ROWS go to further row blocks, which the grid runs side by side, so they read
    the expert's weights from L2 rather than DRAM; each row a program carries costs one FFMA per weight value
    whether the row exists or not. At decode sizes T*k/E <= 1 (mixtral T=4: 8 slots on 8 experts, mostly one
    row each; deepseek-v3, qwen3: far fewer), so ROWS = 1: the fewest instructions per weight value
    (sm_90 code: GEMM1 K loop 3.8 per value at ROWS 1, 5.1 per value at ROWS 2, 7.8 at ROWS 4)."""
    rows = 1
    while rows * 2 <= min(MAX_ROWS_PER_BLOCK, num_tokens * top_k / max(1, num_experts)):
        rows *= 2
    return rows


def adapt_block_k(cfg: GemvConfig, group_size: int) -> GemvConfig:
    """cfg with BLOCK_K lowered, if needed, to the group size's largest power-of-two divisor (>= 8, since
    the group size is a multiple of 8): one group per K step."""
    if group_size % cfg.block_k == 0:
        return cfg
    return replace(cfg, block_k=min(cfg.block_k, group_size & -group_size))


def gemv_unsupported(weights) -> str | None:
    """Why the GEMV path cannot take these weights (None if it can): each int32 word of 8 codes must lie
    in one group and the packed tensors must be viewable as int32 words."""
    for name in ("w13", "w2"):
        qt = getattr(weights, name)
        if qt.group_size % WORD_VALUES:
            return f"{name}: group size {qt.group_size} is not a multiple of {WORD_VALUES} (one word per group)"
        p = qt.packed
        if p.stride(-1) != 1 or any(s % 4 for s in p.stride()[:-1]) or p.storage_offset() % 4:
            return f"{name}: packed codes are not laid out as whole int32 words"
    return None


def one_in_mask(device: torch.device) -> bool:
    """_code's ONE_IN_MASK for a device: off on sm_90 and newer, where ptxas keeps 1.0's bits in a register
    (K loop 3.8 instructions per weight value, 4.0 with it on), on elsewhere (sm_80: 4.1 with it, 4.8
    without). Both forms give the same values; the interpreter runs either."""
    device = torch.device(device)
    return not (device.type == "cuda" and _capability(_cuda_index(device))[0] >= 9)


def packed_words(qt: QuantizedTensor) -> torch.Tensor:
    """The packed codes [E, N, K/2] uint8 as int32 words [E, N, K/8] (a view; word j holds k = 8j..8j+7)."""
    return qt.packed.view(torch.int32)


def gemv_split_k(programs: int, K: int, block_k: int, sms: int, per_sm: int = GEMV_PROGRAMS_PER_SM) -> int:
    """K slices for a GEMV GEMM of `programs` programs: the smallest power of two giving at least `per_sm`
    programs per SM, within GEMV_SPLIT_K_MAX, whole BLOCK_K steps per slice and slices of at least
    GEMV_MIN_SLICE."""
    s = 1
    while (programs * s < per_sm * sms and s < GEMV_SPLIT_K_MAX and K % (2 * s * block_k) == 0
           and K // (2 * s) >= GEMV_MIN_SLICE):
        s *= 2
    return s


def resolve_split_k(cfg: GemvConfig, programs: int, K: int, sms: int, per_sm: int = GEMV_PROGRAMS_PER_SM) -> int:
    """cfg.split_k if set (halved until K holds whole BLOCK_K steps per slice), else gemv_split_k."""
    if not cfg.split_k:
        return gemv_split_k(programs, K, cfg.block_k, sms, per_sm)
    s = cfg.split_k
    while s > 1 and K % (s * cfg.block_k):
        s //= 2
    return s


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _store_prepared(vals, dst_rows, row_ok, c0, N, xp_ptr, xw_ptr, stride_pm, stride_wm, M: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Store activations vals [M, BLOCK] (float32; columns c0..c0+BLOCK of rows dst_rows, c0 a multiple of
    8) in the GEMV input layout: x'[r, i*(N/8) + j] = x[r, 8j+i] * 2**(23 - 4p_i), p_i = i for i <= 4 else
    i - 3 (the bit group code i is read from, see the module docstring), and the word sums
    xw[r, j] = sum_i x[r, 8j+i]."""
    offs = c0 + tl.arange(0, BLOCK)
    col_ok = offs < N
    nib = offs % 8
    pos = tl.where(nib >= 5, nib - 3, nib)
    scale = ((150 - 4 * pos) << 23).to(tl.float32, bitcast=True)  # exponent 127 + 23 - 4p: exactly 2**(23-4p)
    r64 = dst_rows.to(tl.int64)[:, None]
    tl.store(xp_ptr + r64 * stride_pm + nib[None, :] * (N // 8) + (offs // 8)[None, :], vals * scale[None, :],
             mask=row_ok[:, None] & col_ok[None, :])
    sums = tl.sum(tl.reshape(vals, (M, BLOCK // 8, 8)), axis=2)
    words = c0 // 8 + tl.arange(0, BLOCK // 8)
    tl.store(xw_ptr + r64 * stride_wm + words[None, :], sums, mask=row_ok[:, None] & (words < N // 8)[None, :])


@triton.jit
def _gemv_prep_kernel(x_ptr, xp_ptr, xw_ptr, K, stride_xm, stride_xk, stride_pm, stride_wm, BLOCK: tl.constexpr,
                      USE_PDL: tl.constexpr = False, arrivals_ptr=None, num_arrivals=0,
                      ZERO_COUNTERS: tl.constexpr = False):
    """x [T, K] (bf16/fp16) -> x' [T, K] float32 and word sums [T, K/8] (_store_prepared). Grid (T, K blocks).
    ZERO_COUNTERS: also zero the arrival counters of the GEMM2 that sums the slots (SUM_SLOTS_LAST)."""
    wait_for_previous_kernel(USE_PDL)
    if ZERO_COUNTERS:
        _zero_arrivals(arrivals_ptr, num_arrivals)
    row = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK
    offs = c0 + tl.arange(0, BLOCK)
    vals = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs[None, :] * stride_xk, mask=(offs < K)[None, :],
                   other=0.0).to(tl.float32)
    rows = row + tl.arange(0, 1)
    _store_prepared(vals, rows, rows >= 0, c0, K, xp_ptr, xw_ptr, stride_pm, stride_wm, 1, BLOCK)


@triton.jit
def _code(w, one_bits, SHIFT: tl.constexpr, SYMMETRIC: tl.constexpr, ONE_IN_MASK: tl.constexpr):
    """The 4-bit codes c at bits SHIFT..SHIFT+3 of the int32 words w as exact float32 values: c * 2**(SHIFT-23),
    or with SYMMETRIC (c - 8) * 2**(SHIFT-23). The code is OR-ed, in place, into the mantissa of 1.0, and
    1.0 (plus 8 * 2**(SHIFT-23)) is subtracted; both numbers lie in [1, 2), so the difference is exact.

    (w & mask) | ONE is one LOP3 only if ONE sits in a register (a LOP3 takes one immediate or constant-bank
    operand): ptxas for sm_90 keeps the argument one_bits in a register, ptxas for sm_80 reads it from the
    constant bank and emits two LOP3s. ONE_IN_MASK: w arrives already OR-ed with ONE (once per word) and the
    code is taken as w & (mask | ONE), one LOP3 with one immediate on any target: (w | ONE) & (mask | ONE)
    equals (w & mask) | ONE because ONE and mask share no bit."""
    if SYMMETRIC:
        BIAS: tl.constexpr = 1.0 + 8.0 / (1 << (23 - SHIFT))
    else:
        BIAS: tl.constexpr = 1.0
    if ONE_IN_MASK:
        bits = w & ((0xF << SHIFT) | 0x3F800000)
    else:
        bits = (w & (0xF << SHIFT)) | one_bits
    return bits.to(tl.float32, bitcast=True) - BIAS


@triton.jit
def _word_sums(w, x0, x1, x2, x3, x4, x5, x6, x7, one_bits, SYMMETRIC: tl.constexpr, ONE_IN_MASK: tl.constexpr):
    """p [ROWS, BLOCK_N, BLOCK_W] = sum over the 8 codes of each word of c_i * x_i (SYMMETRIC: (c_i - 8) * x_i),
    from the words w [1, BLOCK_N, BLOCK_W] and the prepared activations x'_i = x_i * 2**(23 - 4p_i)
    [ROWS, 1, BLOCK_W]. Each product is exact; 8 FFMA (the first an FMUL) per word and row."""
    hi = w >> 12  # codes 5, 6, 7 move to bits 8, 12, 16 (in-mantissa positions 2, 3, 4)
    if ONE_IN_MASK:
        w = w | one_bits
        hi = hi | one_bits
    p = _code(w, one_bits, 0, SYMMETRIC, ONE_IN_MASK) * x0
    p += _code(w, one_bits, 4, SYMMETRIC, ONE_IN_MASK) * x1
    p += _code(w, one_bits, 8, SYMMETRIC, ONE_IN_MASK) * x2
    p += _code(w, one_bits, 12, SYMMETRIC, ONE_IN_MASK) * x3
    p += _code(w, one_bits, 16, SYMMETRIC, ONE_IN_MASK) * x4
    p += _code(hi, one_bits, 8, SYMMETRIC, ONE_IN_MASK) * x5
    p += _code(hi, one_bits, 12, SYMMETRIC, ONE_IN_MASK) * x6
    p += _code(hi, one_bits, 16, SYMMETRIC, ONE_IN_MASK) * x7
    return p


@triton.jit
def _gemv_kernel(x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, out_ptr, out_w_ptr, x_rows_ptr, out_rows_ptr, row_weight_ptr,
                 offsets_ptr, one_bits, stride_xm, stride_xwm, stride_qe, stride_qn, stride_se, stride_sg, stride_sn,
                 stride_ze, stride_zg, stride_zn, stride_os, stride_om, stride_owm,
                 N: tl.constexpr, KW: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, GATHER_X: tl.constexpr, SWIGLU: tl.constexpr,
                 ACT_OUT: tl.constexpr, WEIGHT_SCATTER: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_IN_MASK: tl.constexpr = False,
                 USE_PDL: tl.constexpr = False, ONE_TOKEN_TOPK: tl.constexpr = 0, y_ptr=None, arrivals_ptr=None,
                 SUM_SLOTS_LAST: tl.constexpr = False, act_ptr=None, act_w_ptr=None, stride_am=0, stride_awm=0,
                 FINISH_LAST: tl.constexpr = False, STAGES: tl.constexpr = 1):
    """One program: ROWS sorted rows of one expert x BLOCK_N output columns x one K slice.

    x_ptr/xw_ptr  prepared activations x' [*, 8*KW] and word sums [*, KW] (rows: x_rows[r] with GATHER_X)
    q_ptr         packed int32 words [E, N (2N with SWIGLU), KW]; s_ptr/z_ptr [E, K/G, N (2N)]
    out           ACT_OUT: silu(gate) * up stored prepared for the next GEMM (out_ptr x', out_w_ptr word sums);
                  else float32 (or the activation dtype) sums at out[k_slice, row, n] (SWIGLU: gate at n, up
                  at N + n, no activation); WEIGHT_SCATTER: times row_weight[r] at row out_rows[r] (the slot)
    ONE_TOKEN_TOPK = k > 0 (T = 1, ROWS 1): row r is slot r of the single token, its expert x_rows_ptr[r] (the
                  router's topk_ids) and its weight row_weight_ptr[r] (topk_weights); no RoutingPlan is read,
                  the activation row is 0 and the output row r (grouped_gemm._locate_row_block)
    SUM_SLOTS_LAST (ONE_TOKEN_TOPK = k, not ACT_OUT): the last of the k * SPLIT_K programs of a column block to
                  store writes y[0, columns] = the sum of out over slices and slots (grouped_gemm.
                  _last_arrival_sums_slots; arrivals zeroed by the prep kernel)
    FINISH_LAST   (SWIGLU, SPLIT_K > 1): the last of the SPLIT_K programs of a (row block, column block) to store its
                  partial sums adds the slices' gate and up sums and stores silu(gate) * up prepared at act_ptr /
                  act_w_ptr, what _gemv_swiglu_finish_kernel would (counter arrivals[pid_m * N blocks + pid_n]; the
                  same bits, except that the word sums, used with zero points, may be added in another order)
    N and KW (words per weight row) are constexprs: the 8 activation loads per step then sit at constant
    offsets of one address (no address arithmetic each), and the compiler knows the word offsets are
    16-byte aligned, so the packed-word loads are 128-bit.
    """
    wait_for_previous_kernel(USE_PDL)
    _gemv_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(1),
               x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, out_ptr, out_w_ptr, x_rows_ptr, out_rows_ptr, row_weight_ptr,
               offsets_ptr, one_bits, stride_xm, stride_xwm, stride_qe, stride_qn, stride_se, stride_sg, stride_sn,
               stride_ze, stride_zg, stride_zn, stride_os, stride_om, stride_owm, N, KW, E, E_PAD, GROUP_SIZE,
               HAS_ZEROS, GATHER_X, SWIGLU, ACT_OUT, WEIGHT_SCATTER, SPLIT_K, ROWS, BLOCK_N, BLOCK_K, ONE_IN_MASK,
               ONE_TOKEN_TOPK, y_ptr, arrivals_ptr, SUM_SLOTS_LAST, act_ptr, act_w_ptr, stride_am, stride_awm,
               FINISH_LAST, STAGES, X_CACHE="")


@triton.jit
def _gemv_tile(pid_m, pid_n, k_slice, num_pid_n, x_ptr, xw_ptr, q_ptr, s_ptr, z_ptr, out_ptr, out_w_ptr, x_rows_ptr,
               out_rows_ptr, row_weight_ptr, offsets_ptr, one_bits, stride_xm, stride_xwm, stride_qe, stride_qn,
               stride_se, stride_sg, stride_sn, stride_ze, stride_zg, stride_zn, stride_os, stride_om, stride_owm,
               N: tl.constexpr, KW: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
               GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, GATHER_X: tl.constexpr, SWIGLU: tl.constexpr,
               ACT_OUT: tl.constexpr, WEIGHT_SCATTER: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_IN_MASK: tl.constexpr,
               ONE_TOKEN_TOPK: tl.constexpr, y_ptr, arrivals_ptr,
               SUM_SLOTS_LAST: tl.constexpr, act_ptr, act_w_ptr, stride_am, stride_awm,
               FINISH_LAST: tl.constexpr, STAGES: tl.constexpr,
               ready_ptr=None, READY_SLICES: tl.constexpr = 0, READY_COLS: tl.constexpr = 1,
               READY_TARGET: tl.constexpr = 0, X_CACHE: tl.constexpr = ""):
    """One tile of _gemv_kernel (its arguments; the tile is row block pid_m, column block pid_n of num_pid_n, K slice
    k_slice), for _gemv_kernel and _gemv_fused_kernel. For the fused kernel (READY_SLICES = GEMM2's K slices > 0):
    GEMM1 (READY_TARGET 0) counts each stored block of act' columns in at ready[pid_m, the GEMM2 K slice of
    READY_COLS columns holding them]; GEMM2 (READY_TARGET > 0) first waits until ready[pid_m, k_slice] reaches
    READY_TARGET and loads act' with the cache modifier X_CACHE (act_cache: ".cg" where a line could span two K
    slices, so this SM's L1 might hold it from before it was complete)."""

    BLOCK_W: tl.constexpr = BLOCK_K // 8
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)  # one group per K step (the host lowers BLOCK_K)
    tl.static_assert(KW % (SPLIT_K * BLOCK_W) == 0)
    SYMMETRIC: tl.constexpr = not HAS_ZEROS
    # With ONE_TOKEN_TOPK, x_rows_ptr holds topk_ids: read here as each row's expert (else not read here)
    expert, row_start, row_end = _locate_row_block(pid_m, offsets_ptr, x_rows_ptr, offsets_ptr, E, E_PAD, ROWS,
                                                   True, ONE_TOKEN_TOPK)
    if ONE_TOKEN_TOPK > 0:
        tl.static_assert(ROWS == 1)
        id_ok = expert >= 0  # an out-of-range id reads expert 0 and adds nothing (weight 0)
        expert = tl.maximum(expert, 0)
    if row_start < row_end:  # row blocks past the routing's last one do nothing
        if READY_TARGET > 0:  # fused GEMM2: this K slice of the row block's act' must be complete
            _wait_ready(ready_ptr + pid_m * READY_SLICES + k_slice, READY_TARGET)
        rows = row_start + tl.arange(0, ROWS)
        row_ok = rows < row_end
        # Rows past the block's end and columns past N are clamped to valid ones rather than masked: the loads
        # need no masks (no zero-fill), and those results are never stored.
        rows_c = tl.minimum(rows, row_end - 1)
        if ONE_TOKEN_TOPK > 0 and GATHER_X:  # every slot is token 0's
            x_rows = rows_c * 0
        elif GATHER_X:
            x_rows = tl.load(x_rows_ptr + rows_c)
        else:
            x_rows = rows_c
        if SPLIT_K == 1:
            w_len = KW
        else:  # a multiple of BLOCK_W (the host makes K a multiple of SPLIT_K * BLOCK_K)
            w_len = (KW // (SPLIT_K * BLOCK_W)) * BLOCK_W
        w_begin = k_slice * w_len
        # Every tile is 3-D [ROWS, BLOCK_N, BLOCK_W] (size-1 dims broadcast), so the packed-word load's layout
        # (16 B per thread along the words) is the accumulator's: no layout conversion in the K loop.
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n_c = tl.minimum(offs_n, N - 1)[None, :, None]
        offs_w = tl.arange(0, BLOCK_W)[None, None, :]
        e64 = expert.to(tl.int64)  # all experts' words pass 2**31 bytes on the largest presets
        q_rows = q_ptr + e64 * stride_qe + offs_n_c.to(tl.int64) * stride_qn
        s_row = s_ptr + e64 * stride_se + offs_n_c * stride_sn
        z_row = z_ptr + e64 * stride_ze + offs_n_c * stride_zn  # z_ptr = s_ptr when symmetric: never read
        x_base = x_ptr + x_rows.to(tl.int64)[:, None, None] * stride_xm
        xw_base = xw_ptr + x_rows.to(tl.int64)[:, None, None] * stride_xwm
        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_W), dtype=tl.float32)
        acc_up = tl.zeros((ROWS, BLOCK_N, BLOCK_W), dtype=tl.float32)
        # STAGES > 1: Triton software-pipelines the step's loads (cp.async into shared memory, STAGES - 1 steps ahead)
        for w0 in tl.range(w_begin, w_begin + w_len, BLOCK_W, num_stages=STAGES):
            # No masks: BLOCK_K divides the group size, which divides K, so every step is whole and lies in
            # one group (one scale per row), and rows/columns are clamped above.
            cols = w0 + offs_w
            x_ptrs = x_base + cols
            x0 = tl.load(x_ptrs, cache_modifier=X_CACHE)
            x1 = tl.load(x_ptrs + KW, cache_modifier=X_CACHE)
            x2 = tl.load(x_ptrs + 2 * KW, cache_modifier=X_CACHE)
            x3 = tl.load(x_ptrs + 3 * KW, cache_modifier=X_CACHE)
            x4 = tl.load(x_ptrs + 4 * KW, cache_modifier=X_CACHE)
            x5 = tl.load(x_ptrs + 5 * KW, cache_modifier=X_CACHE)
            x6 = tl.load(x_ptrs + 6 * KW, cache_modifier=X_CACHE)
            x7 = tl.load(x_ptrs + 7 * KW, cache_modifier=X_CACHE)
            g = (w0 * 8) // GROUP_SIZE
            w = tl.load(q_rows + cols)
            # acc += s * p and acc += z * X as two statements: one FFMA each per word (as one expression the
            # compiler emits FMUL + FFMA + FADD)
            acc += tl.load(s_row + g * stride_sg).to(tl.float32) * _word_sums(w, x0, x1, x2, x3, x4, x5, x6, x7,
                                                                                one_bits, SYMMETRIC, ONE_IN_MASK)
            if HAS_ZEROS:  # asymmetric: sum_k (c s + z) x = s sum_k c x + z X, X the word's activation sum
                xw = tl.load(xw_base + cols, cache_modifier=X_CACHE)
                acc += tl.load(z_row + g * stride_zg).to(tl.float32) * xw
            if SWIGLU:  # the up rows N + n of the same columns: same activations, own scales
                w_up = tl.load(q_rows + N * stride_qn + cols)
                acc_up += tl.load(s_row + N * stride_sn + g * stride_sg).to(tl.float32) * _word_sums(
                    w_up, x0, x1, x2, x3, x4, x5, x6, x7, one_bits, SYMMETRIC, ONE_IN_MASK)
                if HAS_ZEROS:
                    acc_up += tl.load(z_row + N * stride_zn + g * stride_zg).to(tl.float32) * xw
        h = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
        n_ok = offs_n < N
        if ACT_OUT:  # silu(gate) * up, stored as the next GEMM's prepared input
            h_up = tl.sum(acc_up, axis=2)
            act = h * tl.sigmoid(h) * h_up
            _store_prepared(act, rows, row_ok, pid_n * BLOCK_N, N, out_ptr, out_w_ptr, stride_om, stride_owm, ROWS,
                            BLOCK_N)
            if READY_SLICES > 0 and READY_TARGET == 0:  # fused GEMM1: these act' columns are complete
                _signal_ready(ready_ptr + pid_m * READY_SLICES + (pid_n * BLOCK_N) // READY_COLS)
        else:
            if WEIGHT_SCATTER and ONE_TOKEN_TOPK > 0:  # the router's weight; rows are slots already
                h = h * tl.where(id_ok, tl.load(row_weight_ptr + rows_c).to(tl.float32), 0.0)[:, None]
                out_rows = rows_c
            elif WEIGHT_SCATTER:  # routing weight, then the sorted row's token slot t*k + j
                h = h * tl.load(row_weight_ptr + rows_c)[:, None]
                out_rows = tl.load(out_rows_ptr + rows_c)
            else:
                out_rows = rows_c
            o_ptrs = out_ptr + k_slice * stride_os + out_rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
            o_mask = row_ok[:, None] & n_ok[None, :]
            tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=o_mask)
            if SWIGLU:
                tl.store(o_ptrs + N, tl.sum(acc_up, axis=2).to(out_ptr.dtype.element_ty), mask=o_mask)
            if FINISH_LAST:
                tl.static_assert(SWIGLU and not ACT_OUT and SPLIT_K > 1)
                _last_slice_finishes_swiglu(out_ptr, stride_os, stride_om, rows, rows_c, row_ok, pid_n * BLOCK_N,
                                            offs_n, n_ok, N, act_ptr, act_w_ptr, stride_am, stride_awm,
                                            arrivals_ptr + pid_m * num_pid_n + pid_n, SPLIT_K, ROWS, BLOCK_N,
                                            ready_ptr, pid_m * READY_SLICES + (pid_n * BLOCK_N) // READY_COLS,
                                            READY_SLICES > 0)
            if SUM_SLOTS_LAST:
                tl.static_assert(ONE_TOKEN_TOPK > 0 and not SWIGLU)
                _last_arrival_sums_slots(out_ptr, stride_os, stride_om, 1, offs_n, n_ok, y_ptr, arrivals_ptr, pid_n,
                                         SPLIT_K, ONE_TOKEN_TOPK, BLOCK_N)


@triton.jit
def _signal_ready(counter_ptr):
    """Count a stored block of act' in at *counter_ptr: every thread's stores before the barrier, the barrier before
    the release (as in grouped_gemm._last_arrival_sums_slots)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait_ready(counter_ptr, target):
    """Spin until *counter_ptr >= target (acquire), then a barrier, so every thread's loads come after the stores
    counted. (Polling with volatile loads, with or without a nanosleep between polls, measured the same or 1 us
    slower on an H100: results/h100/fused_gemv_v1.)"""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _gemv_fused_kernel(
        x_ptr, xw_ptr, q1_ptr, s1_ptr, z1_ptr, out1_ptr, out1_w_ptr, stride_xm, stride_xwm, stride_q1e, stride_q1n,
        stride_s1e, stride_s1g, stride_s1n, stride_z1e, stride_z1g, stride_z1n, stride_o1s, stride_o1m, stride_o1wm,
        act_ptr, act_w_ptr, q2_ptr, s2_ptr, z2_ptr, out2_ptr, stride_am, stride_awm, stride_q2e, stride_q2n,
        stride_s2e, stride_s2g, stride_s2n, stride_z2e, stride_z2g, stride_z2n, stride_o2s, stride_o2m,
        x_rows_ptr, out_rows_ptr, row_weight_ptr, offsets_ptr, one_bits, row_blocks, queue_ptr, ready_ptr, finish_ptr,
        y_ptr, sum_ptr,
        H: tl.constexpr, F: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, GROUP1: tl.constexpr,
        GROUP2: tl.constexpr, HAS_ZEROS1: tl.constexpr, HAS_ZEROS2: tl.constexpr, SPLIT1: tl.constexpr,
        SPLIT2: tl.constexpr, ROWS: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_K1: tl.constexpr,
        STAGES1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K2: tl.constexpr, STAGES2: tl.constexpr,
        ONE_IN_MASK: tl.constexpr = False, USE_PDL: tl.constexpr = False, ONE_TOKEN_TOPK: tl.constexpr = 0,
        SUM_SLOTS_LAST: tl.constexpr = False, ACT_CACHE: tl.constexpr = ".cg"):
    """GEMM1 and GEMM2 of moe_forward_int4_gemv in one launch, so GEMM2's tiles run on the SMs that GEMM1's last
    tiles leave idle (two launches: GEMM2 waits for the whole of GEMM1).

    Each program takes a ticket from *queue_ptr (zeroed by the prep kernel): tickets below row_blocks x N1 blocks x
    SPLIT1 are GEMM1 tiles (row block fastest, then K slice, then column block: act' fills in column order), the
    rest GEMM2 tiles (row block, column block, then K slice: slice 0 first). A GEMM1 tile that completes a block
    of act' columns (split: its last K slice to arrive, FINISH_LAST) counts it in at ready[row block, GEMM2 K
    slice]; a GEMM2 tile waits until its slice's count reaches F / SPLIT2 / BLOCK_N1. No deadlock: every GEMM1
    ticket is handed out before any GEMM2 ticket, to a program already running, and GEMM1 tiles wait on nothing.
    Arguments: _gemv_kernel's for GEMM1 (suffix 1; out1 = act' unsplit, else the partial sums, finished into
    act_ptr) and GEMM2 (suffix 2; activations act', out2 as _gemv_kernel's out with WEIGHT_SCATTER)."""
    NUM_N1: tl.constexpr = (F + BLOCK_N1 - 1) // BLOCK_N1
    NUM_N2: tl.constexpr = (H + BLOCK_N2 - 1) // BLOCK_N2
    tl.static_assert((F // SPLIT2) % BLOCK_N1 == 0)  # each block of act' columns lies in one GEMM2 K slice
    wait_for_previous_kernel(USE_PDL)
    ticket = tl.atomic_add(queue_ptr, 1, sem="relaxed", scope="gpu")
    tiles1 = row_blocks * NUM_N1 * SPLIT1
    if ticket < tiles1:
        rest = ticket // row_blocks
        _gemv_tile(ticket % row_blocks, rest // SPLIT1, rest % SPLIT1, NUM_N1,
                   x_ptr, xw_ptr, q1_ptr, s1_ptr, z1_ptr, out1_ptr, out1_w_ptr, x_rows_ptr, out_rows_ptr,
                   row_weight_ptr, offsets_ptr, one_bits, stride_xm, stride_xwm, stride_q1e, stride_q1n, stride_s1e,
                   stride_s1g, stride_s1n, stride_z1e, stride_z1g, stride_z1n, stride_o1s, stride_o1m, stride_o1wm,
                   F, H // 8, E, E_PAD, GROUP1, HAS_ZEROS1, True, True, SPLIT1 == 1, False, SPLIT1, ROWS, BLOCK_N1,
                   BLOCK_K1, ONE_IN_MASK, ONE_TOKEN_TOPK, None, finish_ptr, False, act_ptr, act_w_ptr, stride_am,
                   stride_awm, SPLIT1 > 1, STAGES1,
                   ready_ptr=ready_ptr, READY_SLICES=SPLIT2, READY_COLS=F // SPLIT2, X_CACHE="")
    else:
        t2 = ticket - tiles1
        rest = t2 // row_blocks
        _gemv_tile(t2 % row_blocks, rest % NUM_N2, rest // NUM_N2, NUM_N2,
                   act_ptr, act_w_ptr, q2_ptr, s2_ptr, z2_ptr, out2_ptr, out2_ptr, x_rows_ptr, out_rows_ptr,
                   row_weight_ptr, offsets_ptr, one_bits, stride_am, stride_awm, stride_q2e, stride_q2n, stride_s2e,
                   stride_s2g, stride_s2n, stride_z2e, stride_z2g, stride_z2n, stride_o2s, stride_o2m, 0,
                   H, F // 8, E, E_PAD, GROUP2, HAS_ZEROS2, False, False, False, True, SPLIT2, ROWS, BLOCK_N2,
                   BLOCK_K2, ONE_IN_MASK, ONE_TOKEN_TOPK, y_ptr, sum_ptr, SUM_SLOTS_LAST, None, None, 0, 0, False,
                   STAGES2, ready_ptr=ready_ptr, READY_SLICES=SPLIT2, READY_TARGET=(F // SPLIT2) // BLOCK_N1,
                   X_CACHE=ACT_CACHE)


@triton.jit
def _last_slice_finishes_swiglu(part_ptr, stride_ps, stride_pm, rows, rows_c, row_ok, c0, offs_n, n_ok, N, act_ptr,
                                act_w_ptr, stride_am, stride_awm, counter_ptr, SPLIT_K: tl.constexpr,
                                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ready_ptr=None, ready_index=0,
                                SIGNAL_READY: tl.constexpr = False):
    """Called by each of the SPLIT_K programs of a (row block, column block) after storing its gate and up partial
    sums (part[slice, row, n] and [.., N + n]): the last to arrive at *counter_ptr adds the slices in order and stores
    silu(gate) * up prepared, the arithmetic of _gemv_swiglu_finish_kernel (memory ordering: see
    grouped_gemm._last_arrival_sums_slots)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        base = part_ptr + rows_c.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
        ok = row_ok[:, None] & n_ok[None, :]
        gate = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for sl in tl.static_range(SPLIT_K):
            gate += tl.load(base + sl * stride_ps, mask=ok, other=0.0, cache_modifier=".cg")
            up += tl.load(base + sl * stride_ps + N, mask=ok, other=0.0, cache_modifier=".cg")
        _store_prepared(gate * tl.sigmoid(gate) * up, rows, row_ok, c0, N, act_ptr, act_w_ptr, stride_am, stride_awm,
                        ROWS, BLOCK_N)
        if SIGNAL_READY:  # fused: these act' columns are complete
            _signal_ready(ready_ptr + ready_index)


@triton.jit
def _gemv_swiglu_finish_kernel(part_ptr, xp_ptr, xw_ptr, N, stride_ps, stride_pm, stride_pm_out, stride_wm,
                               SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """[S, rows, 2N] float32 partial sums (gate | up) -> act = silu(sum gate) * (sum up), slices added in a
    fixed order, stored prepared (_store_prepared). Grid (rows, N blocks)."""
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK
    offs = c0 + tl.arange(0, BLOCK)
    ok = (offs < N)[None, :]
    base = part_ptr + row.to(tl.int64) * stride_pm + offs[None, :]
    gate = tl.zeros((1, BLOCK), dtype=tl.float32)
    up = tl.zeros((1, BLOCK), dtype=tl.float32)
    for sl in tl.static_range(SPLIT_K):
        gate += tl.load(base + sl * stride_ps, mask=ok, other=0.0)
        up += tl.load(base + sl * stride_ps + N, mask=ok, other=0.0)
    rows = row + tl.arange(0, 1)
    _store_prepared(gate * tl.sigmoid(gate) * up, rows, rows >= 0, c0, N, xp_ptr, xw_ptr, stride_pm_out, stride_wm,
                    1, BLOCK)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------

ELEMENTWISE_BLOCK = 1024  # columns per program of the prep and finisher kernels


def _alloc_f32(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A float32 buffer from grouped_gemm._alloc (so the tests' NaN-filled allocator covers it)."""
    return _alloc(shape, like, torch.float32)


def _prepared_buffers(rows: int, K: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _alloc_f32((rows, K), like), _alloc_f32((rows, K // WORD_VALUES), like)


def activation_scales(device: torch.device | str = "cpu") -> torch.Tensor:
    """[8] float32: the power of two code i of a word is read at, 2**(23 - 4p_i), p = (0, 1, 2, 3, 4, 2, 3, 4)."""
    i = torch.arange(WORD_VALUES, device=device)
    pos = torch.where(i >= 5, i - 3, i)
    return torch.ldexp(torch.ones(WORD_VALUES, device=device), 23 - 4 * pos)


def prepare_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: what prepare_activations computes. x [M, K] -> x' [M, K], word sums [M, K/8] (float32)."""
    M, K = x.shape
    words = x.float().view(M, K // WORD_VALUES, WORD_VALUES)
    xp = (words * activation_scales(x.device)).transpose(1, 2).reshape(M, K)
    return xp, words.sum(dim=2)


def unprepare_activations(xp: torch.Tensor) -> torch.Tensor:
    """The inverse of the x' layout: x' [M, K] -> x [M, K] float32 (exact: the scales are powers of two)."""
    M, K = xp.shape
    words = xp.view(M, WORD_VALUES, K // WORD_VALUES) / activation_scales(xp.device)[None, :, None]
    return words.transpose(1, 2).reshape(M, K)


def prepare_activations(x: torch.Tensor, pdl: bool = False, zero_arrivals: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (x' [T, K] float32, word sums [T, K/8] float32), the GEMV input layout (_store_prepared).
    pdl: launch with programmatic dependent launch (kernels/pdl.py). zero_arrivals: int32 counters to zero too
    (for a GEMM2 with sum_into)."""
    T, K = x.shape
    xp, xw = _prepared_buffers(T, K, x)
    if T:
        block = min(ELEMENTWISE_BLOCK, next_power_of_2(K))
        zero = {} if zero_arrivals is None else dict(arrivals_ptr=zero_arrivals, num_arrivals=zero_arrivals.numel(),
                                                     ZERO_COUNTERS=True)
        launch(_gemv_prep_kernel, (T, cdiv(K, block)),
               (x, xp, xw, K, x.stride(0), x.stride(1), xp.stride(0), xw.stride(0)),
               dict(BLOCK=block, **zero, **pdl_launch(pdl)))
    return xp, xw


def gemv_grouped_gemm(xp: torch.Tensor, xw: torch.Tensor, qt: QuantizedTensor, plan: RoutingPlan, *,
                      pdl: bool = False, **gemm) -> None:
    """One GEMV grouped GEMM over the plan's sorted rows (see _gemv_kernel): writes out (and out_w). gemm: the
    keywords of gemv_kernel_args; pdl: launch with programmatic dependent launch (kernels/pdl.py)."""
    grid, args = gemv_kernel_args(xp, xw, qt, plan, **gemm)
    launch(_gemv_kernel, grid, (), dict(**args, **pdl_launch(pdl)))


def gemv_kernel_args(xp: torch.Tensor, xw: torch.Tensor, qt: QuantizedTensor, plan: RoutingPlan, *, rows: int,
                     config: GemvConfig, split_k: int, gather_rows: bool = False, swiglu: bool = False,
                     weight_scatter: bool = False, out: torch.Tensor | None = None,
                     out_w: torch.Tensor | None = None, topk_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                     sum_into: tuple[torch.Tensor, torch.Tensor] | None = None,
                     finish_into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[tuple[int, int, int], dict]:
    """(grid, arguments by name, num_warps included) of _gemv_kernel for one GEMV grouped GEMM, checked:

    xp, xw   prepared activations [T or T*k, K] and their word sums (prepare_activations)
    rows     ROWS, rows per program; config block sizes (BLOCK_K must divide the group size, and K must
             be a multiple of split_k * BLOCK_K)
    out      swiglu and split_k == 1: prepared act' [T*k, N] with word sums out_w; otherwise
             [split_k, T*k, N (2N with swiglu)] sums (float32, or the activation dtype)
    topk_rows (T = 1, rows 1) grouped_gemm.one_token_routing(plan): the rows are the token's k slots, read from
             these views of the router's top-k; the plan's sorted tensors are not read, row j is slot j
    sum_into (with topk_rows, not swiglu) (y [1, N], arrivals [>= N blocks] int32, all zero): also y = the sum of
             out over slices and slots, by the last program of each column block (SUM_SLOTS_LAST)
    finish_into (swiglu, split_k > 1) (act', its word sums, arrivals [>= row blocks x N blocks] int32, all zero): the
             last K slice of each tile also stores silu(gate) * up prepared there (FINISH_LAST), so no finisher runs
    """
    E, n_w, K = qt.shape
    N = n_w // 2 if swiglu else n_w
    if qt.group_size % config.block_k:
        raise ValueError(f"BLOCK_K={config.block_k} must divide the group size {qt.group_size} (adapt_block_k)")
    if K % (split_k * config.block_k):
        raise ValueError(f"split_k={split_k}: K={K} must be a multiple of split_k * BLOCK_K ({config.block_k})")
    act_out = swiglu and split_k == 1
    z = qt.zeros if qt.zeros is not None else qt.scales  # a valid pointer; HAS_ZEROS=False never reads it
    words = packed_words(qt)
    grid = gemv_grid(plan.num_rows, E, rows, N, config, split_k)
    out_w = out_w if out_w is not None else out
    if topk_rows is not None:
        if rows != 1:
            raise ValueError(f"topk_rows needs one row per program, got rows={rows}")
        ids, route_w = topk_rows
        routing = (ids, ids, route_w, ids)  # the kernel reads ids as each row's expert
    else:
        routing = (plan.sorted_token_ids, plan.sorted_slots, plan.sorted_weights, plan.expert_offsets)
    fused_sum = {}
    if sum_into is not None:
        y, arrivals = sum_into
        if topk_rows is None or swiglu or y.shape != (1, N) or not y.is_contiguous() \
                or arrivals.dtype != torch.int32 or arrivals.numel() < grid[1]:
            raise ValueError(f"sum_into needs topk_rows, no swiglu, y [1, {N}] contiguous and {grid[1]} int32 "
                             f"counters; got y {tuple(y.shape)}, arrivals {tuple(arrivals.shape)} {arrivals.dtype}")
        fused_sum = dict(y_ptr=y, arrivals_ptr=arrivals, SUM_SLOTS_LAST=True)
    if finish_into is not None:
        act, act_w, arrivals = finish_into
        if not swiglu or split_k < 2 or sum_into is not None or act.shape != (plan.num_rows, N) \
                or arrivals.dtype != torch.int32 or arrivals.numel() < grid[0] * grid[1]:
            raise ValueError(f"finish_into needs swiglu, split_k > 1, act' [{plan.num_rows}, {N}] and "
                             f"{grid[0] * grid[1]} int32 counters; got split_k={split_k}, act' {tuple(act.shape)}, "
                             f"arrivals {tuple(arrivals.shape)} {arrivals.dtype}")
        fused_sum = dict(act_ptr=act, act_w_ptr=act_w, stride_am=act.stride(0), stride_awm=act_w.stride(0),
                         arrivals_ptr=arrivals, FINISH_LAST=True)
    routing = dict(zip(("x_rows_ptr", "out_rows_ptr", "row_weight_ptr", "offsets_ptr"), routing, strict=True))
    args = dict(
        x_ptr=xp, xw_ptr=xw, q_ptr=words, s_ptr=qt.scales, z_ptr=z, out_ptr=out, out_w_ptr=out_w, **routing,
        one_bits=ONE_BITS, stride_xm=xp.stride(0), stride_xwm=xw.stride(0), stride_qe=words.stride(0),
        stride_qn=words.stride(1),
        **dict(zip(("stride_se", "stride_sg", "stride_sn"), qt.scales.stride(), strict=True)),
        **dict(zip(("stride_ze", "stride_zg", "stride_zn"), z.stride(), strict=True)),
        stride_os=0 if act_out else out.stride(0), stride_om=out.stride(-2),
        stride_owm=out_w.stride(0) if act_out else 0,
        N=N, KW=K // WORD_VALUES, E=E, E_PAD=max(16, next_power_of_2(E)), GROUP_SIZE=qt.group_size,
        HAS_ZEROS=qt.zeros is not None, GATHER_X=gather_rows, SWIGLU=swiglu, ACT_OUT=act_out,
        WEIGHT_SCATTER=weight_scatter, SPLIT_K=split_k, ROWS=rows, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        STAGES=config.stages, ONE_IN_MASK=one_in_mask(xp.device), ONE_TOKEN_TOPK=0 if topk_rows is None else plan.top_k,
        num_warps=config.num_warps, **fused_sum)
    return grid, args


def gemv_fused_gemms(xp: torch.Tensor, xw: torch.Tensor, act: torch.Tensor, act_w: torch.Tensor, weights,
                     plan: RoutingPlan, gemm1: dict, gemm2: dict, counters: torch.Tensor, pdl: bool = False) -> None:
    """GEMM1 (x' -> act') and GEMM2 (act' -> out) in one launch of _gemv_fused_kernel. gemm1, gemm2: the keywords of
    gemv_kernel_args for each (a split GEMM1 with finish_into); counters: 1 + row blocks x GEMM2 K slices int32,
    zero (the ticket queue, then the ready counts)."""
    grid1, a1 = gemv_kernel_args(xp, xw, weights.w13, plan, **gemm1)
    grid2, a2 = gemv_kernel_args(act, act_w, weights.w2, plan, **gemm2)
    split1, split2 = grid1[2], grid2[2]
    F = a1["N"]
    problem = fusion_blocker(F, gemm1["config"], gemm2["config"], split1, split2)
    if not problem and split1 > 1 and not a1.get("FINISH_LAST"):
        problem = "GEMM1 is split along K but has no finish_into"
    if not problem and (counters.numel() < 1 + grid1[0] * split2 or counters.dtype != torch.int32):
        problem = f"need 1 + {grid1[0] * split2} int32 counters, got {counters.numel()} {counters.dtype}"
    if problem:
        raise ValueError(f"cannot run these GEMMs as one launch: {problem}")
    one, two = _weight_args(a1, 1), _weight_args(a2, 2)
    one.update(out1_ptr=a1["out_ptr"], out1_w_ptr=a1["out_w_ptr"], stride_o1s=a1["stride_os"],
               stride_o1m=a1["stride_om"], stride_o1wm=a1["stride_owm"])
    two.update(out2_ptr=a2["out_ptr"], stride_o2s=a2["stride_os"], stride_o2m=a2["stride_om"])
    tiles = math.prod(grid1) + math.prod(grid2)
    launch(_gemv_fused_kernel, (tiles,), (), dict(
        x_ptr=xp, xw_ptr=xw, stride_xm=a1["stride_xm"], stride_xwm=a1["stride_xwm"], **one,
        act_ptr=act, act_w_ptr=act_w, stride_am=act.stride(0), stride_awm=act_w.stride(0), **two,
        x_rows_ptr=a1["x_rows_ptr"], out_rows_ptr=a2["out_rows_ptr"], row_weight_ptr=a2["row_weight_ptr"],
        offsets_ptr=a1["offsets_ptr"], one_bits=ONE_BITS, row_blocks=grid1[0], queue_ptr=counters,
        ready_ptr=counters[1:], finish_ptr=a1.get("arrivals_ptr"), y_ptr=a2.get("y_ptr"),
        sum_ptr=a2.get("arrivals_ptr"), H=a2["N"], F=F, E=a1["E"], E_PAD=a1["E_PAD"], GROUP1=a1["GROUP_SIZE"],
        GROUP2=a2["GROUP_SIZE"], HAS_ZEROS1=a1["HAS_ZEROS"], HAS_ZEROS2=a2["HAS_ZEROS"], SPLIT1=split1,
        SPLIT2=split2, ROWS=a1["ROWS"], BLOCK_N1=a1["BLOCK_N"], BLOCK_K1=a1["BLOCK_K"], STAGES1=a1["STAGES"],
        BLOCK_N2=a2["BLOCK_N"], BLOCK_K2=a2["BLOCK_K"], STAGES2=a2["STAGES"], ONE_IN_MASK=a1["ONE_IN_MASK"],
        ONE_TOKEN_TOPK=a1["ONE_TOKEN_TOPK"], SUM_SLOTS_LAST=a2.get("SUM_SLOTS_LAST", False),
        ACT_CACHE=act_cache(F, split2),
        num_warps=a1["num_warps"], **pdl_launch(pdl), **({} if interpreting() else dict(maxnreg=FUSED_MAXNREG))))


def act_cache(F: int, split2: int) -> str:
    """The fused GEMM2's cache modifier for act': "" (through L1) where every 128-byte line of act' and its word sums
    lies in one GEMM2 K slice (F and F / split2 multiples of 256), so no SM's L1 can hold a line of a slice read
    before that slice was complete; ".cg" (L2 only) otherwise. (".cg" everywhere: +0.1-0.7 us at T = 1 on an H100.)"""
    return "" if F % 256 == 0 and (F // split2) % 256 == 0 else ".cg"


def _weight_args(args: dict, gemm: int) -> dict:
    """_gemv_kernel's weight arguments renamed for _gemv_fused_kernel's GEMM `gemm`: q_ptr -> q1_ptr, stride_qe ->
    stride_q1e, and so on."""
    strides = dict(q="en", s="egn", z="egn")
    return {f"{w}{gemm}_ptr": args[f"{w}_ptr"] for w in strides} | {
        f"stride_{w}{gemm}{d}": args[f"stride_{w}{d}"] for w, dims in strides.items() for d in dims}


def gemv_grid(num_rows: int, num_experts: int, rows: int, N: int, config: GemvConfig, split_k: int = 1
              ) -> tuple[int, int, int]:
    """The launch grid of a GEMV GEMM with N output columns: (row blocks, column blocks, K slices); FINISH_LAST
    counts arrivals per (row block, column block)."""
    return max_row_blocks(num_rows, num_experts, rows), cdiv(N, config.block_n), split_k


def default_configs(device: torch.device, rows_per_expert: float = 0.0, fused: bool = False
                    ) -> tuple[GemvConfig, GemvConfig]:
    """(GEMM1, GEMM2) block sizes; rows_per_expert = T*k/E picks GEMM1's (WIDE_GEMM1_MIN_ROWS_PER_EXPERT); fused (one
    launch for both): FUSED_GEMM1_CONFIG and FUSED_GEMM2_CONFIG. MOE_TUT_GEMV_CONFIG, where set, pins them
    (config_from_env)."""
    pinned = config_from_env()
    if pinned is not None:
        return pinned
    if interpreting():
        return INTERPRETER_GEMV_CONFIG, INTERPRETER_GEMV_CONFIG
    if fused:
        return FUSED_GEMM1_CONFIG, FUSED_GEMM2_CONFIG
    if rows_per_expert >= WIDE_GEMM1_MIN_ROWS_PER_EXPERT:
        return WIDE_GEMM1_CONFIG, DEFAULT_GEMM2_CONFIG
    return DEFAULT_GEMM1_CONFIG, DEFAULT_GEMM2_CONFIG


def config_from_env() -> tuple[GemvConfig, GemvConfig] | None:
    """MOE_TUT_GEMV_CONFIG="GEMM1[;GEMM2]", e.g. "16,128,2,0,3;64,128,4": the (GEMM1, GEMM2) configs (GEMM2 the
    module default where left out), or None where unset or blank."""
    return env_parsed(CONFIG_ENV, _parse_config_pair)


def _parse_config_pair(text: str) -> tuple[GemvConfig, GemvConfig]:
    parts = text.split(";")
    if len(parts) > 2:
        raise ValueError(f"at most two configs (GEMM1;GEMM2), got {len(parts)}")
    gemm1 = GemvConfig.parse(parts[0])
    return gemm1, GemvConfig.parse(parts[1]) if len(parts) == 2 and parts[1].strip() else DEFAULT_GEMM2_CONFIG


def plan_splits(weights, plan: RoutingPlan, rows: int, config1: GemvConfig, config2: GemvConfig,
                device: torch.device, fused: bool = False) -> tuple[GemvConfig, GemvConfig, int, int]:
    """(GEMM1 config, GEMM2 config, split1, split2): the configs with BLOCK_K fitted to the group sizes
    (adapt_block_k) and split-K resolved (resolve_split_k; fused: GEMM1 to FUSED_GEMM1_PROGRAMS_PER_SM)."""
    return _plan_splits(weights.num_experts, weights.hidden_size, weights.ffn_size, weights.w13.group_size,
                        weights.w2.group_size, plan.num_rows, rows, config1, config2, num_sms(device), fused)


def _plan_splits(E: int, H: int, F: int, group13: int, group2: int, num_rows: int, rows: int, config1: GemvConfig,
                 config2: GemvConfig, sms: int, fused: bool) -> tuple[GemvConfig, GemvConfig, int, int]:
    config1 = adapt_block_k(config1, group13)
    config2 = adapt_block_k(config2, group2)
    blocks = max_row_blocks(num_rows, E, rows)
    split1 = resolve_split_k(config1, blocks * cdiv(F, config1.block_n), H, sms,
                             FUSED_GEMM1_PROGRAMS_PER_SM if fused else GEMV_PROGRAMS_PER_SM)
    split2 = resolve_split_k(config2, blocks * cdiv(H, config2.block_n), F, sms)
    return config1, config2, split1, split2


@dataclass(frozen=True)
class GemvSchedule:
    """What one GEMV forward launches, decided from shapes, arguments and settings alone (so it is cached): the
    resolved configs and K splits, whether both GEMMs share one launch, where the SwiGLU and the slot sum happen,
    and how many int32 counters each of those needs (zeroed by the prep kernel)."""

    config1: GemvConfig
    config2: GemvConfig
    split1: int
    split2: int
    fused: bool
    sum_in_gemm2: bool  # one token: GEMM2's last program per column block sums the slots and K slices
    finish_in_gemm1: bool  # GEMM1 split along K: its last slice per tile applies the SwiGLU (no finisher kernel)
    n_finish: int
    n_sum: int
    n_fused: int


def gemv_schedule(weights, plan: RoutingPlan, rows: int, one_token: bool, device: torch.device,
                  config: GemvConfig | None = None, config2: GemvConfig | None = None,
                  split_k: int = 0) -> GemvSchedule:
    """The GemvSchedule of moe_forward_int4_gemv (its arguments; one_token: the k slots are read from the router's
    top-k). Cached by every value it depends on, the environment variables it reads included, since an eager
    decode forward is host-bound (results/h100/LOG.md, session 18) and this is the same on every call. The
    module's constants (FUSED_MIN_WEIGHT_BYTES, ...) are read when a key is first seen: after changing one,
    _gemv_schedule.cache_clear()."""
    settings = (os.environ.get(CONFIG_ENV), os.environ.get(FUSED_ENV), os.environ.get(FINISH_ENV),
                os.environ.get(ONE_TOKEN_SUM_ENV), interpreting())
    E = weights.num_experts
    return _gemv_schedule(device, E, weights.hidden_size, weights.ffn_size, weights.w13.group_size,
                          weights.w2.group_size, plan.top_k * weights.nbytes // E, plan.num_rows, rows, one_token,
                          config, config2, split_k, settings)


@functools.lru_cache(maxsize=1024)
def _gemv_schedule(device: torch.device, E: int, H: int, F: int, group13: int, group2: int, touched_bytes: int,
                   num_rows: int, rows: int, one_token: bool, config: GemvConfig | None, config2: GemvConfig | None,
                   split_k: int, settings: tuple) -> GemvSchedule:
    sms = num_sms(device)

    def resolved(fused: bool) -> tuple[GemvConfig, GemvConfig, int, int]:
        d1, d2 = default_configs(device, num_rows / E, fused)
        c1, c2 = config or d1, config2 or (config if config is not None else d2)
        if split_k:
            c1, c2 = replace(c1, split_k=split_k), replace(c2, split_k=split_k)
        return _plan_splits(E, H, F, group13, group2, num_rows, rows, c1, c2, sms, fused)

    config1, config2, split1, split2 = blocks = resolved(False)
    fused = fuse_gemms(one_token, split2, touched_bytes)
    if fused:  # the fused launch's default blocks where none are given, and GEMM1 cut in more K slices
        blocks = resolved(True)
        fused = fusion_blocker(F, *blocks) is None
    if fused:
        config1, config2, split1, split2 = blocks
    sum_in_gemm2 = one_token and (num_rows > 1 or split2 > 1) and one_token_sum_in_gemm2()
    finish_in_gemm1 = split1 > 1 and finish_in_gemm()
    grid1 = gemv_grid(num_rows, E, rows, F, config1)  # the counters follow GEMM1's launch grid
    return GemvSchedule(
        config1, config2, split1, split2, fused, sum_in_gemm2, finish_in_gemm1,
        n_finish=math.prod(grid1[:2]) if finish_in_gemm1 else 0,
        n_sum=cdiv(H, config2.block_n) if sum_in_gemm2 else 0,
        n_fused=1 + grid1[0] * split2 if fused else 0)


@torch.no_grad()
def moe_forward_int4_gemv(x: torch.Tensor, weights, plan: RoutingPlan, *, config: GemvConfig | None = None,
                          config2: GemvConfig | None = None, rows: int | None = None,
                          split_k: int = 0) -> torch.Tensor:
    """y [T, H]: the INT4 MoE forward by GEMV kernels (module docstring); meant for T <= ~4.

    config  GEMM1's block sizes (default: default_configs' by T*k/E; under the interpreter one wide block)
    config2 GEMM2's (default: DEFAULT_GEMM2_CONFIG, or config when config is given)
    rows    rows of one expert per program (ROWS; default rows_per_block(T, top_k, E))
    split_k K slices for both GEMMs where set (overrides the configs' split_k; lowered until K allows it)
    Every kernel is launched with programmatic dependent launch where env.programmatic_launch_ok allows it.
    """
    check_int4_inputs(x, weights, plan)
    problem = gemv_unsupported(weights)
    if problem:
        raise ValueError(f"the INT4 GEMV path cannot run these weights: {problem}")
    return gemv_forward(x, weights, plan, config=config, config2=config2, rows=rows, split_k=split_k)


def gemv_forward(x: torch.Tensor, weights, plan: RoutingPlan, *, config: GemvConfig | None = None,
                 config2: GemvConfig | None = None, rows: int | None = None, split_k: int = 0) -> torch.Tensor:
    """moe_forward_int4_gemv without its input checks, for a caller that made them (check_int4_inputs, and
    gemv_unsupported answered None)."""
    T, H = x.shape
    F, k = weights.ffn_size, plan.top_k
    if T == 0:
        return x.new_zeros(0, H)
    rows = rows or rows_per_block(T, k, weights.num_experts)
    if rows < 1 or rows > MAX_ROWS_PER_BLOCK or rows & (rows - 1):
        raise ValueError(f"rows per block must be a power of two in 1..{MAX_ROWS_PER_BLOCK}, got {rows}")
    # One token with a row per program: its k slots are the rows, read from the router's top-k (no sorting)
    topk_rows = one_token_routing(plan) if rows == 1 else None
    s = gemv_schedule(weights, plan, rows, topk_rows is not None, x.device, config, config2, split_k)
    n_rows = plan.num_rows
    pdl = programmatic_launch_ok(x.device)  # per call: MOE_TUT_PDL may change between graph captures

    # Counters, zeroed by the prep kernel: GEMM1's finish, GEMM2's slot sum, and for the fused launch its ticket
    # queue and the ready count per (row block, GEMM2 K slice)
    n_counters = s.n_finish + s.n_sum + s.n_fused
    arrivals = torch.empty(n_counters, dtype=torch.int32, device=x.device) if n_counters else None
    if arrivals is not None:
        finish_counters, sum_counters = arrivals[:s.n_finish], arrivals[s.n_finish:s.n_finish + s.n_sum]
        fused_counters = arrivals[s.n_finish + s.n_sum:]

    xp, xw = prepare_activations(x, pdl=pdl, zero_arrivals=arrivals)
    act, act_w = _prepared_buffers(n_rows, F, x)
    part1 = _alloc_f32((s.split1, n_rows, 2 * F), x) if s.split1 > 1 else None
    y_direct = s.split2 == 1 and k == 1  # one slice, one slot per token: GEMM2 writes y
    part2 = _alloc((1, T, H), x) if y_direct else _alloc_f32((s.split2, n_rows, H), x)
    y = _alloc((T, H), x) if s.sum_in_gemm2 else None
    gemm1 = dict(rows=rows, config=s.config1, split_k=s.split1, gather_rows=True, swiglu=True, topk_rows=topk_rows)
    gemm2 = dict(rows=rows, config=s.config2, split_k=s.split2, weight_scatter=True, out=part2, topk_rows=topk_rows,
                 sum_into=(y, sum_counters) if s.sum_in_gemm2 else None)
    if s.split1 == 1:  # SwiGLU in GEMM1's epilogue
        gemm1.update(out=act, out_w=act_w)
    else:
        gemm1.update(out=part1, finish_into=(act, act_w, finish_counters) if s.finish_in_gemm1 else None)
    if s.fused:
        gemv_fused_gemms(xp, xw, act, act_w, weights, plan, gemm1, gemm2, fused_counters, pdl)
    else:
        gemv_grouped_gemm(xp, xw, weights.w13, plan, pdl=pdl, **gemm1)
        if s.split1 > 1 and not s.finish_in_gemm1:
            block = min(ELEMENTWISE_BLOCK, next_power_of_2(F))
            launch(_gemv_swiglu_finish_kernel, (n_rows, cdiv(F, block)),
                   (part1, act, act_w, F, part1.stride(0), part1.stride(1), act.stride(0), act_w.stride(0)),
                   dict(SPLIT_K=s.split1, BLOCK=block, **pdl_launch(pdl)))
        gemv_grouped_gemm(act, act_w, weights.w2, plan, pdl=pdl, **gemm2)
    if y_direct:
        return part2[0]
    return y if s.sum_in_gemm2 else sum_slots(part2, T, k, x, pdl=pdl)


def gemv_extra_bytes(T: int, top_k: int, H: int, F: int, split1: int = 1, split2: int = 1) -> int:
    """Temporaries of moe_forward_int4_gemv (float32): x' and its word sums, act' and its word sums,
    GEMM1's partial sums when split, GEMM2's partial sums. No weight is dequantised into memory."""
    rows = T * top_k
    n = T * H * 9 // 8 + rows * F * 9 // 8 + (split1 * rows * 2 * F if split1 > 1 else 0)
    n += 0 if split2 == 1 and top_k == 1 else split2 * rows * H
    return 4 * n
