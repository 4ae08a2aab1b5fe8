// moe_int4_binding.cpp: the PyTorch binding of the C launchers in moe_int4.h (kernels in moe_int4.cu).
//
// Thin on purpose: check what the kernels assume (device, dtype, shape, contiguity, group size)
// with messages that say what was expected, allocate the outputs, and launch on the current CUDA
// stream of the input's device. Only tensor metadata is read, never tensor data, so there is no host
// sync and a forward through this binding can be captured in a CUDA graph. The routing arrays'
// *contents* (ids in range, offsets non-decreasing) are trusted: moe_tut's RoutingPlan.build makes them.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "moe_int4.h"

namespace {

// Error messages are assembled with std::to_string and thrown as std::runtime_error (RuntimeError in
// Python) instead of TORCH_CHECK: on the GPU image (torch 2.11, CUDA 13), TORCH_CHECK's ostream
// formatting of an integer inside this extension segfaulted (cuda-gdb: std::ostream::_M_insert<long>,
// reached from check_version; later also from the other checks once Triton and Cython modules were
// loaded in the process). Cause not established (two C++ runtimes' locale data is the likely suspect);
// no stream is touched on these paths now.
void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
void append(std::string& s, const at::Device& v) { s += v.str(); }
void append(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += "]";
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string message;
  (append(message, parts), ...);
  throw std::runtime_error(message);
}

#define MOE_CHECK(cond, ...)   \
  do {                         \
    if (!(cond)) fail(__VA_ARGS__); \
  } while (0)


void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const at::Device& device) {
  MOE_CHECK(t.is_cuda(), "moe_int4: ", name, " must be a CUDA tensor, got one on ", t.device());
  MOE_CHECK(t.device() == device, "moe_int4: ", name, " is on ", t.device(), " but the activations are on ",
              device);
  MOE_CHECK(t.scalar_type() == dtype, "moe_int4: ", name, " must be ", dtype, ", got ", t.scalar_type());
  MOE_CHECK(t.dim() == dim, "moe_int4: ", name, " must be ", dim, "-D, got shape ", t.sizes());
  MOE_CHECK(t.is_contiguous(), "moe_int4: ", name, " must be contiguous (call .contiguous())");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* layout) {
  MOE_CHECK(t.sizes() == expected, "moe_int4: ", name, " must be ", layout, " = ", expected, ", got ", t.sizes());
}

int to_int(int64_t v, const char* what) {
  MOE_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "moe_int4: ", what, " = ", v,
              " does not fit the kernels' 32-bit sizes");
  return static_cast<int>(v);
}

void check_version(int64_t version) {
  MOE_CHECK(version >= 1 && version <= MOE_INT4_LATEST_VERSION, "moe_int4: version must be 1..",
            MOE_INT4_LATEST_VERSION, ", got ", version);
}

// packed [E, N, K/2] uint8, scales [E, K/G, N] bf16, zeros like scales or None. Returns nothing;
// raises with the expected layout on any mismatch.
void check_quant(const at::Tensor& packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                 const char* name, int64_t E, int64_t N, int64_t K, int64_t group_size, const at::Device& device) {
  MOE_CHECK(group_size > 0 && group_size % 2 == 0 && K % group_size == 0, "moe_int4: ", name,
              " group_size must be even and divide the reduction dim ", K, ", got ", group_size);
  const std::string p = std::string(name) + "_packed", s = std::string(name) + "_scales",
                    z = std::string(name) + "_zeros";
  check_tensor(packed, p.c_str(), at::kByte, 3, device);
  check_shape(packed, p.c_str(), {E, N, K / 2}, "[E, N, K/2]");
  check_tensor(scales, s.c_str(), at::kBFloat16, 3, device);
  check_shape(scales, s.c_str(), {E, K / group_size, N}, "[E, K/G, N]");
  if (zeros.has_value()) {
    check_tensor(*zeros, z.c_str(), at::kBFloat16, 3, device);
    check_shape(*zeros, z.c_str(), {E, K / group_size, N}, "[E, K/G, N]");
  }
}

void check_routing_index(const at::Tensor& t, const char* name, int64_t numel, const at::Device& device) {
  check_tensor(t, name, at::kInt, 1, device);
  MOE_CHECK(t.numel() == numel, "moe_int4: ", name, " must have ", numel, " entries, got ", t.numel());
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* what) {
  MOE_CHECK(err == cudaSuccess, "moe_int4: ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

// act [T*k, F] bf16 = silu(x W1^T) * (x W3^T) per sorted row (see moe_int4.h).
at::Tensor gemm1_swiglu(const at::Tensor& x, const at::Tensor& w13_packed, const at::Tensor& w13_scales,
                        const std::optional<at::Tensor>& w13_zeros, const at::Tensor& sorted_token_ids,
                        const at::Tensor& expert_offsets, int64_t group_size, int64_t version) {
  check_version(version);
  MOE_CHECK(x.dim() == 2, "moe_int4: x must be 2-D [T, H], got shape ", x.sizes());
  const at::Device device = x.device();
  check_tensor(x, "x", at::kBFloat16, 2, device);
  MOE_CHECK(w13_packed.dim() == 3, "moe_int4: w13_packed must be 3-D [E, 2F, H/2], got shape ", w13_packed.sizes());
  const int64_t T = x.size(0), H = x.size(1), E = w13_packed.size(0), two_f = w13_packed.size(1);
  MOE_CHECK(H % 2 == 0, "moe_int4: the hidden size H must be even (two 4-bit codes per byte), got ", H);
  MOE_CHECK(two_f % 2 == 0 && two_f > 0, "moe_int4: w13's row count must be 2F > 0, got ", two_f);
  check_quant(w13_packed, w13_scales, w13_zeros, "w13", E, two_f, H, group_size, device);
  const int64_t rows = sorted_token_ids.numel();
  check_routing_index(sorted_token_ids, "sorted_token_ids", rows, device);
  check_routing_index(expert_offsets, "expert_offsets", E + 1, device);
  const int64_t F = two_f / 2;
  auto act = at::empty({rows, F}, x.options());
  const c10::cuda::CUDAGuard guard(device);
  check_launch(moe_int4_gemm1_swiglu(x.data_ptr(), w13_packed.data_ptr<uint8_t>(), w13_scales.data_ptr(),
                                     ptr_or_null(w13_zeros), sorted_token_ids.data_ptr<int32_t>(),
                                     expert_offsets.data_ptr<int32_t>(), act.data_ptr(), to_int(T, "T"),
                                     to_int(rows, "T*k"), to_int(E, "E"), to_int(H, "H"), to_int(F, "F"),
                                     to_int(group_size, "group_size"), static_cast<int>(version),
                                     c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "moe_int4_gemm1_swiglu");
  return act;
}

// out [splits * T*k, H] float32, row = slot (in each K split's slice): routing weight * (act W2^T) (see
// moe_int4.h); splits from moe_int4_gemm2_splits for this GPU's SM count (1 except v4/v5 at decode sizes).
at::Tensor gemm2_weighted(const at::Tensor& act, const at::Tensor& w2_packed, const at::Tensor& w2_scales,
                          const std::optional<at::Tensor>& w2_zeros, const at::Tensor& sorted_slots,
                          const at::Tensor& sorted_weights, const at::Tensor& expert_offsets, int64_t num_tokens,
                          int64_t group_size, int64_t version, bool after_gemm1 = false) {
  check_version(version);
  MOE_CHECK(act.dim() == 2, "moe_int4: act must be 2-D [T*k, F], got shape ", act.sizes());
  const at::Device device = act.device();
  check_tensor(act, "act", at::kBFloat16, 2, device);
  MOE_CHECK(w2_packed.dim() == 3, "moe_int4: w2_packed must be 3-D [E, H, F/2], got shape ", w2_packed.sizes());
  const int64_t rows = act.size(0), F = act.size(1), E = w2_packed.size(0), H = w2_packed.size(1);
  MOE_CHECK(F % 2 == 0, "moe_int4: the expert size F must be even (two 4-bit codes per byte), got ", F);
  check_quant(w2_packed, w2_scales, w2_zeros, "w2", E, H, F, group_size, device);
  check_routing_index(sorted_slots, "sorted_slots", rows, device);
  check_tensor(sorted_weights, "sorted_weights", at::kFloat, 1, device);
  MOE_CHECK(sorted_weights.numel() == rows, "moe_int4: sorted_weights must have ", rows, " entries, got ",
              sorted_weights.numel());
  check_routing_index(expert_offsets, "expert_offsets", E + 1, device);
  MOE_CHECK(num_tokens >= 0, "moe_int4: num_tokens must be >= 0, got ", num_tokens);
  const c10::cuda::CUDAGuard guard(device);
  int sm_count = 0;  // a device attribute query: no stream work, so fine inside a CUDA-graph capture
  check_launch(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()),
               "cudaDeviceGetAttribute(multiProcessorCount)");
  const int splits = moe_int4_gemm2_splits(static_cast<int>(version), to_int(E, "E"), to_int(H, "H"), to_int(F, "F"),
                                           to_int(group_size, "group_size"), to_int(rows, "T*k"), sm_count,
                                           w2_packed.data_ptr(), act.data_ptr());
  auto out = at::empty({splits * rows, H}, act.options().dtype(at::kFloat));
  check_launch(moe_int4_gemm2_weighted(act.data_ptr(), w2_packed.data_ptr<uint8_t>(), w2_scales.data_ptr(),
                                       ptr_or_null(w2_zeros), sorted_slots.data_ptr<int32_t>(),
                                       sorted_weights.data_ptr<float>(), expert_offsets.data_ptr<int32_t>(),
                                       out.data_ptr<float>(), to_int(num_tokens, "T"), to_int(rows, "T*k"),
                                       to_int(E, "E"), to_int(H, "H"), to_int(F, "F"),
                                       to_int(group_size, "group_size"), static_cast<int>(version), splits, after_gemm1 ? 1 : 0,
                                       c10::cuda::getCurrentCUDAStream(device.index()).stream()),
               "moe_int4_gemm2_weighted");
  return out;
}

// y [T, H] bf16 = sum over each token's k slot rows (and the K splits) of out [splits * T*k, H] float32.
at::Tensor combine(const at::Tensor& out, int64_t num_tokens, int64_t top_k) {
  MOE_CHECK(out.dim() == 2, "moe_int4: out must be 2-D [splits * T*k, H], got shape ", out.sizes());
  check_tensor(out, "out", at::kFloat, 2, out.device());
  const int64_t rows = num_tokens * top_k;
  MOE_CHECK(top_k > 0 && num_tokens >= 0 && (rows == 0 ? out.size(0) == 0 : out.size(0) % rows == 0) &&
                out.size(0) <= MOE_INT4_MAX_SPLITS * rows,
            "moe_int4: out has ", out.size(0), " rows, expected splits * T*k with T*k = ", num_tokens, " * ", top_k,
            " and 1 <= splits <= ", MOE_INT4_MAX_SPLITS);
  const int64_t splits = rows == 0 ? 1 : out.size(0) / rows;
  const int64_t H = out.size(1);
  auto y = at::empty({num_tokens, H}, out.options().dtype(at::kBFloat16));
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(moe_int4_combine(out.data_ptr<float>(), y.data_ptr(), to_int(num_tokens, "T"), to_int(top_k, "top_k"),
                                to_int(H, "H"), static_cast<int>(splits),
                                c10::cuda::getCurrentCUDAStream(out.device().index()).stream()),
               "moe_int4_combine");
  return y;
}

// The whole forward: gemm1_swiglu -> gemm2_weighted -> combine, y [T, H] bf16.
at::Tensor forward(const at::Tensor& x, const at::Tensor& w13_packed, const at::Tensor& w13_scales,
                   const std::optional<at::Tensor>& w13_zeros, int64_t w13_group_size, const at::Tensor& w2_packed,
                   const at::Tensor& w2_scales, const std::optional<at::Tensor>& w2_zeros, int64_t w2_group_size,
                   const at::Tensor& sorted_token_ids, const at::Tensor& sorted_slots,
                   const at::Tensor& sorted_weights, const at::Tensor& expert_offsets, int64_t top_k,
                   int64_t version) {
  MOE_CHECK(x.dim() == 2, "moe_int4: x must be 2-D [T, H], got shape ", x.sizes());
  MOE_CHECK(top_k > 0 && sorted_token_ids.numel() == x.size(0) * top_k, "moe_int4: the routing has ",
              sorted_token_ids.numel(), " rows, expected T*k = ", x.size(0), " * ", top_k);
  MOE_CHECK(w2_packed.dim() == 3 && w13_packed.dim() == 3 && w2_packed.size(0) == w13_packed.size(0) &&
                  w2_packed.size(1) == x.size(1) && 4 * w2_packed.size(2) == w13_packed.size(1),  // 2F = 2 * (2 * F/2)
              "moe_int4: w2_packed ", w2_packed.sizes(), " must be [E, H, F/2] to match w13_packed ",
              w13_packed.sizes(), " = [E, 2F, H/2] and x ", x.sizes());
  const at::Tensor act =
      gemm1_swiglu(x, w13_packed, w13_scales, w13_zeros, sorted_token_ids, expert_offsets, w13_group_size, version);
  const at::Tensor out = gemm2_weighted(act, w2_packed, w2_scales, w2_zeros, sorted_slots, sorted_weights,
                                        expert_offsets, x.size(0), w2_group_size, version, /*after_gemm1=*/true);
  return combine(out, x.size(0), top_k);
}

// One token (T = 1) from the router's top-k [1, k] without a RoutingPlan, y [1, H] bf16 (moe_int4_forward_t1);
// None where that path does not take this call (see moe_int4.h; nothing was launched), so the caller runs
// `forward` on a RoutingPlan instead.
std::optional<at::Tensor> forward_t1(const at::Tensor& x, const at::Tensor& w13_packed, const at::Tensor& w13_scales,
                                     const std::optional<at::Tensor>& w13_zeros, int64_t w13_group_size,
                                     const at::Tensor& w2_packed, const at::Tensor& w2_scales,
                                     const std::optional<at::Tensor>& w2_zeros, int64_t w2_group_size,
                                     const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t version) {
  check_version(version);
  const at::Device device = x.device();
  check_tensor(x, "x", at::kBFloat16, 2, device);
  MOE_CHECK(x.size(0) == 1, "moe_int4: forward_t1 takes one token, x is ", x.sizes());
  MOE_CHECK(w13_packed.dim() == 3 && w2_packed.dim() == 3, "moe_int4: w13_packed and w2_packed must be 3-D, got ",
            w13_packed.sizes(), " and ", w2_packed.sizes());
  const int64_t H = x.size(1), E = w13_packed.size(0), F = w13_packed.size(1) / 2;
  MOE_CHECK(H % 2 == 0 && F % 2 == 0 && F > 0, "moe_int4: H and F must be even and positive, got H = ", H, ", F = ", F);
  check_quant(w13_packed, w13_scales, w13_zeros, "w13", E, 2 * F, H, w13_group_size, device);
  check_quant(w2_packed, w2_scales, w2_zeros, "w2", E, H, F, w2_group_size, device);
  MOE_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == 1 && topk_weights.sizes() == topk_ids.sizes(),
            "moe_int4: topk_ids and topk_weights must both be [1, k], got ", topk_ids.sizes(), " and ",
            topk_weights.sizes());
  MOE_CHECK(topk_ids.device() == device && topk_weights.device() == device,
            "moe_int4: the routing must be on the activations' device ", device);
  const int64_t k = topk_ids.size(1);
  const at::ScalarType it = topk_ids.scalar_type(), wt = topk_weights.scalar_type();
  const int weight_type = wt == at::kFloat ? MOE_INT4_F32 : wt == at::kBFloat16 ? MOE_INT4_BF16
                          : wt == at::kHalf ? MOE_INT4_F16 : -1;
  if ((it != at::kInt && it != at::kLong) || weight_type < 0 || k < 1 || k > MOE_INT4_T1_MAX_TOP_K)
    return std::nullopt;
  auto act = at::empty({k, F}, x.options());
  auto y = at::empty({1, H}, x.options());
  const c10::cuda::CUDAGuard guard(device);
  const cudaError_t err = moe_int4_forward_t1(
      x.data_ptr(), w13_packed.data_ptr<uint8_t>(), w13_scales.data_ptr(), ptr_or_null(w13_zeros),
      to_int(w13_group_size, "w13 group_size"), w2_packed.data_ptr<uint8_t>(), w2_scales.data_ptr(),
      ptr_or_null(w2_zeros), to_int(w2_group_size, "w2 group_size"), topk_ids.data_ptr(), it == at::kLong ? 8 : 4,
      topk_ids.stride(1), topk_weights.data_ptr(), weight_type, topk_weights.stride(1), static_cast<int>(k),
      act.data_ptr(), y.data_ptr(), to_int(E, "E"), to_int(H, "H"), to_int(F, "F"), static_cast<int>(version),
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  if (err == cudaErrorNotSupported) return std::nullopt;
  check_launch(err, "moe_int4_forward_t1");
  return y;
}

// The path a GEMM takes (1 = v1 kernel, 4 or 16 = v2/v3 load width, 64 = v4/v5 tensor cores), 0 = invalid.
int64_t path(int64_t version, int64_t K, int64_t group_size, const at::Tensor& packed, const at::Tensor& activations) {
  return moe_int4_path(static_cast<int>(version), to_int(K, "K"), to_int(group_size, "group_size"),
                       packed.data_ptr(), activations.data_ptr());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_tut W4A16 grouped MoE kernels for decode (csrc/moe_int4.cu)";
  m.attr("latest_version") = MOE_INT4_LATEST_VERSION;
  m.def("gemm1_swiglu", &gemm1_swiglu, "act = silu(x W1^T) * (x W3^T) per sorted row", py::arg("x"),
        py::arg("w13_packed"), py::arg("w13_scales"), py::arg("w13_zeros"), py::arg("sorted_token_ids"),
        py::arg("expert_offsets"), py::arg("group_size"), py::arg("version"));
  m.def("gemm2_weighted",
        [](const at::Tensor& act, const at::Tensor& w2_packed, const at::Tensor& w2_scales,
           const std::optional<at::Tensor>& w2_zeros, const at::Tensor& sorted_slots, const at::Tensor& sorted_weights,
           const at::Tensor& expert_offsets, int64_t num_tokens, int64_t group_size, int64_t version) {
          // called on its own, GEMM2 cannot assume GEMM1 ran just before it
          return gemm2_weighted(act, w2_packed, w2_scales, w2_zeros, sorted_slots, sorted_weights, expert_offsets,
                                num_tokens, group_size, version, false);
        }, "out[slot] = routing weight * (act W2^T), float32", py::arg("act"),
        py::arg("w2_packed"), py::arg("w2_scales"), py::arg("w2_zeros"), py::arg("sorted_slots"),
        py::arg("sorted_weights"), py::arg("expert_offsets"), py::arg("num_tokens"), py::arg("group_size"),
        py::arg("version"));
  m.def("combine", &combine, "y = sum over k of out, bf16", py::arg("out"), py::arg("num_tokens"), py::arg("top_k"));
  m.def("forward", &forward, "the whole MoE forward: y [T, H] bf16", py::arg("x"), py::arg("w13_packed"),
        py::arg("w13_scales"), py::arg("w13_zeros"), py::arg("w13_group_size"), py::arg("w2_packed"),
        py::arg("w2_scales"), py::arg("w2_zeros"), py::arg("w2_group_size"), py::arg("sorted_token_ids"),
        py::arg("sorted_slots"), py::arg("sorted_weights"), py::arg("expert_offsets"), py::arg("top_k"),
        py::arg("version"));
  m.def("forward_t1", &forward_t1,
        "one token from the router's top-k [1, k], no RoutingPlan: y [1, H] bf16, or None where this path does not "
        "take the call", py::arg("x"), py::arg("w13_packed"), py::arg("w13_scales"), py::arg("w13_zeros"),
        py::arg("w13_group_size"), py::arg("w2_packed"), py::arg("w2_scales"), py::arg("w2_zeros"),
        py::arg("w2_group_size"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("version"));
  m.def("set_programmatic_launch", [](bool enabled) { moe_int4_set_programmatic_launch(enabled ? 1 : 0); },
        "on sm_90+, let each kernel start while the previous one finishes (default on; same results either way)",
        py::arg("enabled"));
  m.def("path", &path, "the kernel path (1 = v1, 4/16 = v2/v3 load width, 64 = v4/v5 tensor cores, 0 = invalid)",
        py::arg("version"), py::arg("K"), py::arg("group_size"), py::arg("packed"), py::arg("activations"));
}
