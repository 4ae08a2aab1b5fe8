// moe_int4_dequant_check.cu: a host program (no GPU needed) that runs the kernels' dequantisation
// helpers (moe_int4_dequant.cuh) over a whole quantised tensor, so tests/test_cuda_int4.py can
// compare them bit for bit with moe_tut.quant.dequantize, the spec, on a CPU-only machine.
//
// It checks the parts that are easy to get wrong and identical on host and device: the nibble
// order inside a 32-bit word, the magic-number constants, which code pairs with which activation,
// and that the bf16x2 formulation rounds like the spec. (On the device the same functions compile
// to bf16x2 instructions; their rounding, round-to-nearest-even once, is what the PTX ISA specifies
// and what the host emulation in cuda_bf16.hpp does.)
//
// usage: moe_int4_dequant_check N K G packed.bin scales.bin zeros.bin|- out_pairs.bin out_one.bin
//   packed [N, K/2] uint8, scales/zeros [K/G, N] bf16 (raw little-endian);
//   writes [N, K] bf16 twice: via the v2/v3 word path (int4_pair_magic + dequant_pair_*; only where
//   K and G are multiples of 8, as in the kernels, else 0xFFFF) and via the v1 per-code path (dequant_one).
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "moe_int4_dequant.cuh"

using namespace moe_int4;

static bool read_file(const char* path, void* dst, size_t bytes) {
  FILE* f = fopen(path, "rb");
  if (!f) return false;
  const size_t got = fread(dst, 1, bytes, f);
  fclose(f);
  return got == bytes;
}

static bool write_file(const char* path, const void* src, size_t bytes) {
  FILE* f = fopen(path, "wb");
  if (!f) return false;
  const size_t put = fwrite(src, 1, bytes, f);
  fclose(f);
  return put == bytes;
}

static uint16_t float_to_bf16_bits(float v) {
  // v is already a bf16 value widened to float, so dropping the low half is exact.
  uint32_t b;
  memcpy(&b, &v, 4);
  return (uint16_t)(b >> 16);
}

int main(int argc, char** argv) {
  if (argc != 9) {
    fprintf(stderr, "usage: %s N K G packed.bin scales.bin zeros.bin|- out_pairs.bin out_one.bin\n", argv[0]);
    return 2;
  }
  const int N = atoi(argv[1]), K = atoi(argv[2]), G = atoi(argv[3]);
  if (N <= 0 || K <= 0 || G <= 0 || K % 2 || G % 2 || K % G) {
    fprintf(stderr, "need N > 0, K even, G even and dividing K\n");
    return 2;
  }
  const bool sym = argv[6][0] == '-' && argv[6][1] == '\0';
  const int groups = K / G;
  std::vector<uint8_t> packed((size_t)N * K / 2);
  std::vector<__nv_bfloat16> scales((size_t)groups * N), zeros(sym ? 0 : (size_t)groups * N);
  if (!read_file(argv[4], packed.data(), packed.size()) ||
      !read_file(argv[5], scales.data(), scales.size() * 2) ||
      (!sym && !read_file(argv[6], zeros.data(), zeros.size() * 2))) {
    fprintf(stderr, "could not read the input files (wrong sizes?)\n");
    return 2;
  }
  std::vector<uint16_t> out_pairs((size_t)N * K, 0xFFFFu), out_one((size_t)N * K);
  // The word path needs whole words in one group, as the kernels do (v2/v3 require K % 8 == 0 and
  // G % 8 == 0); elsewhere out_pairs keeps the marker 0xFFFF (a NaN) and the test skips it.
  const bool words = K % 8 == 0 && G % 8 == 0;
  for (int n = 0; n < N && words; ++n) {
    for (int w = 0; w < K / 8; ++w) {
      uint32_t u;
      memcpy(&u, &packed[(size_t)n * K / 2 + 4 * w], 4);  // little-endian, as a GPU load sees it
      const int g = (8 * w) / G;
      const __nv_bfloat16 s = scales[(size_t)g * N + n];
      const float sf = bf16_to_float(s), zf = sym ? 0.0f : bf16_to_float(zeros[(size_t)g * N + n]);
      const __nv_bfloat162 s2 = __bfloat162bfloat162(s);
      uint32_t d[4];
      d[0] = sym ? dequant_pair_sym(int4_pair_magic<0>(u), s2) : dequant_pair_asym(int4_pair_magic<0>(u), sf, zf);
      d[1] = sym ? dequant_pair_sym(int4_pair_magic<1>(u), s2) : dequant_pair_asym(int4_pair_magic<1>(u), sf, zf);
      d[2] = sym ? dequant_pair_sym(int4_pair_magic<2>(u), s2) : dequant_pair_asym(int4_pair_magic<2>(u), sf, zf);
      d[3] = sym ? dequant_pair_sym(int4_pair_magic<3>(u), s2) : dequant_pair_asym(int4_pair_magic<3>(u), sf, zf);
      for (int p = 0; p < 4; ++p) {  // pair p holds codes p (low half) and p + 4 (high half) of the word
        out_pairs[(size_t)n * K + 8 * w + p] = (uint16_t)(d[p] & 0xFFFFu);
        out_pairs[(size_t)n * K + 8 * w + p + 4] = (uint16_t)(d[p] >> 16);
      }
    }
  }
  // The per-code path, decoded the plain way: k's byte is k / 2, low nibble for even k.
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      const uint32_t byte = packed[(size_t)n * K / 2 + k / 2];
      const uint32_t c = k % 2 ? byte >> 4 : byte & 0xFu;
      const int g = k / G;
      const float s = bf16_to_float(scales[(size_t)g * N + n]);
      const float z = sym ? -8.0f * s : bf16_to_float(zeros[(size_t)g * N + n]);
      out_one[(size_t)n * K + k] = float_to_bf16_bits(dequant_one(c, s, z));
    }
  }
  if (!write_file(argv[7], out_pairs.data(), out_pairs.size() * 2) ||
      !write_file(argv[8], out_one.data(), out_one.size() * 2)) {
    fprintf(stderr, "could not write the outputs\n");
    return 2;
  }
  return 0;
}
