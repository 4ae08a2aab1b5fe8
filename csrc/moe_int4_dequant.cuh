// moe_int4_dequant.cuh: INT4 -> bf16 dequantisation helpers shared by the kernels in moe_int4.cu.
//
// All functions are __host__ __device__ so tests/test_cuda_int4.py can compile them into a host
// program on a machine without a GPU and check them bit for bit against moe_tut/quant.py's
// dequantize (the spec). On the host the bf16 intrinsics are cuda_bf16.hpp's float emulations; on
// the device they are the sm_80+ bf16x2 instructions. Both round once, to nearest even, which is
// what makes them agree (see dequant_pair_sym).
//
// Nibble layout: a little-endian 32-bit word u of packed bytes holds 8 codes c0..c7 (k = 8w..8w+7):
//   byte 0 = c0 | c1 << 4, byte 1 = c2 | c3 << 4, byte 2 = c4 | c5 << 4, byte 3 = c6 | c7 << 4
// so (u >> 4p) & 0x000F000F puts c_p in bits 0..3 and c_{p+4} in bits 16..19, for p = 0..3: one
// shift and one AND (fused into one LOP3 with the OR below) extract two codes, one per bf16 half.
// A pair p therefore holds (k = 8w + p, k = 8w + p + 4), not two neighbours; the kernels pair the
// activations the same way.
#ifndef MOE_INT4_DEQUANT_CUH
#define MOE_INT4_DEQUANT_CUH

#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

#define MOE_HD __host__ __device__ __forceinline__

namespace moe_int4 {

// The "magic number" conversion: the bf16 with bits 0x4300 is 128.0 (exponent 2^7, 7 mantissa
// bits, so the mantissa's unit is exactly 1). OR-ing a 4-bit code c into the low mantissa bits gives
// the bf16 128 + c exactly, with no int -> float conversion instruction. This is a known technique:
// the same constants (mask 0x000F000F, bf16x2 128.0 = 0x43004300, then subtract 136 for offset-8
// codes) appear in NVIDIA FasterTransformer's INT4 -> bf16 converter, CUTLASS's mixed-input
// NumericArrayConverter and vLLM's Marlin dequant; the fp16 form uses 0x6400 = 1024.0.
constexpr uint32_t kMagic128x2 = 0x43004300u;  // bf16x2 (128.0, 128.0)
constexpr uint32_t kLowNibbles = 0x000F000Fu;
constexpr uint32_t kBf16x2_136 = 0x43084308u;  // bf16x2 (136.0, 136.0) = 128 + the symmetric offset 8
constexpr uint32_t kBf16x2_128 = 0x43004300u;

MOE_HD float bits_to_float(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, 4);
  return f;
#endif
}

MOE_HD uint32_t bf162_to_bits(__nv_bfloat162 v) {
  uint32_t b;
  memcpy(&b, &v, 4);
  return b;
}

MOE_HD __nv_bfloat162 bits_to_bf162(uint32_t b) {
  __nv_bfloat162 v;
  memcpy(&v, &b, 4);
  return v;
}

// A bf16 is the upper half of a float32, so widening is exact and costs one shift or one AND.
MOE_HD float bf16x2_lo(uint32_t b) { return bits_to_float(b << 16); }
MOE_HD float bf16x2_hi(uint32_t b) { return bits_to_float(b & 0xFFFF0000u); }
MOE_HD float bf16_to_float(__nv_bfloat16 v) {
  uint16_t b;
  memcpy(&b, &v, 2);
  return bits_to_float(uint32_t(b) << 16);
}

// bf16x2 (128 + c_p, 128 + c_{p+4}) from a packed word, p = 0..3. On the GPU the AND and the OR are one
// LOP3 (ptxas, left to itself, emitted two: a LOP3 takes one 32-bit immediate).
template <int P>
MOE_HD uint32_t int4_pair_magic(uint32_t u) {
#ifdef __CUDA_ARCH__
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(u >> (4 * P)), "n"(kLowNibbles), "n"(kMagic128x2));
  return r;  // 0xEA = (a & b) | c
#else
  return ((u >> (4 * P)) & kLowNibbles) | kMagic128x2;
#endif
}

// Symmetric: (c - 8) * s for both halves, as bf16x2 bits. (128 + c) - 136 = c - 8 is exact in bf16
// (|c - 8| <= 8), and the product of that 4-bit integer with the 8-bit-mantissa scale is rounded
// once (mul.rn). The spec computes (c - 8) * s exactly in float32 and rounds once to bf16, so the
// two agree bit for bit. (Folding the offset into an fma, (128 + c) * s - 136 * s, would not: 136 * s
// is not a bf16.) The explicit _rn forms stop the compiler from contracting the multiply into an fma.
MOE_HD uint32_t dequant_pair_sym(uint32_t magic_pair, __nv_bfloat162 scale2) {
  const __nv_bfloat162 centred = __hsub2_rn(bits_to_bf162(magic_pair), bits_to_bf162(kBf16x2_136));
  return bf162_to_bits(__hmul2_rn(centred, scale2));
}

// Symmetric, unscaled: the exact integers (c - 8) as bf16x2, for kernels that scale sums afterwards.
MOE_HD uint32_t centred_pair_sym(uint32_t magic_pair) {
  return bf162_to_bits(__hsub2_rn(bits_to_bf162(magic_pair), bits_to_bf162(kBf16x2_136)));
}

// Asymmetric: bf16(fma(c, s, z)) in float32 for both halves, exactly the spec's arithmetic. A bf16x2
// fma (one rounding of the exact c*s + z, straight to bf16) would be cheaper than this and gave the
// same bits in 6 million random trials (a 12-bit product plus an 8-bit zero seems unable to land
// within float32 precision of a bf16 rounding tie, which double rounding needs), but we have no
// proof, so this path copies the spec. Costs ~2x the instructions of the symmetric path.
MOE_HD uint32_t dequant_pair_asym(uint32_t magic_pair, float s, float z) {
  const uint32_t c = bf162_to_bits(__hsub2_rn(bits_to_bf162(magic_pair), bits_to_bf162(kBf16x2_128)));
  const float lo = fmaf(bf16x2_lo(c), s, z);
  const float hi = fmaf(bf16x2_hi(c), s, z);
  return bf162_to_bits(__floats2bfloat162_rn(lo, hi));
}

// The spec, literally, for one code (used by the v1 kernel and as the test's second opinion):
// w = bf16(fma(c, s, z)) with z = -8 s for symmetric (exact in float32), widened back to float.
MOE_HD float dequant_one(uint32_t c, float s, float z) {
  return bf16_to_float(__float2bfloat16_rn(fmaf(float(c), s, z)));
}

}  // namespace moe_int4

#endif  // MOE_INT4_DEQUANT_CUH
