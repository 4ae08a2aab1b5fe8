// moe_int4.cu: W4A16 grouped MoE expert kernels for the DECODE regime (a few tokens per expert).
//
// What it computes: one MoE layer's routed experts (SwiGLU, Hugging Face / vLLM layout),
//     y[t] = sum over t's top-k experts e, routing weight g:  g * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))
// with 4-bit weights in the format of moe_tut/quant.py (read its docstring; summary in moe_int4.h),
// bf16 activations and float32 accumulation. Three launches on one stream, no host sync, so the
// whole forward can be captured in a CUDA graph (on sm_90+ each launch may overlap the end of the one
// before it: "programmatic dependent launch" below):
//
//   1. gemm1_swiglu    act [T*k, F] bf16   act[r, n] = silu(W13[e, n] . x[tok[r]]) * (W13[e, F+n] . x[tok[r]])
//   2. gemm2_weighted  out [T*k, H] f32    out[slot[r], n] = g[r] * (W2[e, n] . act[r])  (v4/v5: per K split)
//   3. combine         y   [T, H]   bf16   y[t] = sum_j out[t*k + j]   (j = 0..k-1 in order)
//
// One token (T = 1, v2/v3) has a shorter road, moe_int4_forward_t1: two launches from the router's top-k with no
// RoutingPlan, GEMM1 over the k slots, then GEMM2 with the sum over k in shared memory (section "one token").
//
//   x [T, H] bf16; w13 [E, 2F, H] (gate rows 0..F-1, up rows F..2F-1) and w2 [E, H, F] as
//   packed [E, N, K/2] uint8 + scales [E, K/G, N] bf16 (+ zeros, same shape, asymmetric only);
//   rows r = 0..T*k-1 are token slots sorted by expert (RoutingPlan): expert e owns rows
//   [expert_offsets[e], expert_offsets[e+1]), tok[r] = sorted_token_ids[r], slot[r] = sorted_slots[r],
//   g[r] = sorted_weights[r] (float32).
//
// Why GEMM2 writes per-slot float32 rows and a third kernel sums over k, instead of atomicAdd into a
// float32 y: every element of `out` is written exactly once, so there is no memset to launch first
// and the sum over k runs in a fixed order, making y bitwise reproducible run to run (float atomics
// add in whatever order blocks finish). The price is T*k*H*4 bytes written and read once more:
// 229 KB at T = 1 on deepseek-v3 (k = 8, H = 7168), 0.1% of the 182 MB of weights it reads.
//
// Grid and threads of v1-v3 (each warp owns a few output columns; its 32 lanes split the reduction dim K):
//   v1: grid (ceil(N / 4), E), 128 threads; warp w of block b owns column n = 4b + w.
//   v2/v3: grid (ceil(N / (4 * cols)), min(E, T*k)), 128 threads; warp w owns `cols` consecutive
//       columns (GEMM1: 2 columns = 4 weight rows, gate and up; GEMM2: 4 columns = 4 weight rows).
//       Block y works for the y-th expert that has rows (found by a block-wide ballot over
//       expert_offsets), so a decode step with 8 active experts of 256 launches 8 block rows, not 256.
//   Row counts per expert live on the device, so each block loops over its expert's rows (1-16 in
//   decode) in passes of up to kMaxRows = 4; within a pass every weight byte is loaded once and used
//   for every row of the pass. The host picks the kernel instance by T (an expert gets at most T
//   rows): T = 1 runs a one-row-pass kernel with about half the registers, so more blocks fit per SM.
//
// Versions (each keeps running; pick one with the `version` argument; numbers: see the GPU check
// script scripts/gpu_cuda_int4_check.py, which times all three):
//   v1  simple: one warp per output column, lanes step through the packed row one byte (two codes)
//       at a time, each code dequantised by the spec's formula in float32 (dequant_one), and the
//       weights re-read for every token row (from L1/L2 after the first). Handles any even K and G.
//   v2  vectorised: 16-byte loads of packed weights (32 codes per lane per load; 4-byte loads when K
//       or G is not a multiple of 32), bf16x2 "magic number" dequant (two codes per LOP3 + HSUB2 +
//       HMUL2, see moe_int4_dequant.cuh), 4 weight rows per warp sharing each activation load, all
//       rows of a pass sharing each weight load, warp-shuffle (butterfly) reductions, and a grid over
//       active experts only.
//   v3  v2 + more bytes in flight: the next chunk's weights are loaded into registers while the
//       current one is computed (register double buffering), and weight loads bypass L1
//       (ld.global.nc.L1::no_allocate), which then holds only the activations every warp re-reads.
//   v4  tensor cores: mma.sync m16n8k16 with the dequantised weights as the A operand (16 output
//       columns) and up to 8 token rows per B tile, so a weight costs its dequant once however many
//       rows the expert has; the block's 4 warps split K and add their sums in shared memory, and
//       GEMM2 splits K over blocks as well when its blocks would not fill the GPU (section v4/v5).
//   v5  v4 + scales applied to each chunk's mma partial sums instead of to every weight (symmetric codes,
//       G % 128 == 0; otherwise v4's per-weight dequant).
//   v2/v3 need K and G multiples of 8 and 16-byte aligned activations; otherwise (toy shapes only:
//   every preset has K and G multiples of 128) the launcher runs v1 instead. v4/v5 need K % 128 == 0
//   and G % 32 == 0 and run v3's kernels otherwise. moe_int4_path() says which path a call takes.
//   v1-v3 do not split K: with 8-16 columns per block the presets give hundreds to thousands of
//   blocks already (mixtral GEMM2 at T = 1: 2 experts x 256).
//
// Numerics: every weight is exactly the bf16 value moe_tut.quant.dequantize gives (symmetric:
// (c - 8) * s rounded once; asymmetric: fma(c, s, z) in float32 then rounded), multiplied by the
// bf16 activation in float32 and accumulated in float32 (per-lane partial sums, then a butterfly).
// act is rounded to bf16 (the activation dtype); GEMM2's products stay float32 until y.
//
// Napkin math (decode is a weight-streaming problem): the bytes that must move are the touched
// experts' packed weights, 3*H*F/2 bytes plus 3*H*F*2/G of scales each (0.516 B per weight at
// G = 128). mixtral T = 1: 2 experts x 3 x 4096 x 14336 x 0.516 B = 182 MB, so 60 us at the
// ~3.0 TB/s an H100 copies at; deepseek-v3 T = 1 (8 of 256 experts): also 182 MB; qwen3-30b-a3b
// T = 1: 19.5 MB, 6.5 us, where launch latency is of the same size. The instruction budget at that
// bandwidth is ~5 per weight on an H100 SXM (132 SMs x 128 lanes x 1.98 GHz = 33 T lane-instructions/s
// over the 6.0-6.7 T weights/s that 3.0-3.35 TB/s carries): v2's
// symmetric path spends ~3 per weight on unpack + dequant + widening plus one FMA per token row,
// so it can stream at bandwidth for 1-2 rows per expert and becomes instruction-bound beyond that.
// v4 spends ~2 per weight (one 16-byte load per 32 codes, LOP3 + HSUB2 + HMUL2 per pair, one mma per
// 16x16 A fragment and n-tile, PRMTs for B) whatever the row count up to 8 per n-tile.
//
// Files: moe_int4.h (the C launcher API), moe_int4_dequant.cuh (the INT4 -> bf16 helpers),
// moe_int4_binding.cpp (PyTorch), and two host programs the CPU tests build: moe_int4_dequant_check.cu
// (helpers vs the Python spec, bit for bit) and moe_int4_host_emulation.cpp (these kernels on CPU fibers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <mutex>  // std::call_once

#include "moe_int4.h"
#include "moe_int4_dequant.cuh"

namespace moe_int4 {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kWarp = 32;
constexpr int kWarps = 4;  // warps per block
constexpr int kThreads = kWarps * kWarp;
// Token rows per pass in v2/v3. The accumulators (4 weight rows x kMaxRows) and the widened
// activations (kMaxRows x 8) live in registers, and a kernel's register count is that of its
// largest pass (ptxas, sm_90, symmetric v2: 78-80 registers with one-row passes only, 128-154 with
// passes of up to 4), so a larger kMaxRows would cost occupancy. An expert with more rows takes
// several passes; the later ones re-read the block's few weight rows, most likely from L2 (the
// block read them microseconds before), not DRAM.
constexpr int kMaxRows = 4;
constexpr int kWRows = 4;  // weight rows per warp in v2/v3

struct Quant {
  const uint8_t* packed;  // [E, N, K/2]
  const bf16* scales;     // [E, K/G, N]
  const bf16* zeros;      // [E, K/G, N], nullptr when symmetric
  int N, K, G;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// expf, not __expf: the epilogue runs once per output element, so accuracy costs nothing here.
__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// ------------------------------------------------------------------ programmatic dependent launch
//
// On sm_90+ the launchers may start a kernel before the previous one on the stream has finished
// (programmatic dependent launch, see `launch`): its blocks are scheduled as the previous kernel's
// blocks leave the SMs. Every kernel therefore calls wait_for_previous_kernel() before it reads
// anything an earlier kernel wrote; the call returns once that kernel has completed and its writes
// are visible (and at once when the launch was an ordinary one, or on older GPUs, where it compiles
// to nothing). GEMM2 finds its expert before the wait (the routing was written before GEMM1 started).
// release_next_kernel() lets the next kernel's blocks be scheduled once every block of this one has
// called it (or exited); the kernels call it right after their wait, never before (GEMM2's early
// part relies on GEMM1 having passed its own wait). So the gap between two launches, and the next
// kernel's block start-up, overlap the previous kernel's last blocks.
// Tried and dropped: GEMM2 prefetching its first 2-8 KB per weight row into L2 before the wait. It made
// every T = 1 forward 2-6 us slower on an H100, with or without the early start
// (results/h100/cuda_int4_pdl_v1).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void release_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------------ v1

// One packed row . one activation row, lanes striding over bytes; the caller's warp gets the sum.
__device__ float dot_row_v1(const uint8_t* wrow, const bf16* scol, const bf16* zcol, size_t group_stride,
                            int K, int G, const bf16* xrow, int lane) {
  float acc = 0.0f;
  for (int j = lane; j < K / 2; j += kWarp) {
    const size_t g = (2 * j) / G;  // both codes of a byte share a group (G is even)
    const float s = bf16_to_float(scol[g * group_stride]);
    const float z = zcol ? bf16_to_float(zcol[g * group_stride]) : -8.0f * s;  // -8 s is exact
    const uint32_t byte = wrow[j];
    acc = fmaf(dequant_one(byte & 0xFu, s, z), bf16_to_float(xrow[2 * j]), acc);
    acc = fmaf(dequant_one(byte >> 4, s, z), bf16_to_float(xrow[2 * j + 1]), acc);
  }
  return warp_sum(acc);
}

__global__ void __launch_bounds__(kThreads)
gemm1_swiglu_v1(const bf16* __restrict__ x, Quant w, const int32_t* __restrict__ token_ids,
                const int32_t* __restrict__ offsets, bf16* __restrict__ act, int F) {
  wait_for_previous_kernel();
  release_next_kernel();
  const int e = blockIdx.y;
  const int begin = offsets[e], end = offsets[e + 1];
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarps + threadIdx.x / kWarp;
  if (begin >= end || n >= F) return;  // empty expert or past the last column: the whole warp leaves
  const size_t N = w.N, half = w.K / 2, groups = w.K / w.G;
  const uint8_t* gate_row = w.packed + ((size_t)e * N + n) * half;
  const uint8_t* up_row = w.packed + ((size_t)e * N + F + n) * half;
  const bf16* s_e = w.scales + (size_t)e * groups * N;
  const bf16* z_e = w.zeros ? w.zeros + (size_t)e * groups * N : nullptr;
  for (int r = begin; r < end; ++r) {
    const bf16* xrow = x + (size_t)token_ids[r] * w.K;
    const float gate = dot_row_v1(gate_row, s_e + n, z_e ? z_e + n : nullptr, N, w.K, w.G, xrow, lane);
    const float up = dot_row_v1(up_row, s_e + F + n, z_e ? z_e + F + n : nullptr, N, w.K, w.G, xrow, lane);
    if (lane == 0) act[(size_t)r * F + n] = __float2bfloat16_rn(silu(gate) * up);
  }
}

__global__ void __launch_bounds__(kThreads)
gemm2_weighted_v1(const bf16* __restrict__ act, Quant w, const int32_t* __restrict__ slots,
                  const float* __restrict__ route_w, const int32_t* __restrict__ offsets, float* __restrict__ out) {
  wait_for_previous_kernel();
  release_next_kernel();
  const int e = blockIdx.y;
  const int begin = offsets[e], end = offsets[e + 1];
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarps + threadIdx.x / kWarp;
  const int H = w.N;
  if (begin >= end || n >= H) return;
  const size_t N = w.N, half = w.K / 2, groups = w.K / w.G;
  const uint8_t* wrow = w.packed + ((size_t)e * N + n) * half;
  const bf16* s_col = w.scales + (size_t)e * groups * N + n;
  const bf16* z_col = w.zeros ? w.zeros + (size_t)e * groups * N + n : nullptr;
  for (int r = begin; r < end; ++r) {
    const float v = dot_row_v1(wrow, s_col, z_col, N, w.K, w.G, act + (size_t)r * w.K, lane);
    if (lane == 0) out[(size_t)slots[r] * H + n] = route_w[r] * v;
  }
}

// --------------------------------------------------------------------------------------- v2/v3

// The y-th expert (in expert order) that owns at least one row, or -1 when fewer experts have rows.
// Block-wide: 128 experts per step, a ballot per warp, warp totals through shared memory. Every
// thread of the block must call it (it synchronises).
__device__ int nth_active_expert(const int32_t* __restrict__ offsets, int E, int y) {
  __shared__ int warp_counts[kWarps];
  __shared__ int found;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (threadIdx.x == 0) found = -1;
  __syncthreads();
  int before = 0;  // active experts in earlier steps
  for (int base = 0; base < E; base += kThreads) {
    const int e = base + threadIdx.x;
    const bool active = e < E && offsets[e + 1] > offsets[e];
    const uint32_t ballot = __ballot_sync(0xffffffffu, active);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int rank = before + __popc(ballot & ((1u << lane) - 1u));  // active experts before e
    int total = 0;
    for (int i = 0; i < kWarps; ++i) {
      if (i < warp) rank += warp_counts[i];
      total += warp_counts[i];
    }
    if (active && rank == y) found = e;
    before += total;
    __syncthreads();  // `found` is visible to all, and warp_counts may be overwritten
    if (found >= 0 || before > y) break;  // the same values for every thread: a uniform exit
  }
  return found;
}

// 16- or 4-byte weight loads, through the read-only path (v2) or bypassing L1 (v3).
template <int VEC, bool STREAM>
__device__ __forceinline__ void load_weights(uint32_t (&dst)[VEC / 4], const uint8_t* p) {
  if constexpr (VEC == 16) {
    uint4 v;
#ifdef __CUDA_ARCH__
    if constexpr (STREAM) {
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    } else {
      v = __ldg(reinterpret_cast<const uint4*>(p));
    }
#else  // the CPU emulation of the tests (moe_int4_host_emulation.cpp) has no PTX
    v = __ldg(reinterpret_cast<const uint4*>(p));
#endif
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
  } else {
    static_assert(VEC == 4, "weight loads are 16 or 4 bytes");
#ifdef __CUDA_ARCH__
    if constexpr (STREAM) {
      asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(dst[0]) : "l"(p));
    } else {
      dst[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    }
#else
    dst[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
#endif
  }
}

// Codes p and p + 4 of packed word u, dequantised, times activations k = p and p + 4 of the word's 8.
template <int P, bool SYM, int R>
__device__ __forceinline__ void fma_pair(uint32_t u, __nv_bfloat162 s2, float s, float z, const float (&xf)[R][8],
                                         float (&acc)[R]) {
  const uint32_t q = int4_pair_magic<P>(u);
  uint32_t d;
  if constexpr (SYM) {
    d = dequant_pair_sym(q, s2);
  } else {
    d = dequant_pair_asym(q, s, z);
  }
  const float w_lo = bf16x2_lo(d), w_hi = bf16x2_hi(d);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc[r] = fmaf(w_lo, xf[r][P], acc[r]);
    acc[r] = fmaf(w_hi, xf[r][P + 4], acc[r]);
  }
}

// acc[i][r] = this lane's part of (weight row i) . (activation row r) over K, for kWRows weight rows
// and R activation rows. Lane l takes chunks l, l + 32, ... of VEC bytes (2 * VEC codes, one group).
// The warp's weight rows are given as one expert's base pointers plus row indices (not 4 pointers
// each for codes, scales and zeros): 64-bit pointers cost two registers apiece, and registers bound
// occupancy here.
struct WarpRows {
  const uint8_t* packed;  // expert e's [N, K/2]
  const bf16* scales;     // expert e's [K/G, N]
  const bf16* zeros;      // expert e's [K/G, N] or nullptr
  int rows[kWRows];       // the warp's weight rows (output columns; GEMM1: gate and up rows)
};

template <int VEC, bool SYM, bool PREFETCH, int R>
__device__ __forceinline__ void dot_rows(const WarpRows& wr, int N, int K, int G, const bf16* (&xrow)[R],
                                         float (&acc)[kWRows][R], int lane) {
  const size_t half = K / 2;
  constexpr int kWords = VEC / 4;
  constexpr int kVals = 2 * VEC;  // codes per chunk
  const int nchunks = K / kVals;
#pragma unroll
  for (int i = 0; i < kWRows; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;

  uint32_t cur[kWRows][kWords];
  if constexpr (PREFETCH) {
    if (lane < nchunks) {
#pragma unroll
      for (int i = 0; i < kWRows; ++i) load_weights<VEC, true>(cur[i], wr.packed + wr.rows[i] * half + lane * VEC);
    }
  }
  // The chunk's group g = c * kVals / G, kept incrementally: computed in the loop, the runtime integer division
  // (IMAD.HI plus sign and range fix-ups on sm_90, ~12 SASS instructions of the 599 per chunk) sat in front of
  // the chunk's scale-load addresses. G is a multiple of kVals, so a chunk never straddles two groups and g
  // steps by whole groups plus a carry.
  constexpr int kStepVals = kWarp * kVals;  // codes between one lane's consecutive chunks
  const int g_step = kStepVals / G, r_step = kStepVals % G;
  int g = lane * kVals / G, r = lane * kVals - g * G;
  for (int c = lane; c < nchunks; c += kWarp) {
    uint32_t nxt[kWRows][kWords];
    if constexpr (PREFETCH) {
      if (c + kWarp < nchunks) {
#pragma unroll
        for (int i = 0; i < kWRows; ++i)
          load_weights<VEC, true>(nxt[i], wr.packed + wr.rows[i] * half + (c + kWarp) * VEC);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kWRows; ++i) load_weights<VEC, false>(cur[i], wr.packed + wr.rows[i] * half + c * VEC);
    }
    const size_t g_row = (size_t)g * N;
    __nv_bfloat162 s2[kWRows];
    float sf[kWRows], zf[kWRows];
#pragma unroll
    for (int i = 0; i < kWRows; ++i) {
      const bf16 s = wr.scales[g_row + wr.rows[i]];
      s2[i] = __bfloat162bfloat162(s);
      sf[i] = SYM ? 0.0f : bf16_to_float(s);
      zf[i] = SYM ? 0.0f : bf16_to_float(wr.zeros[g_row + wr.rows[i]]);
    }
#pragma unroll
    for (int wd = 0; wd < kWords; ++wd) {
      const int k0 = c * kVals + 8 * wd;
      float xf[R][8];  // activations k0..k0+7 of each row, widened once and shared by kWRows weight rows
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(xrow[r] + k0));
        xf[r][0] = bf16x2_lo(xv.x);
        xf[r][1] = bf16x2_hi(xv.x);
        xf[r][2] = bf16x2_lo(xv.y);
        xf[r][3] = bf16x2_hi(xv.y);
        xf[r][4] = bf16x2_lo(xv.z);
        xf[r][5] = bf16x2_hi(xv.z);
        xf[r][6] = bf16x2_lo(xv.w);
        xf[r][7] = bf16x2_hi(xv.w);
      }
#pragma unroll
      for (int i = 0; i < kWRows; ++i) {
        const uint32_t u = cur[i][wd];
        fma_pair<0, SYM, R>(u, s2[i], sf[i], zf[i], xf, acc[i]);
        fma_pair<1, SYM, R>(u, s2[i], sf[i], zf[i], xf, acc[i]);
        fma_pair<2, SYM, R>(u, s2[i], sf[i], zf[i], xf, acc[i]);
        fma_pair<3, SYM, R>(u, s2[i], sf[i], zf[i], xf, acc[i]);
      }
    }
    if constexpr (PREFETCH) {
      if (c + kWarp < nchunks) {
#pragma unroll
        for (int i = 0; i < kWRows; ++i)
#pragma unroll
          for (int wd = 0; wd < kWords; ++wd) cur[i][wd] = nxt[i][wd];
      }
    }
    g += g_step;
    r += r_step;
    if (r >= G) {
      r -= G;
      ++g;
    }
  }
#pragma unroll
  for (int i = 0; i < kWRows; ++i)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[i][r] = warp_sum(acc[i][r]);
}

__device__ __forceinline__ WarpRows warp_rows(const Quant& w, int e, const int (&rows)[kWRows]) {
  const size_t N = w.N, groups = w.K / w.G;
  WarpRows out;
  out.packed = w.packed + (size_t)e * N * (w.K / 2);
  out.scales = w.scales + (size_t)e * groups * N;
  out.zeros = w.zeros ? w.zeros + (size_t)e * groups * N : nullptr;
#pragma unroll
  for (int i = 0; i < kWRows; ++i) out.rows[i] = rows[i];
  return out;
}

// Passes over rows [begin, end) of R = min(MAXR, rows left) rows each, calling pass(Rows<R>{}, rb).
// Only R <= MAXR are compiled: the launcher picks MAXR = min(T, kMaxRows), because an expert gets at
// most T rows when a token's k experts are distinct (top-k), so a T = 1 launch carries only the
// one-row code and its small register count (more blocks per SM). Repeated experts in a token's
// top-k are still computed correctly, in more passes.
template <int N>
struct Rows {
  static constexpr int value = N;
};

template <int MAXR, class Pass>
__device__ __forceinline__ void for_each_pass(int begin, int end, const Pass& pass) {
  static_assert(MAXR >= 1 && MAXR <= 4, "passes of 1..4 rows are written out below");
  for (int rb = begin; rb < end; rb += MAXR) {
    const int nr = min(MAXR, end - rb);
    if constexpr (MAXR >= 4) {
      if (nr == 4) { pass(Rows<4>{}, rb); continue; }
    }
    if constexpr (MAXR >= 3) {
      if (nr == 3) { pass(Rows<3>{}, rb); continue; }
    }
    if constexpr (MAXR >= 2) {
      if (nr == 2) { pass(Rows<2>{}, rb); continue; }
    }
    pass(Rows<1>{}, rb);
  }
}

template <int VEC, bool SYM, bool PREFETCH, int MAXR>
__global__ void __launch_bounds__(kThreads)
gemm1_swiglu_v2(const bf16* __restrict__ x, Quant w, const int32_t* __restrict__ token_ids,
                const int32_t* __restrict__ offsets, bf16* __restrict__ act, int E, int F) {
  wait_for_previous_kernel();
  release_next_kernel();
  const int e = nth_active_expert(offsets, E, blockIdx.y);
  if (e < 0) return;
  const int lane = threadIdx.x % kWarp;
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / kWarp) * 2;  // this warp's columns: n0, n0 + 1
  if (n0 >= F) return;
  const bool two = n0 + 1 < F;
  const int n1 = two ? n0 + 1 : n0;  // a missing second column re-reads the first; its result is dropped
  const int rows[kWRows] = {n0, n1, F + n0, F + n1};  // gate n0, gate n1, up n0, up n1
  const WarpRows wr = warp_rows(w, e, rows);
  for_each_pass<MAXR>(offsets[e], offsets[e + 1], [&](auto rows_tag, int rb) {
    constexpr int R = decltype(rows_tag)::value;
    const bf16* xrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) xrow[r] = x + (size_t)token_ids[rb + r] * w.K;
    float acc[kWRows][R];
    dot_rows<VEC, SYM, PREFETCH, R>(wr, w.N, w.K, w.G, xrow, acc, lane);
    // lane 2r + j writes act[rb + r, n0 + j]
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        if (lane == 2 * r + j && (j == 0 || two))
          act[(size_t)(rb + r) * F + n0 + j] = __float2bfloat16_rn(silu(acc[j][r]) * acc[2 + j][r]);
  });
}

template <int VEC, bool SYM, bool PREFETCH, int MAXR>
__global__ void __launch_bounds__(kThreads)
gemm2_weighted_v2(const bf16* __restrict__ act, Quant w, const int32_t* __restrict__ slots,
                  const float* __restrict__ route_w, const int32_t* __restrict__ offsets, float* __restrict__ out,
                  int E) {
  // Before the wait only the routing (written before GEMM1 started) is read.
  const int e = nth_active_expert(offsets, E, blockIdx.y);
  if (e < 0) return;
  const int lane = threadIdx.x % kWarp;
  const int H = w.N;
  wait_for_previous_kernel();
  release_next_kernel();
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / kWarp) * kWRows;  // columns n0..n0+3
  if (n0 >= H) return;
  int rows[kWRows];
#pragma unroll
  for (int i = 0; i < kWRows; ++i) rows[i] = min(n0 + i, H - 1);  // past the end: re-read, result dropped
  const WarpRows wr = warp_rows(w, e, rows);
  for_each_pass<MAXR>(offsets[e], offsets[e + 1], [&](auto rows_tag, int rb) {
    constexpr int R = decltype(rows_tag)::value;
    const bf16* xrow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) xrow[r] = act + (size_t)(rb + r) * w.K;
    float acc[kWRows][R];
    dot_rows<VEC, SYM, PREFETCH, R>(wr, w.N, w.K, w.G, xrow, acc, lane);
    // lane 4r + i writes out[slot of row rb + r, n0 + i]: at most 16 lanes, one store each
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int i = 0; i < kWRows; ++i)
        if (lane == kWRows * r + i && n0 + i < H)
          out[(size_t)slots[rb + r] * H + n0 + i] = route_w[rb + r] * acc[i][r];
  });
}

// ------------------------------------------------------------------------- one token (T = 1), v2/v3
//
// A decode step of one token needs no RoutingPlan: its k slots are the rows, and slot j's expert and routing
// weight are topk_ids[0, j] and topk_weights[0, j]. These kernels read the router's tensors directly, so the
// sorting kernels need not run at all (RoutingPlan.build(defer=True) then launches nothing), and each block
// finds its expert with one load instead of nth_active_expert's block-wide scan over E:
//   gemm1_swiglu_t1     act [k, F] bf16   row j = slot j, the v2/v3 GEMM1 (same dot_rows, same bits)
//   gemm2_combine_t1    y   [1, H] bf16   y[n] = sum over j in order of g_j * (W2[e_j, n] . act[j])
// GEMM2 computes every slot of its columns in one block (slot j's dot product by one warp, the block's
// columns by all slots), leaves them in shared memory and sums them there in slot order, exactly as
// combine_kernel does: so y has the same bits as the three-launch forward, without `out` or a third launch.

constexpr int kT1MaxTopK = MOE_INT4_T1_MAX_TOP_K;
constexpr int kT1MaxWarps = 8;

// The router's top-k for one token, as the caller has them: ids int32 or int64, weights float32, bf16 or fp16,
// any element stride.
struct TopK {
  const void* ids;
  const void* weights;
  long long ids_stride, weights_stride;
  int k, id_bytes, weight_type;  // weight_type: MOE_INT4_F32, MOE_INT4_BF16, MOE_INT4_F16

  // Slot j's expert, or -1 for an id outside [0, E) (that slot then adds nothing).
  __device__ __forceinline__ int expert(int j, int E) const {
    const long long e = id_bytes == 8 ? static_cast<const int64_t*>(ids)[j * ids_stride]
                                      : static_cast<const int32_t*>(ids)[j * ids_stride];
    return e >= 0 && e < E ? static_cast<int>(e) : -1;
  }
  // Slot j's routing weight in float32 (exact for all three types, as RoutingPlan's .to(float32)).
  __device__ __forceinline__ float weight(int j) const {
    if (weight_type == MOE_INT4_BF16) return bf16_to_float(static_cast<const bf16*>(weights)[j * weights_stride]);
    if (weight_type == MOE_INT4_F16) return __half2float(static_cast<const __half*>(weights)[j * weights_stride]);
    return static_cast<const float*>(weights)[j * weights_stride];
  }
};

// Grid (ceil(F / 8), k), kThreads: block (b, j) computes columns 8b..8b+7 of slot j, as gemm1_swiglu_v2 does
// for a one-row expert.
template <bool SYM, bool PREFETCH>
__global__ void __launch_bounds__(kThreads)
gemm1_swiglu_t1(const bf16* __restrict__ x, Quant w, TopK topk, bf16* __restrict__ act, int E, int F) {
  wait_for_previous_kernel();
  release_next_kernel();
  const int j = blockIdx.y;
  const int e = topk.expert(j, E);
  if (e < 0) return;  // GEMM2 skips this slot too
  const int lane = threadIdx.x % kWarp;
  const int n0 = (blockIdx.x * kWarps + threadIdx.x / kWarp) * 2;
  if (n0 >= F) return;
  const bool two = n0 + 1 < F;
  const int n1 = two ? n0 + 1 : n0;
  const int rows[kWRows] = {n0, n1, F + n0, F + n1};
  const WarpRows wr = warp_rows(w, e, rows);
  const bf16* xrow[1] = {x};
  float acc[kWRows][1];
  dot_rows<16, SYM, PREFETCH, 1>(wr, w.N, w.K, w.G, xrow, acc, lane);
  if (lane < 2 && (lane == 0 || two))
    act[(size_t)j * F + n0 + lane] = __float2bfloat16_rn(silu(acc[lane][0]) * acc[2 + lane][0]);
}

// Column groups of kWRows columns per block: with few slots a block takes several groups, so that it still
// has about kWarps units (slot, group) of one warp each. t1_units(k) = k * t1_groups(k) units per block.
__host__ __device__ __forceinline__ int t1_groups(int k) { return k >= kWarps ? 1 : kWarps / k; }

// Grid ceil(H / (kWRows * groups)), 32 * min(units, kT1MaxWarps) threads; warp w takes units w, w + warps, ...
// Unit u is slot j = u / groups and column group u % groups.
template <bool SYM, bool PREFETCH>
__global__ void __launch_bounds__(kT1MaxWarps * kWarp)
gemm2_combine_t1(const bf16* __restrict__ act, Quant w, TopK topk, bf16* __restrict__ y, int E) {
  __shared__ float slot_cols[kT1MaxTopK][kWarps * kWRows];  // g_j * dot for slot j, the block's columns
  const int k = topk.k, groups = t1_groups(k), units = k * groups, H = w.N;
  const int warps = blockDim.x / kWarp, warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int col0 = blockIdx.x * groups * kWRows;  // the block's first column
  // Before the wait only the routing is read (the caller's top-k, written before GEMM1 started): the expert of
  // the warp's first unit.
  const int first_e = warp < units ? topk.expert(warp / groups, E) : -1;
  wait_for_previous_kernel();
  release_next_kernel();
  for (int u = warp; u < units; u += warps) {
    const int j = u / groups, c = (u % groups) * kWRows;  // slot, the group's first column in the block
    const int e = u == warp ? first_e : topk.expert(j, E);
    float v = 0.0f;  // lane i < kWRows: this unit's value for column col0 + c + i
    if (e >= 0 && col0 + c < H) {
      int rows[kWRows];
#pragma unroll
      for (int i = 0; i < kWRows; ++i) rows[i] = min(col0 + c + i, H - 1);  // past the end: result dropped
      const WarpRows wr = warp_rows(w, e, rows);
      const bf16* xrow[1] = {act + (size_t)j * w.K};
      float acc[kWRows][1];
      dot_rows<16, SYM, PREFETCH, 1>(wr, w.N, w.K, w.G, xrow, acc, lane);
      const float g = topk.weight(j);
#pragma unroll
      for (int i = 0; i < kWRows; ++i)
        if (lane == i) v = g * acc[i][0];
    }
    if (lane < kWRows) slot_cols[j][c + lane] = v;
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < groups * kWRows && col0 + t < H) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += slot_cols[j][t];
    y[col0 + t] = __float2bfloat16_rn(sum);
  }
}

// ------------------------------------------------------------------------------------------ v4/v5
//
// Tensor cores: mma.sync.m16n8k16 (bf16 in, float32 accumulate) with the WEIGHTS as the A operand
// (16 output columns = the mma's M) and the token rows as B (8 rows = the mma's N), i.e. out^T = W act^T.
// Decode has 1-16 rows per expert; as B they waste at most 7 of 8 columns of an mma, while the
// weights, the operand that has to stream, are dequantised straight into A's registers, once for
// all rows. This is what lifts v2's one-FMA-per-weight-per-row limit.
//
// Where each lane's weights come from. A lane (g = lane / 4, t = lane % 4) holds A rows g and g + 8
// at k-slots {2t, 2t+1, 2t+8, 2t+9}, and B column g at the same k-slots. The dot product does not
// care which real k a slot stands for, as long as A and B agree, and both sides of a slot belong to
// lanes with the same t. So lane t takes real k = 32t..32t+31 of each 128-wide K chunk: ONE 16-byte
// load per weight row (32 codes) feeds 8 mmas, and the 4 lanes of a row read its 64 contiguous
// bytes. A packed word's pair p (codes p and p + 4, see moe_int4_dequant.cuh) fills slots (2t, 2t+1)
// or (2t+8, 2t+9) as it is; B's matching pair (x[k0 + p], x[k0 + p + 4]) is two 16-bit halves moved
// from the lane's 16-byte activation load (a PRMT).
//
// Block: 4 warps, 2 A tiles (GEMM1: the gate and the up rows of 16 output columns, so SwiGLU pairs
// line up element for element in the accumulators; GEMM2: 32 output columns), one expert (grid.y,
// active experts only as in v2). The warps split K: warp w takes chunks w, w + 4, ...; their
// float32 accumulators are added in shared memory in a fixed order. GEMM2 also splits K over
// grid.z (splits, moe_int4_gemm2_splits) when its blocks would not fill the GPU (mixtral: H / 32 = 128
// column tiles x 2 experts at T = 1); each split writes its own float32 `out` slice, and combine adds
// the slices with the top-k rows in a fixed order, so results stay bitwise reproducible.
// Rows: passes of up to 8 * NT rows (NT = 1, 2 or 4 n-tiles by the mean rows per touched expert, mma_n_tiles);
// n-tiles past the expert's rows are skipped (a warp-uniform test), so a 1-row expert costs one mma per A
// fragment.
// v5 = v4 + group-wise scaling after the mma (kSymPost below) where the codes are symmetric and G % 128
// == 0: fewer instructions per weight.
// Needs K % 128 == 0, G % 32 == 0 (a lane's 32 codes in one group) and 16-byte aligned packed rows
// and activations; otherwise the launcher runs v3's kernels (moe_int4_path says which).

constexpr int kChunk = 128;    // K values per chunk: 4 lanes x 32 codes
constexpr int kChunkBytes = kChunk / 2;
constexpr int kTileRows = 16;  // output columns per A tile (mma M)
constexpr int kTiles = 2;      // A tiles per block
constexpr int kMaxSplits = 8;  // GEMM2's K splits over grid.z

// d += a * b for one m16n8k16 tile (row-major A, column-major B, PTX fragment layout).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(MOE_INT4_HOST_EMULATION)
  emulated_mma_bf16_16816(d, a, b0, b1);  // the warp's fragments exchanged on the CPU
#endif
}

// This lane's weight rows (tile i, half h: A row g + 8h) of one expert, and their dequant parameters
// for the chunk in flight.
struct MmaWeights {
  const uint8_t* packed;  // expert e's [N, K/2]
  const bf16* scales;     // expert e's [K/G, N]
  const bf16* zeros;      // expert e's [K/G, N] or nullptr
  int row[kTiles][2];
};

// How a v4/v5 kernel turns codes into the A operand:
//   kAsym      bf16(fma(c, s, z)) per value (the spec's arithmetic, as v2)
//   kSym       bf16((c - 8) * s) per value (exactly dequantize's weights, as v2)
//   kSymPost   v5: the mma multiplies the exact integers c - 8, and each 16x8 partial sum of a chunk is
//              scaled by its row's s afterwards (4 FMAs per lane per A tile and n-tile, instead of an HMUL2
//              per weight pair). Needs the whole 128-wide chunk in one group (G % 128 == 0): the mma adds
//              the 4 lanes' k ranges together. Numerics: sum (c - 8) x in float32, then * s, instead of
//              bf16((c - 8) s) x: the weights are not rounded to bf16 first (closer to the real product).
enum DequantMode { kAsym = 0, kSym = 1, kSymPost = 2 };

template <int MODE>
struct ChunkRegs {
  uint32_t q[kTiles][2][4];  // 16 packed bytes per row
  __nv_bfloat162 s2[kTiles][2];  // kSym
  float s[kTiles][2], z[kTiles][2];  // kAsym (s, z), kSymPost (s)
};

// g: the group of this lane's first code of chunk c, c * kChunk + 32 t (the caller keeps it without a division).
template <int MODE>
__device__ __forceinline__ void load_chunk(ChunkRegs<MODE>& r, const MmaWeights& w, int N, int K, int g, int c,
                                           int t) {
  const size_t half = K / 2;
  const size_t g_row = (size_t)g * N;
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      load_weights<16, true>(r.q[i][h], w.packed + w.row[i][h] * half + (size_t)c * kChunkBytes + 16 * t);
      const bf16 s = w.scales[g_row + w.row[i][h]];
      if constexpr (MODE == kSym) {
        r.s2[i][h] = __bfloat162bfloat162(s);
      } else {
        r.s[i][h] = bf16_to_float(s);
        if constexpr (MODE == kAsym) r.z[i][h] = bf16_to_float(w.zeros[g_row + w.row[i][h]]);
      }
    }
}

template <int P, int MODE>
__device__ __forceinline__ uint32_t dequant_word_pair(uint32_t u, const ChunkRegs<MODE>& r, int i, int h) {
  const uint32_t q = int4_pair_magic<P>(u);
  if constexpr (MODE == kSym) {
    return dequant_pair_sym(q, r.s2[i][h]);
  } else if constexpr (MODE == kSymPost) {
    return centred_pair_sym(q);
  } else {
    return dequant_pair_asym(q, r.s[i][h], r.z[i][h]);
  }
}

// The mmas of word wd's pairs 2Q (slots 2t, 2t+1) and 2Q + 1 (slots 2t+8, 2t+9), for every tile and n-tile.
template <int Q, int MODE, int NT>
__device__ __forceinline__ void mma_word(const ChunkRegs<MODE>& r, int wd, const uint32_t (&bp)[NT][4], int n_tiles,
                                         float (&acc)[kTiles][NT][4]) {
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    const uint32_t a[4] = {dequant_word_pair<2 * Q, MODE>(r.q[i][0][wd], r, i, 0),
                           dequant_word_pair<2 * Q, MODE>(r.q[i][1][wd], r, i, 1),
                           dequant_word_pair<2 * Q + 1, MODE>(r.q[i][0][wd], r, i, 0),
                           dequant_word_pair<2 * Q + 1, MODE>(r.q[i][1][wd], r, i, 1)};
#pragma unroll
    for (int j = 0; j < NT; ++j)
      if (j < n_tiles) mma_bf16_16816(acc[i][j], a, bp[j][2 * Q], bp[j][2 * Q + 1]);
  }
}

// acc += this chunk's products (kSymPost: each chunk's partial sums scaled by their rows' scales).
template <int MODE, int NT>
__device__ __forceinline__ void mma_chunk(const ChunkRegs<MODE>& r, int c, int t, const bf16* const (&brow)[NT],
                                          int n_tiles, float (&acc)[kTiles][NT][4]) {
  const int k0 = c * kChunk + 32 * t;
  float part[kTiles][NT][4];
  float (&sum)[kTiles][NT][4] = MODE == kSymPost ? part : acc;
  if constexpr (MODE == kSymPost) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) part[i][j][v] = 0.0f;
  }
#pragma unroll
  for (int wd = 0; wd < 4; ++wd) {
    // B pairs (x[k + p], x[k + p + 4]), p = 0..3, of the 8 activations k = k0 + 8wd.. of each n-tile's row
    uint32_t bp[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint4 xv = make_uint4(0u, 0u, 0u, 0u);  // rows past the expert's: zero columns, dropped later
      if (j < n_tiles && brow[j] != nullptr) xv = __ldg(reinterpret_cast<const uint4*>(brow[j] + k0 + 8 * wd));
      bp[j][0] = (xv.x & 0xFFFFu) | (xv.z << 16);
      bp[j][1] = (xv.x >> 16) | (xv.z & 0xFFFF0000u);
      bp[j][2] = (xv.y & 0xFFFFu) | (xv.w << 16);
      bp[j][3] = (xv.y >> 16) | (xv.w & 0xFFFF0000u);
    }
    mma_word<0, MODE, NT>(r, wd, bp, n_tiles, sum);
    mma_word<1, MODE, NT>(r, wd, bp, n_tiles, sum);
  }
  if constexpr (MODE == kSymPost) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[i][j][v] = fmaf(r.s[i][v / 2], part[i][j][v], acc[i][j][v]);  // rows g, g+8
  }
}

// acc = this block's sum over chunks [c_begin, c_end) for n-tiles 0..n_tiles-1, complete in warp 0
// (the other warps' partial sums are added through shared memory; `red` must hold
// kWarps x kTiles * NT * 4 x kWarp floats). Every thread of the block must call it.
template <int MODE, int NT>
__device__ __forceinline__ void mma_block_sum(const MmaWeights& w, int N, int K, int G, int c_begin, int c_end,
                                              const bf16* const (&brow)[NT], int n_tiles, float* red,
                                              float (&acc)[kTiles][NT][4]) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, t = lane % 4;
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;
  // No register prefetch of the next chunk: tried (a v5 that loaded chunk c + 4 before computing c) and
  // it was 2-12% slower at every measured point on an H100 (more registers, fewer blocks per SM).
  // The lane's group, kept incrementally as in dot_rows (no integer division per chunk); G % 32 == 0, so a lane's
  // 32 codes lie in one group.
  constexpr int kStepVals = kWarps * kChunk;
  const int g_step = kStepVals / G, r_step = kStepVals % G;
  const int k_first = (c_begin + warp) * kChunk + 32 * t;
  int g = k_first / G, r = k_first - g * G;
  for (int c = c_begin + warp; c < c_end; c += kWarps) {
    ChunkRegs<MODE> cur;
    load_chunk<MODE>(cur, w, N, K, g, c, t);
    mma_chunk<MODE, NT>(cur, c, t, brow, n_tiles, acc);
    g += g_step;
    r += r_step;
    if (r >= G) {
      r -= G;
      ++g;
    }
  }
  constexpr int kVals = kTiles * NT * 4;
  if (warp > 0) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) red[((warp - 1) * kVals + (i * NT + j) * 4 + v) * kWarp + lane] = acc[i][j][v];
  }
  __syncthreads();
  if (warp == 0) {
    for (int ww = 0; ww < kWarps - 1; ++ww)
#pragma unroll
      for (int i = 0; i < kTiles; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[i][j][v] += red[(ww * kVals + (i * NT + j) * 4 + v) * kWarp + lane];
  }
  __syncthreads();  // `red` may be overwritten by the next pass
}

// Tile i's A rows are base[i] + g + 8h for this lane; rows past limit[i] (the last real row of the
// tile's output columns) re-read limit[i], and their results are dropped.
__device__ __forceinline__ MmaWeights mma_weights(const Quant& w, int e, const int (&base)[kTiles],
                                                  const int (&limit)[kTiles]) {
  const size_t N = w.N, groups = w.K / w.G;
  const int g = (threadIdx.x % kWarp) / 4;
  MmaWeights out;
  out.packed = w.packed + (size_t)e * N * (w.K / 2);
  out.scales = w.scales + (size_t)e * groups * N;
  out.zeros = w.zeros ? w.zeros + (size_t)e * groups * N : nullptr;
#pragma unroll
  for (int i = 0; i < kTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) out.row[i][h] = min(base[i] + g + 8 * h, limit[i]);
  return out;
}

// One pass's B rows: brow[j] = this lane's activation row for column g of n-tile j (row rb + 8j + g, read at
// src + gather[row] * K, or src + row * K without gather), nullptr past the expert's last row; returns the
// pass's n-tiles that have rows.
template <int NT>
__device__ __forceinline__ int pass_rows(const bf16* src, const int32_t* __restrict__ gather, int K, int rb, int end,
                                         const bf16* (&brow)[NT]) {
  const int g = (threadIdx.x % kWarp) / 4;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int r = rb + 8 * j + g;
    brow[j] = r < end ? src + (size_t)(gather ? gather[r] : r) * K : nullptr;
  }
  return min(NT, (end - rb + 7) / 8);
}

template <int MODE, int NT>
__global__ void __launch_bounds__(kThreads)
gemm1_swiglu_mma(const bf16* __restrict__ x, Quant w, const int32_t* __restrict__ token_ids,
                 const int32_t* __restrict__ offsets, bf16* __restrict__ act, int E, int F) {
  __shared__ float red[(kWarps - 1) * kTiles * NT * 4 * kWarp];
  wait_for_previous_kernel();
  release_next_kernel();
  const int e = nth_active_expert(offsets, E, blockIdx.y);
  if (e < 0) return;
  const int lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * kTileRows;  // output columns n0..n0+15: gate rows n0.., up rows F + n0..
  const int last = min(kTileRows, F - n0) - 1;  // the tile's last real column offset
  const int base[kTiles] = {n0, F + n0}, limit[kTiles] = {n0 + last, F + n0 + last};
  const MmaWeights mw = mma_weights(w, e, base, limit);
  const int begin = offsets[e], end = offsets[e + 1];
  for (int rb = begin; rb < end; rb += 8 * NT) {
    const bf16* brow[NT];
    const int n_tiles = pass_rows<NT>(x, token_ids, w.K, rb, end, brow);
    float acc[kTiles][NT][4];
    mma_block_sum<MODE, NT>(mw, w.N, w.K, w.G, 0, w.K / kChunk, brow, n_tiles, red, acc);
    if (threadIdx.x < kWarp) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int m = g + 8 * (v / 2), r = rb + 8 * j + 2 * t + (v % 2);  // C fragment: (row m, column r)
          if (j < n_tiles && r < end && m <= last)
            act[(size_t)r * F + n0 + m] = __float2bfloat16_rn(silu(acc[0][j][v]) * acc[1][j][v]);
        }
    }
  }
}

template <int MODE, int NT>
__global__ void __launch_bounds__(kThreads)
gemm2_weighted_mma(const bf16* __restrict__ act, Quant w, const int32_t* __restrict__ slots,
                   const float* __restrict__ route_w, const int32_t* __restrict__ offsets, float* __restrict__ out,
                   int E, int num_rows) {
  __shared__ float red[(kWarps - 1) * kTiles * NT * 4 * kWarp];
  const int e = nth_active_expert(offsets, E, blockIdx.y);
  if (e < 0) return;
  const int lane = threadIdx.x % kWarp, g = lane / 4, t = lane % 4;
  const int H = w.N;
  const int n0 = blockIdx.x * kTiles * kTileRows;  // output columns n0..n0+31
  const int base[kTiles] = {n0, n0 + kTileRows}, limit[kTiles] = {H - 1, H - 1};
  const MmaWeights mw = mma_weights(w, e, base, limit);
  const int nchunks = w.K / kChunk, per = (nchunks + gridDim.z - 1) / gridDim.z;
  const int c_begin = blockIdx.z * per, c_end = min(nchunks, c_begin + per);
  // Before the wait only the routing (written before GEMM1 started) is read.
  wait_for_previous_kernel();
  release_next_kernel();
  float* out_split = out + (size_t)blockIdx.z * num_rows * H;
  const int begin = offsets[e], end = offsets[e + 1];
  for (int rb = begin; rb < end; rb += 8 * NT) {
    const bf16* brow[NT];
    const int n_tiles = pass_rows<NT>(act, nullptr, w.K, rb, end, brow);
    float acc[kTiles][NT][4];
    mma_block_sum<MODE, NT>(mw, w.N, w.K, w.G, c_begin, c_end, brow, n_tiles, red, acc);
    if (threadIdx.x < kWarp) {
#pragma unroll
      for (int i = 0; i < kTiles; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const int n = n0 + kTileRows * i + g + 8 * (v / 2), r = rb + 8 * j + 2 * t + (v % 2);
            if (j < n_tiles && r < end && n < H) out_split[(size_t)slots[r] * H + n] = route_w[r] * acc[i][j][v];
          }
    }
  }
}

// ------------------------------------------------------------------------------------- combine

// y[t, h] = sum over token slots j of (sum over K splits s of out[s][t*k + j][h]), in float32 and that order,
// rounded once. TOP_K > 0: the k slots' loads are independent statements, all in flight before the first add;
// the generic form (TOP_K = 0, any k) loops over them. At T = 1 the whole kernel is this load latency: with a
// runtime k and split count the loads went out one after another (deepseek-v3, k = 8: 3.8-5.0 us of a ~95 us
// forward on an H100, results/h100/decode_breakdown_v1).
template <int TOP_K>
__global__ void combine_kernel(const float* __restrict__ out, bf16* __restrict__ y, int T, int top_k, int H,
                               int splits) {
  wait_for_previous_kernel();
  release_next_kernel();
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)T * H) return;
  const int k = TOP_K > 0 ? TOP_K : top_k;
  const size_t t = idx / H, h = idx % H, slice = (size_t)T * k * H;
  const float* src = out + t * k * H + h;
  float sum = 0.0f;
  if constexpr (TOP_K > 0) {
    float v[TOP_K];
#pragma unroll
    for (int j = 0; j < TOP_K; ++j) v[j] = src[(size_t)j * H];
    for (int s = 1; s < splits; ++s)
#pragma unroll
      for (int j = 0; j < TOP_K; ++j) v[j] += src[s * slice + (size_t)j * H];
#pragma unroll
    for (int j = 0; j < TOP_K; ++j) sum += v[j];
  } else {
    for (int j = 0; j < k; ++j) {
      float v = src[(size_t)j * H];
      for (int s = 1; s < splits; ++s) v += src[s * slice + (size_t)j * H];
      sum += v;
    }
  }
  y[idx] = __float2bfloat16_rn(sum);
}

// ------------------------------------------------------------------------------------ launchers

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Where a launch goes: the stream, and whether the kernel may start while the previous kernel on that
// stream finishes (programmatic dependent launch; see wait_for_previous_kernel).
struct Launch {
  cudaStream_t stream;
  bool programmatic;
  bool spread = false;  // with `programmatic`: see spread_smem_bytes
};

int g_programmatic_launch = 1;  // moe_int4_set_programmatic_launch

#ifndef MOE_INT4_HOST_EMULATION
// What the launchers ask about a device, queried once per device (the launchers run on every forward).
struct DeviceFacts {
  bool ok = false;  // every query succeeded
  int major = 0, sms = 0, smem_per_sm = 0, reserved_smem_per_block = 0, optin_smem_per_block = 0;
};

// The current device's facts, or nullptr where they cannot be had (a failed query is not the launch's error,
// so its error is cleared).
const DeviceFacts* current_device_facts() {
  constexpr int kMaxDevices = 64;
  static DeviceFacts facts[kMaxDevices];
  static std::once_flag asked[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return nullptr;
  }
  std::call_once(asked[dev], [dev] {
    DeviceFacts& f = facts[dev];
    f.ok = cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&f.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&f.reserved_smem_per_block, cudaDevAttrReservedSharedMemoryPerBlock, dev) ==
               cudaSuccess &&
           cudaDeviceGetAttribute(&f.optin_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) ==
               cudaSuccess;
    if (!f.ok) (void)cudaGetLastError();
  });
  return facts[dev].ok ? &facts[dev] : nullptr;
}
#endif

// Programmatic dependent launch is enabled and the current device is sm_90 or newer (older GPUs do not
// have it).
bool programmatic_launch_ok() {
#ifdef MOE_INT4_HOST_EMULATION
  return false;
#else
  if (!g_programmatic_launch) return false;
  const DeviceFacts* f = current_device_facts();
  return f != nullptr && f->major >= 9;
#endif
}

#ifndef MOE_INT4_HOST_EMULATION
// Dynamic shared memory that caps a kernel's resident blocks per SM at ceil(blocks / SMs), or 0 when the
// grid is larger than one wave (or needs no cap). Why: a kernel started early is placed on the SMs that the
// previous kernel frees first, each filled to its occupancy limit, so a grid that fits in one wave would
// run on a fraction of the GPU (mixtral's v2 GEMM2 at T = 1: 512 blocks on ~86 of 132 SMs at 6 per SM,
// 2-3 us slower than without the early start on an H100, results/h100/cuda_int4_pdl_v1). The memory is
// requested, never used.
template <class Kernel>
size_t spread_smem_bytes(Kernel kernel, dim3 grid, int threads) {
  const DeviceFacts* f = current_device_facts();
  int active = 0;
  cudaFuncAttributes attrs;
  if (f == nullptr || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&active, kernel, threads, 0) != cudaSuccess ||
      cudaFuncGetAttributes(&attrs, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // no cap is still a correct launch
    return 0;
  }
  const int sms = f->sms, smem_sm = f->smem_per_sm, reserved = f->reserved_smem_per_block;
  const long blocks = (long)grid.x * grid.y * grid.z;
  if (sms <= 0 || blocks >= (long)active * sms) return 0;
  const int cap = (int)((blocks + sms - 1) / sms);
  if (cap >= active) return 0;
  // cap + 1 blocks must not fit: each takes its static + dynamic memory plus the per-block reservation
  const long per_block = smem_sm / (cap + 1) + 1 - reserved - (long)attrs.sharedSizeBytes;
  if (per_block <= 0 || per_block > f->optin_smem_per_block ||
      (long)cap * (per_block + reserved + attrs.sharedSizeBytes) > smem_sm)
    return 0;
  if (per_block > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)per_block) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return (size_t)per_block;
}

// Every launch goes through here, so the CPU emulation used by the tests can run the same launchers
// with its own `launch` (one host thread per CUDA thread) instead of <<<>>>.
template <class... KernelArgs, class... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, Launch on, Args... args) {
  if (!on.programmatic) {
    kernel<<<grid, threads, 0, on.stream>>>(args...);
    return;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = on.spread ? spread_smem_bytes(kernel, grid, threads) : 0;
  config.stream = on.stream;
  config.attrs = attr;
  config.numAttrs = 1;
  (void)cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...);  // the error: cudaGetLastError
}
#endif

// v2/v3 launch: 16-byte loads get every variant; the 4-byte path exists only for toy shapes (K or G
// not a multiple of 32), so it is compiled once (no prefetch, passes of up to kMaxRows) to keep the
// build short, and v3 runs v2's kernel there.
template <bool SYM>
void launch_gemm1_v2(int load, bool prefetch, int max_rows, dim3 grid, Launch on, const bf16* x,
                     const Quant& w, const int32_t* ids, const int32_t* offs, bf16* act, int E, int F) {
  using Kernel = void (*)(const bf16*, Quant, const int32_t*, const int32_t*, bf16*, int, int);
  Kernel k;
  if (load == 4) {
    k = gemm1_swiglu_v2<4, SYM, false, kMaxRows>;
  } else if (prefetch) {
    k = max_rows == 1   ? gemm1_swiglu_v2<16, SYM, true, 1>
        : max_rows == 2 ? gemm1_swiglu_v2<16, SYM, true, 2>
                        : gemm1_swiglu_v2<16, SYM, true, kMaxRows>;
  } else {
    k = max_rows == 1   ? gemm1_swiglu_v2<16, SYM, false, 1>
        : max_rows == 2 ? gemm1_swiglu_v2<16, SYM, false, 2>
                        : gemm1_swiglu_v2<16, SYM, false, kMaxRows>;
  }
  launch(k, grid, kThreads, on, x, w, ids, offs, act, E, F);
}

template <bool SYM>
void launch_gemm2_v2(int load, bool prefetch, int max_rows, dim3 grid, Launch on, const bf16* act,
                     const Quant& w, const int32_t* slots, const float* rw, const int32_t* offs, float* out, int E) {
  using Kernel = void (*)(const bf16*, Quant, const int32_t*, const float*, const int32_t*, float*, int);
  Kernel k;
  if (load == 4) {
    k = gemm2_weighted_v2<4, SYM, false, kMaxRows>;
  } else if (prefetch) {
    k = max_rows == 1   ? gemm2_weighted_v2<16, SYM, true, 1>
        : max_rows == 2 ? gemm2_weighted_v2<16, SYM, true, 2>
                        : gemm2_weighted_v2<16, SYM, true, kMaxRows>;
  } else {
    k = max_rows == 1   ? gemm2_weighted_v2<16, SYM, false, 1>
        : max_rows == 2 ? gemm2_weighted_v2<16, SYM, false, 2>
                        : gemm2_weighted_v2<16, SYM, false, kMaxRows>;
  }
  launch(k, grid, kThreads, on, act, w, slots, rw, offs, out, E);
}

bool sizes_ok(int E, int H, int F, int num_rows, int num_tokens) {
  // grid.y is E (v1) or min(E, rows) (v2/v3), and CUDA caps grid.y at 65535.
  return E > 0 && E <= 65535 && H > 0 && F > 0 && F <= (1 << 29) && num_rows >= 0 && num_tokens >= 0;
}

int max_rows_per_pass(int num_tokens) { return num_tokens < kMaxRows ? (num_tokens < 1 ? 1 : num_tokens) : kMaxRows; }

// n-tiles of 8 rows per v4/v5 pass, from the mean rows per touched expert (and T, which bounds an expert's
// rows when a token's k experts are distinct). A kernel compiled for more n-tiles holds more accumulators
// (NT = 1: 96 registers, NT = 2: 102-128 for v5 on sm_90), so fewer blocks fit per SM; an expert with more
// rows than a pass takes several passes, re-reading its block's weights, most likely from L2.
int mma_n_tiles(int num_tokens, int num_rows, int E) {
  const int touched = num_rows < E ? num_rows : E;
  const int mean = touched > 0 ? (num_rows + touched - 1) / touched : 1;
  const int rows = mean < num_tokens ? mean : num_tokens;
  return rows <= 8 ? 1 : rows <= 16 ? 2 : 4;
}

// GEMM2 splits K over grid.z only at decode sizes (the float32 `out` grows by the split count) and only
// while the blocks would not fill the GPU: up to 4 blocks per SM, each split keeping >= 1 chunk per warp.
constexpr int kMaxSplitRows = 256;

// The dequant mode of a v4/v5 GEMM: v5's post-scaling where the chunk is one group and codes are symmetric.
int mma_mode(int version, bool symmetric, int G) {
  if (!symmetric) return kAsym;
  return version >= 5 && G % kChunk == 0 ? kSymPost : kSym;
}

template <int MODE>
void launch_gemm1_mma(int nt, dim3 grid, Launch on, const bf16* x, const Quant& w, const int32_t* ids,
                      const int32_t* offs, bf16* act, int E, int F) {
  using Kernel = void (*)(const bf16*, Quant, const int32_t*, const int32_t*, bf16*, int, int);
  const Kernel k = nt == 1   ? gemm1_swiglu_mma<MODE, 1>
                   : nt == 2 ? gemm1_swiglu_mma<MODE, 2>
                             : gemm1_swiglu_mma<MODE, 4>;
  launch(k, grid, kThreads, on, x, w, ids, offs, act, E, F);
}

template <int MODE>
void launch_gemm2_mma(int nt, dim3 grid, Launch on, const bf16* act, const Quant& w, const int32_t* slots,
                      const float* rw, const int32_t* offs, float* out, int E, int num_rows) {
  using Kernel = void (*)(const bf16*, Quant, const int32_t*, const float*, const int32_t*, float*, int, int);
  const Kernel k = nt == 1   ? gemm2_weighted_mma<MODE, 1>
                   : nt == 2 ? gemm2_weighted_mma<MODE, 2>
                             : gemm2_weighted_mma<MODE, 4>;
  launch(k, grid, kThreads, on, act, w, slots, rw, offs, out, E, num_rows);
}

}  // namespace
}  // namespace moe_int4

using namespace moe_int4;

extern "C" int moe_int4_path(int version, int K, int G, const void* packed, const void* activations) {
  if (version < 1 || version > MOE_INT4_LATEST_VERSION) return 0;
  if (K <= 0 || G <= 0 || K % 2 || G % 2 || K % G) return 0;
  if (version == 1) return 1;
  const uintptr_t p = reinterpret_cast<uintptr_t>(packed), a = reinterpret_cast<uintptr_t>(activations);
  // Activations are read 8 bf16 (16 bytes) at a time, so rows of K values must stay 16-byte aligned.
  if (a % 16 == 0 && K % 8 == 0) {
    // v4/v5: 128-code chunks, a lane's 32 codes within one group
    if (version >= 4 && K % kChunk == 0 && G % 32 == 0 && p % 16 == 0) return 64;
    if (K % 32 == 0 && G % 32 == 0 && p % 16 == 0) return 16;  // rows of K/2 bytes stay 16-byte aligned
    if (G % 8 == 0 && p % 4 == 0) return 4;
  }
  return 1;  // v2..v5 cannot vectorise this shape: run v1
}

extern "C" int moe_int4_gemm2_splits(int version, int E, int H, int F, int G2, int num_rows, int sm_count,
                                     const void* w2_packed, const void* act) {
  if (moe_int4_path(version, F, G2, w2_packed, act) != 64 || num_rows <= 0 || num_rows > kMaxSplitRows ||
      E <= 0 || H <= 0 || sm_count <= 0)
    return 1;
  const long blocks = (long)ceil_div(H, kTiles * kTileRows) * (num_rows < E ? num_rows : E);
  const int nchunks = F / kChunk;
  int splits = 1;
  while (splits < kMaxSplits && blocks * splits < 4L * sm_count && nchunks / (2 * splits) >= kWarps) splits *= 2;
  return splits;
}

extern "C" cudaError_t moe_int4_gemm1_swiglu(const void* x, const uint8_t* w13_packed, const void* w13_scales,
                                             const void* w13_zeros, const int32_t* sorted_token_ids,
                                             const int32_t* expert_offsets, void* act, int num_tokens, int num_rows,
                                             int E, int H, int F, int G13, int version, cudaStream_t stream) {
  if (!sizes_ok(E, H, F, num_rows, num_tokens)) return cudaErrorInvalidValue;
  const int load = moe_int4_path(version, H, G13, w13_packed, x);
  if (load == 0) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const Quant w{w13_packed, static_cast<const bf16*>(w13_scales), static_cast<const bf16*>(w13_zeros), 2 * F, H,
                G13};
  const Launch on{stream, programmatic_launch_ok()};  // safe after any kernel: GEMM1 waits before it reads
  const bf16* xb = static_cast<const bf16*>(x);
  bf16* actb = static_cast<bf16*>(act);
  if (load == 1) {
    const dim3 grid(ceil_div(F, kWarps), E);
    launch(gemm1_swiglu_v1, grid, kThreads, on, xb, w, sorted_token_ids, expert_offsets, actb, F);
  } else if (load == 64) {
    const dim3 grid(ceil_div(F, kTileRows), num_rows < E ? num_rows : E);
    const int nt = mma_n_tiles(num_tokens, num_rows, E);
    switch (mma_mode(version, w13_zeros == nullptr, G13)) {
      case kSymPost:
        launch_gemm1_mma<kSymPost>(nt, grid, on, xb, w, sorted_token_ids, expert_offsets, actb, E, F);
        break;
      case kSym:
        launch_gemm1_mma<kSym>(nt, grid, on, xb, w, sorted_token_ids, expert_offsets, actb, E, F);
        break;
      default:
        launch_gemm1_mma<kAsym>(nt, grid, on, xb, w, sorted_token_ids, expert_offsets, actb, E, F);
    }
  } else {
    const dim3 grid(ceil_div(F, kWarps * 2), num_rows < E ? num_rows : E);
    const bool prefetch = version >= 3;
    const int max_rows = max_rows_per_pass(num_tokens);
    if (w13_zeros == nullptr) {
      launch_gemm1_v2<true>(load, prefetch, max_rows, grid, on, xb, w, sorted_token_ids, expert_offsets, actb, E,
                            F);
    } else {
      launch_gemm1_v2<false>(load, prefetch, max_rows, grid, on, xb, w, sorted_token_ids, expert_offsets, actb, E,
                             F);
    }
  }
  return cudaGetLastError();
}

extern "C" cudaError_t moe_int4_gemm2_weighted(const void* act, const uint8_t* w2_packed, const void* w2_scales,
                                               const void* w2_zeros, const int32_t* sorted_slots,
                                               const float* sorted_weights, const int32_t* expert_offsets,
                                               float* out, int num_tokens, int num_rows, int E, int H, int F, int G2,
                                               int version, int splits, int after_gemm1, cudaStream_t stream) {
  if (!sizes_ok(E, H, F, num_rows, num_tokens)) return cudaErrorInvalidValue;
  const int load = moe_int4_path(version, F, G2, w2_packed, act);
  if (load == 0 || splits < 1 || splits > kMaxSplits || (splits > 1 && load != 64)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const Quant w{w2_packed, static_cast<const bf16*>(w2_scales), static_cast<const bf16*>(w2_zeros), H, F, G2};
  // GEMM2 reads the routing before its wait, which is safe only when the previous kernel is GEMM1 (it waited).
  const bool early = after_gemm1 != 0 && programmatic_launch_ok();
  const Launch on{stream, early, early};
  const bf16* actb = static_cast<const bf16*>(act);
  if (load == 1) {
    const dim3 grid(ceil_div(H, kWarps), E);
    launch(gemm2_weighted_v1, grid, kThreads, on, actb, w, sorted_slots, sorted_weights, expert_offsets, out);
  } else if (load == 64) {
    const dim3 grid(ceil_div(H, kTiles * kTileRows), num_rows < E ? num_rows : E, splits);
    const int nt = mma_n_tiles(num_tokens, num_rows, E);
    switch (mma_mode(version, w2_zeros == nullptr, G2)) {
      case kSymPost:
        launch_gemm2_mma<kSymPost>(nt, grid, on, actb, w, sorted_slots, sorted_weights, expert_offsets, out, E,
                                   num_rows);
        break;
      case kSym:
        launch_gemm2_mma<kSym>(nt, grid, on, actb, w, sorted_slots, sorted_weights, expert_offsets, out, E,
                               num_rows);
        break;
      default:
        launch_gemm2_mma<kAsym>(nt, grid, on, actb, w, sorted_slots, sorted_weights, expert_offsets, out, E,
                                num_rows);
    }
  } else {
    const dim3 grid(ceil_div(H, kWarps * kWRows), num_rows < E ? num_rows : E);
    const bool prefetch = version >= 3;
    const int max_rows = max_rows_per_pass(num_tokens);
    if (w2_zeros == nullptr) {
      launch_gemm2_v2<true>(load, prefetch, max_rows, grid, on, actb, w, sorted_slots, sorted_weights,
                            expert_offsets, out, E);
    } else {
      launch_gemm2_v2<false>(load, prefetch, max_rows, grid, on, actb, w, sorted_slots, sorted_weights,
                             expert_offsets, out, E);
    }
  }
  return cudaGetLastError();
}

extern "C" cudaError_t moe_int4_combine(const float* out, void* y, int T, int top_k, int H, int splits,
                                        cudaStream_t stream) {
  if (T < 0 || top_k <= 0 || H <= 0 || splits < 1 || splits > kMaxSplits) return cudaErrorInvalidValue;
  const size_t n = (size_t)T * H;
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const size_t blocks = (n + threads - 1) / threads;
  if (blocks > 0x7FFFFFFFu) return cudaErrorInvalidValue;
  const Launch on{stream, programmatic_launch_ok()};  // combine waits before it reads
  using Kernel = void (*)(const float*, bf16*, int, int, int, int);
  const Kernel k = top_k == 1   ? combine_kernel<1>
                   : top_k == 2 ? combine_kernel<2>
                   : top_k == 4 ? combine_kernel<4>
                   : top_k == 6 ? combine_kernel<6>
                   : top_k == 8 ? combine_kernel<8>
                                : combine_kernel<0>;  // the presets' k are 2 and 8; 1, 4, 6 are common too
  launch(k, (unsigned)blocks, threads, on, out, static_cast<bf16*>(y), T, top_k, H, splits);
  return cudaGetLastError();
}

extern "C" cudaError_t moe_int4_forward_t1(const void* x, const uint8_t* w13_packed, const void* w13_scales,
                                           const void* w13_zeros, int G13, const uint8_t* w2_packed,
                                           const void* w2_scales, const void* w2_zeros, int G2, const void* topk_ids,
                                           int id_bytes, long long ids_stride, const void* topk_weights,
                                           int weight_type, long long weights_stride, int top_k, void* act, void* y,
                                           int E, int H, int F, int version, cudaStream_t stream) {
  if (!sizes_ok(E, H, F, top_k, 1) || top_k < 1) return cudaErrorInvalidValue;
  if ((version != 2 && version != 3) || top_k > kT1MaxTopK || (id_bytes != 4 && id_bytes != 8) ||
      (weight_type != MOE_INT4_F32 && weight_type != MOE_INT4_BF16 && weight_type != MOE_INT4_F16) ||
      moe_int4_path(version, H, G13, w13_packed, x) != 16 || moe_int4_path(version, F, G2, w2_packed, act) != 16)
    return cudaErrorNotSupported;
  const TopK topk{topk_ids, topk_weights, ids_stride, weights_stride, top_k, id_bytes, weight_type};
  const Quant w13{w13_packed, static_cast<const bf16*>(w13_scales), static_cast<const bf16*>(w13_zeros), 2 * F, H,
                  G13};
  const Quant w2{w2_packed, static_cast<const bf16*>(w2_scales), static_cast<const bf16*>(w2_zeros), H, F, G2};
  const bool pdl = programmatic_launch_ok();
  const bool prefetch = version == 3, sym13 = w13_zeros == nullptr, sym2 = w2_zeros == nullptr;
  using G1 = void (*)(const bf16*, Quant, TopK, bf16*, int, int);
  const G1 g1 = sym13 ? (prefetch ? gemm1_swiglu_t1<true, true> : gemm1_swiglu_t1<true, false>)
                      : (prefetch ? gemm1_swiglu_t1<false, true> : gemm1_swiglu_t1<false, false>);
  launch(g1, dim3(ceil_div(F, kWarps * 2), top_k), kThreads, Launch{stream, pdl}, static_cast<const bf16*>(x), w13,
         topk, static_cast<bf16*>(act), E, F);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  using G2k = void (*)(const bf16*, Quant, TopK, bf16*, int);
  const G2k g2 = sym2 ? (prefetch ? gemm2_combine_t1<true, true> : gemm2_combine_t1<true, false>)
                      : (prefetch ? gemm2_combine_t1<false, true> : gemm2_combine_t1<false, false>);
  const int groups = t1_groups(top_k), units = top_k * groups;
  const int threads = kWarp * (units < kT1MaxWarps ? units : kT1MaxWarps);
  // GEMM2 follows GEMM1 here, so it may start early and read the routing before its wait (see gemm2_weighted).
  launch(g2, dim3(ceil_div(H, groups * kWRows)), threads, Launch{stream, pdl, pdl}, static_cast<const bf16*>(act), w2,
         topk, static_cast<bf16*>(y), E);
  return cudaGetLastError();
}

extern "C" void moe_int4_set_programmatic_launch(int enabled) { g_programmatic_launch = enabled != 0; }
