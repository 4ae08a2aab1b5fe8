// moe_int4.h: the plain C launcher API of the W4A16 grouped MoE kernels in moe_int4.cu.
//
// Everything is a raw device pointer plus sizes, so any host code (the PyTorch binding in
// moe_int4_binding.cpp, a C test, another framework) can call it; nothing here needs PyTorch.
// bf16 buffers are passed as void* (they hold __nv_bfloat16) so this header stays plain C.
// Every function only enqueues work on `stream` (no host sync) and returns the launch error.
//
// The INT4 format is the one moe_tut/quant.py specifies (a weight W [E, N, K], K = reduction dim):
//   packed [E, N, K/2]  uint8  byte j of row n holds k = 2j (low nibble) and k = 2j+1 (high nibble)
//   scales [E, K/G, N]  bf16
//   zeros  [E, K/G, N]  bf16, or NULL for symmetric (then zeros = -8 * scales)
//   W[e, n, k] = bf16(fma(c, scales[e, k/G, n], zeros[e, k/G, n]))  in float32, rounded once
// Routing (a moe_tut RoutingPlan): rows r = 0..T*k-1 are token slots sorted by expert; expert e
// owns rows [expert_offsets[e], expert_offsets[e+1]). All index arrays are int32.
#ifndef MOE_INT4_H
#define MOE_INT4_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Kernel versions (see the header of moe_int4.cu): 1 simple, 2 vectorised, 3 vectorised + prefetch,
// 4 tensor cores (mma.sync), 5 tensor cores + prefetch.
#define MOE_INT4_LATEST_VERSION 5
// GEMM2's most K splits (moe_int4_gemm2_splits), i.e. the most float32 `out` slices.
#define MOE_INT4_MAX_SPLITS 8

// GEMM1 + SwiGLU:  act[r, n] = bf16(silu(gate) * up), gate = W13[e, n, :] . x[tok[r], :],
// up = W13[e, F + n, :] . x[tok[r], :], for every row r of every expert e, n < F.
//   x [T, H] bf16; w13 [E, 2F, H] as packed/scales/zeros (K = H, group size G13);
//   sorted_token_ids [T*k]; expert_offsets [E+1]; act [T*k, F] bf16 (output, rows in sorted order).
cudaError_t moe_int4_gemm1_swiglu(const void* x, const uint8_t* w13_packed, const void* w13_scales,
                                  const void* w13_zeros, const int32_t* sorted_token_ids,
                                  const int32_t* expert_offsets, void* act, int num_tokens, int num_rows, int E,
                                  int H, int F, int G13, int version, cudaStream_t stream);

// GEMM2 + routing weight, scattered to slot order, in `splits` slices of K (1 unless the v4/v5 path runs):
//   out[s, sorted_slots[r], n] = sorted_weights[r] * (W2[e, n, K-slice s] . act[r, K-slice s])  (float32), n < H.
//   act [T*k, F] bf16; w2 [E, H, F] as packed/scales/zeros (K = F, group size G2);
//   sorted_slots [T*k]; sorted_weights [T*k] float32; out [splits, T*k, H] float32 (every element written).
//   after_gemm1 = 1 promises that the previous launch on `stream` was moe_int4_gemm1_swiglu with the same
//   routing arrays (as in a forward): GEMM2 may then start while GEMM1 finishes and find its expert before
//   it waits (see moe_int4_set_programmatic_launch). 0: GEMM2 starts after everything before it on the stream.
cudaError_t moe_int4_gemm2_weighted(const void* act, const uint8_t* w2_packed, const void* w2_scales,
                                    const void* w2_zeros, const int32_t* sorted_slots, const float* sorted_weights,
                                    const int32_t* expert_offsets, float* out, int num_tokens, int num_rows, int E,
                                    int H, int F, int G2, int version, int splits, int after_gemm1,
                                    cudaStream_t stream);

// The K splits GEMM2 should run with on a GPU of `sm_count` SMs (1..MOE_INT4_MAX_SPLITS; always 1 unless
// the call takes the v4/v5 path): more only where GEMM2's blocks would leave SMs idle at decode sizes.
int moe_int4_gemm2_splits(int version, int E, int H, int F, int G2, int num_rows, int sm_count,
                          const void* w2_packed, const void* act);

// Combine over k and the splits in a fixed order:
//   y[t, h] = bf16(sum_{j < k} sum_{s < splits} out[s, t*k + j, h]).  y [T, H] bf16.
cudaError_t moe_int4_combine(const float* out, void* y, int T, int top_k, int H, int splits, cudaStream_t stream);

// One token (T = 1) straight from the router's top-k, without a RoutingPlan (versions 2 and 3):
//   y [1, H] bf16 = bf16(sum_{j < k, in order} g_j * (W2[e_j] . act[j])),  act[j] = silu(W1[e_j] x) * (W3[e_j] x),
//   e_j = topk_ids[j * ids_stride] (int32 with id_bytes 4, int64 with 8), g_j = topk_weights[j * weights_stride]
//   (weight_type MOE_INT4_F32, _BF16 or _F16); a slot whose id is outside [0, E) adds nothing.
//   x [1, H] bf16; act [k, F] bf16 scratch (row j = slot j); y [1, H] bf16.
// Two launches (GEMM1, then GEMM2 with the sum over k), the same bits as moe_int4_gemm1_swiglu +
// moe_int4_gemm2_weighted + moe_int4_combine on the RoutingPlan of this routing. Returns cudaErrorNotSupported,
// having launched nothing, where it has no such path (another version, top_k > MOE_INT4_T1_MAX_TOP_K, another
// id or weight type, or shapes or alignments that take the 4-byte or v1 path): the caller runs the three.
#define MOE_INT4_F32 0
#define MOE_INT4_BF16 1
#define MOE_INT4_F16 2
#define MOE_INT4_T1_MAX_TOP_K 32
cudaError_t moe_int4_forward_t1(const void* x, const uint8_t* w13_packed, const void* w13_scales,
                                const void* w13_zeros, int G13, const uint8_t* w2_packed, const void* w2_scales,
                                const void* w2_zeros, int G2, const void* topk_ids, int id_bytes,
                                long long ids_stride, const void* topk_weights, int weight_type,
                                long long weights_stride, int top_k, void* act, void* y, int E, int H, int F,
                                int version, cudaStream_t stream);

// Programmatic dependent launch (on by default; used only on sm_90 and newer): GEMM1 and combine may be
// scheduled while the previous kernel on the stream finishes, and GEMM2 (with after_gemm1) while GEMM1
// finishes; each waits for the previous kernel's results before reading them (griddepcontrol.wait), so
// results are the same bits either way. 0 turns it off for every later launch (process-wide), e.g. to
// time the difference.
void moe_int4_set_programmatic_launch(int enabled);

// num_tokens = T and num_rows = T*k (the length of the sorted arrays); T also bounds the rows of one
// expert when each token's k experts are distinct, which the v2/v3 launch uses to pick the kernel
// (results stay correct when they are not). Both GEMMs return cudaErrorInvalidValue for
// sizes they cannot take (E > 65535, G not even or not dividing K, a version that does not exist).

// Which code path a GEMM with reduction size K and group size G runs for `version`, given the
// packed-weight and activation pointers (alignment matters): 1 = the v1 kernel (also what v2..v5 fall
// back to), 4 or 16 = the v2/v3 kernel with 4- or 16-byte weight loads (also v4/v5's fallback),
// 64 = the v4/v5 tensor-core kernel (64-byte chunks of each weight row), 0 = invalid arguments.
int moe_int4_path(int version, int K, int G, const void* packed, const void* activations);

#ifdef __cplusplus
}
#endif

#endif  // MOE_INT4_H
