// moe_int4_host_emulation.cpp: runs the real kernels and launchers of moe_int4.cu on the CPU, one
// fiber per CUDA thread, so tests/test_cuda_int4.py can check their indexing, lane mapping,
// passes and epilogues on a machine without a GPU. A correctness tool only: it is many orders of
// magnitude slower than a GPU.
//
// How: compiled by the host compiler (not nvcc) with MOE_INT4_HOST_EMULATION defined, it supplies
// host versions of the CUDA built-ins the kernels use (threadIdx/blockIdx/blockDim/gridDim, __syncthreads,
// __shfl_xor_sync, __ballot_sync, __popc, __ldg, __shared__, and mma.sync as emulated_mma_bf16_16816)
// and its own launch(), then #includes
// moe_int4.cu itself. The device-only
// parts are the PTX loads of v3 (the emulation takes load_weights' plain branch, so v3 here checks
// the prefetch logic, not the L1 hint) and the bf16x2 instructions (cuda_bf16.hpp's host
// emulations round the same way; moe_int4_dequant_check.cu checks them bit for bit).
//
// usage: moe_int4_host_emulation DIR   (files written by the test)
//   DIR/params.txt: T top_k E H F G13 G2 version sym13 sym2 misalign_x sm_count
//   (sm_count: the GPU size GEMM2's K-split rule assumes, moe_int4_gemm2_splits; small, so toy shapes split)
//   DIR/x.bin [T,H] bf16; w13_packed.bin, w13_scales.bin, w13_zeros.bin (if !sym13); same for w2;
//   sorted_token_ids.bin, sorted_slots.bin [T*k] int32; sorted_weights.bin [T*k] f32;
//   expert_offsets.bin [E+1] int32.
//   Writes DIR/act.bin [T*k,F] bf16, DIR/out.bin [T*k,H] f32, DIR/y.bin [T,H] bf16 and prints
//   "path gemm1=<code> gemm2=<code> splits=<n>" (moe_int4_path of each GEMM, GEMM2's K splits).
//   Optional DIR/topk.txt (T = 1): also runs moe_int4_forward_t1, see main().
#include <cuda_runtime.h>  // host declarations only: dim3, uint3, uint4, cudaStream_t, cudaError_t

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <functional>
#include <vector>

#include <ucontext.h>

// ------------------------------------------------------------------ CUDA built-ins on the host
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define MOE_INT4_HOST_EMULATION 1
#define cudaGetLastError() (cudaSuccess)

using std::min;

// Every CUDA thread of a block is a ucontext fiber on one OS thread, scheduled cooperatively: a
// fiber runs until it reaches a barrier (block or warp) or exits, and a barrier opens once every
// fiber of its scope that has not exited waits at it. (One OS thread per CUDA thread also works, but
// its futex wake-ups made the tests ~10x slower.) Blocks run one after another, which is also why a
// __shared__ variable can be a plain static.
uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace emu {

enum State { kRunnable, kWaitWarp, kWaitBlock, kDone };

struct Fiber {
  ucontext_t ctx;
  State state = kRunnable;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<float> fvals;     // __shfl_xor_sync exchange, one slot per thread
  std::vector<unsigned> uvals;  // __ballot_sync exchange
  std::vector<std::array<uint32_t, 6>> frags;  // mma.sync exchange: a0..a3, b0, b1 per thread
  std::function<void()> body;   // the kernel call with its arguments
  int current = 0;
};

Block* block = nullptr;

inline void wait(State s) {
  Fiber& f = block->fibers[block->current];
  f.state = s;
  swapcontext(&f.ctx, &block->scheduler);
}

void entry() {
  block->body();
  block->fibers[block->current].state = kDone;  // then uc_link returns to the scheduler
}

// Runs `threads` fibers of the current block to completion; aborts on a barrier no fiber can pass.
void run_block(int threads, unsigned bx, unsigned by, unsigned bz) {
  constexpr size_t kStack = 256 * 1024;
  block->fibers.assign(threads, Fiber{});
  block->stacks.resize(threads);
  block->fvals.assign(threads, 0.0f);
  block->uvals.assign(threads, 0u);
  block->frags.assign(threads, {});
  for (int t = 0; t < threads; ++t) {
    block->stacks[t].resize(kStack);
    Fiber& f = block->fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = block->stacks[t].data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &block->scheduler;
    makecontext(&f.ctx, entry, 0);
  }
  blockIdx = make_uint3(bx, by, bz);
  blockDim = dim3(threads, 1, 1);
  const int warps = (threads + 31) / 32;
  for (;;) {
    bool ran = false;
    for (int t = 0; t < threads; ++t) {
      if (block->fibers[t].state != kRunnable) continue;
      block->current = t;
      threadIdx = make_uint3(t, 0, 0);
      swapcontext(&block->scheduler, &block->fibers[t].ctx);
      ran = true;
    }
    bool all_done = true, block_ready = true, any_live = false;
    for (int w = 0; w < warps; ++w) {
      bool warp_ready = true, warp_live = false;
      for (int t = 32 * w; t < std::min(threads, 32 * w + 32); ++t) {
        const State st = block->fibers[t].state;
        if (st == kDone) continue;
        warp_live = any_live = true;
        all_done = false;
        warp_ready &= st == kWaitWarp;
        block_ready &= st == kWaitBlock;
      }
      if (warp_live && warp_ready)
        for (int t = 32 * w; t < std::min(threads, 32 * w + 32); ++t)
          if (block->fibers[t].state == kWaitWarp) block->fibers[t].state = kRunnable;
    }
    if (all_done) return;
    if (any_live && block_ready)
      for (auto& f : block->fibers)
        if (f.state == kWaitBlock) f.state = kRunnable;
    bool runnable = false;
    for (auto& f : block->fibers) runnable |= f.state == kRunnable;
    if (!runnable && !ran) {
      std::fprintf(stderr, "emulation deadlock in block (%u, %u, %u): threads wait at barriers no one can pass\n",
                   bx, by, bz);
      std::exit(4);
    }
  }
}

}  // namespace emu

inline void __syncthreads() { emu::wait(emu::kWaitBlock); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const int t = threadIdx.x;
  emu::block->fvals[t] = v;
  emu::wait(emu::kWaitWarp);  // every lane has written
  const float other = emu::block->fvals[(t & ~31) + ((t & 31) ^ offset)];
  emu::wait(emu::kWaitWarp);  // every lane has read, so the slots may be reused
  return other;
}

inline unsigned __ballot_sync(unsigned, bool pred) {
  const int t = threadIdx.x, base = t & ~31;
  emu::block->uvals[t] = pred ? 1u : 0u;
  emu::wait(emu::kWaitWarp);
  unsigned mask = 0;
  for (int l = 0; l < 32 && base + l < (int)emu::block->uvals.size(); ++l) mask |= emu::block->uvals[base + l] << l;
  emu::wait(emu::kWaitWarp);
  return mask;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for one warp, from the PTX ISA's fragment layout
// (lane = 4 g + t): A (16 x 16) row g + 8 (i % 2), k-slots 2t + 8 (i / 2) + {0, 1} in a[i] (low half
// first); B (16 x 8) column g, k-slots 2t + {0, 1} in b0 and 2t + 8 + {0, 1} in b1; D rows g and g + 8,
// columns 2t and 2t + 1 in d[0..3]. Every lane publishes its fragments, then computes its four outputs
// from its warp's (float32 products of bf16 values are exact; the sum's order is this loop's).
inline void emulated_mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int t = threadIdx.x, base = t & ~31, lane = t & 31;
  emu::block->frags[t] = {a[0], a[1], a[2], a[3], b0, b1};
  emu::wait(emu::kWaitWarp);
  auto half = [](uint32_t word, int k) {
    const uint32_t bits = (k % 2 ? word >> 16 : word & 0xFFFFu) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  auto A = [&](int m, int k) {  // k = 0..15
    const auto& f = emu::block->frags[base + 4 * (m % 8) + (k % 8) / 2];
    return half(f[(m / 8) + 2 * (k / 8)], k);
  };
  auto B = [&](int k, int n) {
    const auto& f = emu::block->frags[base + 4 * n + (k % 8) / 2];
    return half(f[4 + k / 8], k);
  };
  const int g = lane / 4, tq = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i / 2), n = 2 * tq + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(m, k) * B(k, n);
    out[i] = acc;
  }
  emu::wait(emu::kWaitWarp);  // every lane has read the fragments
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// `on` is moe_int4.cu's Launch (stream, programmatic): blocks run one after another here, so it plays no part.
template <class On, class... KernelArgs, class... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, On, Args... args) {
  emu::Block block;
  emu::block = &block;
  block.body = [&] { kernel(args...); };
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) emu::run_block(threads, bx, by, bz);
  emu::block = nullptr;
}

#include "moe_int4.cu"

// ---------------------------------------------------------------------------------- driver

namespace {

struct Buffer {
  explicit Buffer(size_t bytes, size_t offset = 0) : raw(static_cast<uint8_t*>(std::aligned_alloc(256, bytes + 256))),
                                                     data(raw + offset) {}
  ~Buffer() { std::free(raw); }
  uint8_t* raw;
  uint8_t* data;
};

std::unique_ptr<Buffer> read_file(const std::string& path, size_t bytes, size_t offset = 0) {
  auto buf = std::make_unique<Buffer>(bytes, offset);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(buf->data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return buf;
}

void write_file(const std::string& path, const void* src, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(src, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s returned error %d\n", what, (int)err);
    std::exit(3);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  int T, k, E, H, F, G13, G2, version, sym13, sym2, misalign, sm_count;
  FILE* pf = std::fopen((dir + "/params.txt").c_str(), "r");
  if (!pf || std::fscanf(pf, "%d %d %d %d %d %d %d %d %d %d %d %d", &T, &k, &E, &H, &F, &G13, &G2, &version,
                         &sym13, &sym2, &misalign, &sm_count) != 12) {
    std::fprintf(stderr, "bad params.txt\n");
    return 2;
  }
  std::fclose(pf);
  const size_t rows = (size_t)T * k;
  // misalign_x shifts x by one bf16, so the launcher must notice and fall back to v1.
  auto x = read_file(dir + "/x.bin", (size_t)T * H * 2, misalign ? 2 : 0);
  auto w13p = read_file(dir + "/w13_packed.bin", (size_t)E * 2 * F * H / 2);
  auto w13s = read_file(dir + "/w13_scales.bin", (size_t)E * (H / G13) * 2 * F * 2);
  auto w13z = sym13 ? nullptr : read_file(dir + "/w13_zeros.bin", (size_t)E * (H / G13) * 2 * F * 2);
  auto w2p = read_file(dir + "/w2_packed.bin", (size_t)E * H * F / 2);
  auto w2s = read_file(dir + "/w2_scales.bin", (size_t)E * (F / G2) * H * 2);
  auto w2z = sym2 ? nullptr : read_file(dir + "/w2_zeros.bin", (size_t)E * (F / G2) * H * 2);
  auto ids = read_file(dir + "/sorted_token_ids.bin", rows * 4);
  auto slots = read_file(dir + "/sorted_slots.bin", rows * 4);
  auto sw = read_file(dir + "/sorted_weights.bin", rows * 4);
  auto offs = read_file(dir + "/expert_offsets.bin", (size_t)(E + 1) * 4);
  Buffer act(rows * F * 2);
  const int splits = moe_int4_gemm2_splits(version, E, H, F, G2, (int)rows, sm_count, w2p->data, act.data);
  Buffer out(splits * rows * H * 4), y((size_t)T * H * 2);
  // All-ones bytes are NaN in bf16 and float32: an element a kernel fails to write shows up as NaN.
  std::memset(act.data, 0xFF, rows * F * 2);
  std::memset(out.data, 0xFF, splits * rows * H * 4);
  std::memset(y.data, 0xFF, (size_t)T * H * 2);
  std::printf("path gemm1=%d gemm2=%d splits=%d\n", moe_int4_path(version, H, G13, w13p->data, x->data),
              moe_int4_path(version, F, G2, w2p->data, act.data), splits);
  const auto* ids32 = reinterpret_cast<const int32_t*>(ids->data);
  const auto* offs32 = reinterpret_cast<const int32_t*>(offs->data);
  check(moe_int4_gemm1_swiglu(x->data, w13p->data, w13s->data, w13z ? w13z->data : nullptr, ids32, offs32, act.data,
                              T, (int)rows, E, H, F, G13, version, nullptr),
        "moe_int4_gemm1_swiglu");
  check(moe_int4_gemm2_weighted(act.data, w2p->data, w2s->data, w2z ? w2z->data : nullptr,
                                reinterpret_cast<const int32_t*>(slots->data),
                                reinterpret_cast<const float*>(sw->data), offs32,
                                reinterpret_cast<float*>(out.data), T, (int)rows, E, H, F, G2, version, splits,
                                /*after_gemm1=*/1, nullptr),
        "moe_int4_gemm2_weighted");
  check(moe_int4_combine(reinterpret_cast<const float*>(out.data), y.data, T, k, H, splits, nullptr),
        "moe_int4_combine");
  // The single-token path (moe_int4_forward_t1), when the test asks for it: DIR/topk.txt holds
  // "id_bytes weight_type ids_stride weights_stride", DIR/topk_ids.bin and topk_weights.bin the strided top-k.
  // Writes DIR/act_t1.bin [k, F] and y_t1.bin [1, H] and prints "t1=<cudaError_t>".
  if (FILE* tf = std::fopen((dir + "/topk.txt").c_str(), "r")) {
    int id_bytes, weight_type;
    long long ids_stride, weights_stride;
    if (std::fscanf(tf, "%d %d %lld %lld", &id_bytes, &weight_type, &ids_stride, &weights_stride) != 4) {
      std::fprintf(stderr, "bad topk.txt\n");
      return 2;
    }
    std::fclose(tf);
    const size_t weight_bytes = weight_type == MOE_INT4_F32 ? 4 : 2;
    auto topk_ids = read_file(dir + "/topk_ids.bin", (size_t)k * ids_stride * id_bytes);
    auto topk_w = read_file(dir + "/topk_weights.bin", (size_t)k * weights_stride * weight_bytes);
    Buffer act_t1((size_t)k * F * 2), y_t1((size_t)H * 2);
    std::memset(act_t1.data, 0xFF, (size_t)k * F * 2);
    std::memset(y_t1.data, 0xFF, (size_t)H * 2);
    const cudaError_t err = moe_int4_forward_t1(x->data, w13p->data, w13s->data, w13z ? w13z->data : nullptr, G13,
                                                w2p->data, w2s->data, w2z ? w2z->data : nullptr, G2, topk_ids->data,
                                                id_bytes, ids_stride, topk_w->data, weight_type, weights_stride, k,
                                                act_t1.data, y_t1.data, E, H, F, version, nullptr);
    std::printf("t1=%d\n", (int)err);
    write_file(dir + "/act_t1.bin", act_t1.data, (size_t)k * F * 2);
    write_file(dir + "/y_t1.bin", y_t1.data, (size_t)H * 2);
  }
  write_file(dir + "/act.bin", act.data, rows * F * 2);
  write_file(dir + "/out.bin", out.data, splits * rows * H * 4);
  write_file(dir + "/y.bin", y.data, (size_t)T * H * 2);
  return 0;
}
