// Bindings of static LORS: checks, dense copies, dtype dispatch, and calls into csrc/cpu/static.cpp
// (and csrc/cuda/static.cu in CUDA builds).
#include "bindings/common.h"

#include <cstdint>
#include <optional>

#include "cpu/static.h"

#ifdef LORS_WITH_CUDA
#include <climits>

#include "cuda/static.h"
#endif

namespace lors_kernels {
namespace bindings {
namespace {

// The shapes of lors_linear's operands: x2 [M, K], weight [N, K], down [R, K], up [N, R], bias [N].
void check_lors_linear_shapes(const char* op, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                              const at::Tensor& up, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x2.dim() == 2, op, ": x2 must be 2-D [M, K], got ", shape_of(x2));
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got ", shape_of(weight));
  TORCH_CHECK_VALUE(down.dim() == 2, op, ": down must be 2-D [R, K], got ", shape_of(down));
  TORCH_CHECK_VALUE(up.dim() == 2, op, ": up must be 2-D [N, R], got ", shape_of(up));
  const int64_t k = x2.size(1), n = weight.size(0), r = down.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, op, ": weight ", shape_of(weight), " must be [N, K] with K = ", k,
                    " for x2 ", shape_of(x2));
  TORCH_CHECK_VALUE(down.size(1) == k, op, ": down ", shape_of(down), " must be [R, K] with K = ", k,
                    " for x2 ", shape_of(x2));
  TORCH_CHECK_VALUE(up.size(0) == n && up.size(1) == r, op, ": up ", shape_of(up), " must be [N, R] = [", n,
                    ", ", r, "] for weight ", shape_of(weight), " and down ", shape_of(down));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias ", shape_of(*bias), " must be [N] = [",
                      n, "] for weight ", shape_of(weight));
  }
}

// y [M, N] = x2 @ weight^T + scaling * (x2 @ down^T) @ up^T + bias
at::Tensor lors_linear_forward_cpu(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                                   const at::Tensor& up, const std::optional<at::Tensor>& bias,
                                   double scaling) {
  const char* op = "lors_linear_forward_cpu";
  NamedTensors named{{"x2", &x2}, {"weight", &weight}, {"down", &down}, {"up", &up}};
  if (bias.has_value()) named.emplace_back("bias", &*bias);
  check_cpu_float(op, named);
  check_lors_linear_shapes(op, x2, weight, down, up, bias);
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), r = down.size(0);

  // Dense row-major copies only where needed (weight, down, up are usually contiguous already).
  const at::Tensor xc = x2.contiguous(), wc = weight.contiguous(), dc = down.contiguous(), uc = up.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x2.options().memory_format(at::MemoryFormat::Contiguous));
  const int threads = at::get_num_threads();
  const float s = static_cast<float>(scaling);

  // Released: the kernel touches no Python object and may run for milliseconds.
  pybind11::gil_scoped_release no_gil;
  if (x2.scalar_type() == at::kFloat) {
    lors_kernels::cpu::lors_linear_forward_f32(
        xc.data_ptr<float>(), wc.data_ptr<float>(), dc.data_ptr<float>(), uc.data_ptr<float>(),
        bc.defined() ? bc.data_ptr<float>() : nullptr, s, y.data_ptr<float>(), m, n, k, r, threads);
  } else {
    // bf16 travels as its raw 16-bit pattern: the kernel widens and rounds itself.
    const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    lors_kernels::cpu::lors_linear_forward_bf16(
        bits(xc), bits(wc), bits(dc), bits(uc), bc.defined() ? bits(bc) : nullptr, s,
        reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), m, n, k, r, threads);
  }
  return y;
}

// The shapes of lors_linear_indexed's operands: x2 [M, K], weight [N, K], down [L, R, K], up [L, N, R],
// bias [N] or [L, N], scaling [L], index [M], ranks [L]; index and ranks int32 or int64.
void check_lors_linear_indexed_shapes(const char* op, const at::Tensor& x2, const at::Tensor& weight,
                                      const at::Tensor& down, const at::Tensor& up,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& scaling,
                                      const at::Tensor& index, const std::optional<at::Tensor>& ranks) {
  TORCH_CHECK_VALUE(x2.dim() == 2, op, ": x2 must be 2-D [M, K], got ", shape_of(x2));
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got ", shape_of(weight));
  TORCH_CHECK_VALUE(down.dim() == 3, op, ": down must be 3-D [L, R, K], got ", shape_of(down));
  TORCH_CHECK_VALUE(up.dim() == 3, op, ": up must be 3-D [L, N, R], got ", shape_of(up));
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), l = down.size(0), r = down.size(1);
  TORCH_CHECK_VALUE(weight.size(1) == k, op, ": weight ", shape_of(weight), " must be [N, K] with K = ", k,
                    " for x2 ", shape_of(x2));
  TORCH_CHECK_VALUE(down.size(2) == k, op, ": down ", shape_of(down), " must be [L, R, K] with K = ", k,
                    " for x2 ", shape_of(x2));
  TORCH_CHECK_VALUE(up.size(0) == l && up.size(1) == n && up.size(2) == r, op, ": up ", shape_of(up),
                    " must be [L, N, R] = [", l, ", ", n, ", ", r, "] for weight ", shape_of(weight), " and down ",
                    shape_of(down));
  if (bias.has_value()) {
    const bool shared = bias->dim() == 1 && bias->size(0) == n;
    const bool per_layer = bias->dim() == 2 && bias->size(0) == l && bias->size(1) == n;
    TORCH_CHECK_VALUE(shared || per_layer, op, ": bias ", shape_of(*bias), " must be [N] = [", n, "] or [L, N] = [",
                      l, ", ", n, "] for weight ", shape_of(weight), " and down ", shape_of(down));
  }
  TORCH_CHECK_VALUE(scaling.dim() == 1 && scaling.size(0) == l, op, ": scaling ", shape_of(scaling),
                    " must be [L] = [", l, "] for down ", shape_of(down));
  TORCH_CHECK_TYPE(scaling.is_floating_point(), op, ": scaling has dtype ", scaling.scalar_type(),
                   "; expected a floating dtype");
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == m, op, ": index ", shape_of(index), " must be [M] = [",
                    m, "] for x2 ", shape_of(x2));
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op, ": index has dtype ",
                   index.scalar_type(), "; expected Long or Int");
  if (ranks.has_value()) {
    TORCH_CHECK_VALUE(ranks->dim() == 1 && ranks->size(0) == l, op, ": ranks ", shape_of(*ranks),
                      " must be [L] = [", l, "] for down ", shape_of(down));
    TORCH_CHECK_TYPE(ranks->scalar_type() == at::kLong || ranks->scalar_type() == at::kInt, op,
                     ": ranks has dtype ", ranks->scalar_type(), "; expected Long or Int");
  }
}

// y [M, N]: row m = x2[m] @ weight^T + scaling[i] * (x2[m] @ down[i, :r_i]^T) @ up[i, :, :r_i]^T + bias,
// i = index[m] (-1: the shared weight alone), r_i = ranks[i] (or R); bias [N] or [L, N] (row m: bias[i]).
at::Tensor lors_linear_indexed_forward_cpu(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                                           const at::Tensor& up, const std::optional<at::Tensor>& bias,
                                           const at::Tensor& scaling, const at::Tensor& index,
                                           const std::optional<at::Tensor>& ranks) {
  const char* op = "lors_linear_indexed_forward_cpu";
  NamedTensors named{{"x2", &x2}, {"weight", &weight}, {"down", &down}, {"up", &up}};
  if (bias.has_value()) named.emplace_back("bias", &*bias);
  check_cpu_float(op, named);
  check_cpu(op, "scaling", scaling);
  check_cpu(op, "index", index);
  if (ranks.has_value()) check_cpu(op, "ranks", *ranks);
  check_lors_linear_indexed_shapes(op, x2, weight, down, up, bias, scaling, index, ranks);
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), l = down.size(0), r = down.size(1);

  // Dense row-major copies only where needed (weight, down, up are usually contiguous already); the
  // small per-row and per-layer tensors in the kernel's types.
  const at::Tensor xc = x2.contiguous(), wc = weight.contiguous(), dc = down.contiguous(), uc = up.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor sc = scaling.to(at::kFloat).contiguous(), ic = index.to(at::kLong).contiguous();
  const at::Tensor rc = ranks.has_value() ? ranks->to(at::kLong).contiguous() : at::Tensor();
  // O(M + L) on the host: an index or rank out of range would read outside down and up.
  const int64_t* index_ptr = ic.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK_VALUE(index_ptr[i] >= -1 && index_ptr[i] < l, op, ": index[", i, "] = ", index_ptr[i],
                      " is outside [-1, L) = [-1, ", l, ")");
  }
  const int64_t* ranks_ptr = rc.defined() ? rc.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; ranks_ptr != nullptr && i < l; ++i) {
    TORCH_CHECK_VALUE(ranks_ptr[i] >= 0 && ranks_ptr[i] <= r, op, ": ranks[", i, "] = ", ranks_ptr[i],
                      " is outside [0, R] = [0, ", r, "]");
  }
  at::Tensor y = at::empty({m, n}, x2.options().memory_format(at::MemoryFormat::Contiguous));
  const int threads = at::get_num_threads();
  const bool per_layer = bc.defined() && bc.dim() == 2;
  const float* s = sc.data_ptr<float>();

  // Released: the kernel touches no Python object and may run for milliseconds.
  pybind11::gil_scoped_release no_gil;
  if (x2.scalar_type() == at::kFloat) {
    lors_kernels::cpu::lors_linear_indexed_forward_f32(
        xc.data_ptr<float>(), wc.data_ptr<float>(), dc.data_ptr<float>(), uc.data_ptr<float>(),
        bc.defined() ? bc.data_ptr<float>() : nullptr, per_layer, s, index_ptr, ranks_ptr, y.data_ptr<float>(), m,
        n, k, l, r, threads);
  } else {
    // bf16 travels as its raw 16-bit pattern: the kernel widens and rounds itself.
    const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    lors_kernels::cpu::lors_linear_indexed_forward_bf16(
        bits(xc), bits(wc), bits(dc), bits(uc), bc.defined() ? bits(bc) : nullptr, per_layer, s, index_ptr,
        ranks_ptr, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), m, n, k, l, r, threads);
  }
  return y;
}

#ifdef LORS_WITH_CUDA

// y [M, N] = x2 @ weight^T + scaling * (x2 @ down^T) @ up^T + bias for decode batches (M <= 16).
at::Tensor lors_linear_forward_cuda(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                                    const at::Tensor& up, const std::optional<at::Tensor>& bias, double scaling) {
  const char* op = "lors_linear_forward_cuda";
  NamedTensors named{{"x2", &x2}, {"weight", &weight}, {"down", &down}, {"up", &up}};
  if (bias.has_value()) named.emplace_back("bias", &*bias);
  const auto dtype = cuda_dtype(x2, op, "x2");
  for (const auto& [name, t] : named) {
    check_cuda(*t, x2, op, name);
    TORCH_CHECK_TYPE(t->scalar_type() == x2.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but x2 has ", x2.scalar_type(), "; all tensors must share one dtype");
  }
  check_lors_linear_shapes(op, x2, weight, down, up, bias);
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), r = down.size(0);
  TORCH_CHECK_VALUE(m <= lors_kernels::cuda::kDecodeMaxRows, op, ": x2 has M = ", m,
                    " rows; the decode kernel takes at most ", lors_kernels::cuda::kDecodeMaxRows);
  TORCH_CHECK_VALUE(r <= lors_kernels::cuda::kDecodeMaxRank, op, ": rank R = ", r,
                    " is above the decode kernel's ", lors_kernels::cuda::kDecodeMaxRank);
  TORCH_CHECK_VALUE(n <= INT_MAX && k <= INT_MAX, op, ": N = ", n, " and K = ", k, " must be below 2^31");

  c10::cuda::CUDAGuard guard(x2.device());
  at::Tensor y = at::empty({m, n}, x2.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || n == 0) return y;
  const at::Tensor xc = x2.contiguous(), wc = weight.contiguous(), dc = down.contiguous(), uc = up.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x2.get_device()));
  const auto space = lors_kernels::cuda::lors_linear_decode_workspace(m, n, k, r, dtype, num_sms);
  // A fresh workspace per call (the caching allocator makes that cheap); only its tickets need zeros.
  at::Tensor workspace = at::empty({static_cast<int64_t>(space.bytes)}, x2.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cudaMemsetAsync(workspace.data_ptr(), 0, space.ticket_bytes, stream), op);
  check_launch(lors_kernels::cuda::lors_linear_decode(xc.data_ptr(), wc.data_ptr(), dc.data_ptr(), uc.data_ptr(),
                                                      bc.defined() ? bc.data_ptr() : nullptr,
                                                      static_cast<float>(scaling), y.data_ptr(), m, n, k, r, dtype,
                                                      num_sms, workspace.data_ptr(), stream),
               op);
  return y;
}

#endif  // LORS_WITH_CUDA

}  // namespace

void register_static(pybind11::module_& m) {
  m.def("lors_linear_forward_cpu", &lors_linear_forward_cpu, pybind11::arg("x2"), pybind11::arg("weight"),
        pybind11::arg("down"), pybind11::arg("up"), pybind11::arg("bias"), pybind11::arg("scaling"),
        "Static LORS linear forward on CPU: x2 [M, K] @ weight[N, K]^T + scaling * (x2 @ down[R, K]^T) @ "
        "up[N, R]^T + bias[N] -> [M, N]; float32 or bfloat16. Built for few rows (M <= 16): one pass over "
        "the weight.");
  m.def("lors_linear_indexed_forward_cpu", &lors_linear_indexed_forward_cpu, pybind11::arg("x2"),
        pybind11::arg("weight"), pybind11::arg("down"), pybind11::arg("up"), pybind11::arg("bias"),
        pybind11::arg("scaling"), pybind11::arg("index"), pybind11::arg("ranks"),
        "Indexed static LORS linear forward on CPU, rows at different layers: row m of x2 [M, K] at layer i = "
        "index[m] gives x2[m] @ weight[N, K]^T + scaling[i] * (x2[m] @ down[i, :r, :]^T) @ up[i, :, :r]^T + bias "
        "-> [M, N], with down [L, R, K], up [L, N, R], scaling [L], r = ranks[i] (ranks [L] or None: R), bias "
        "None, [N] or [L, N] (bias[i]); index -1: weight alone (and a bias [N]). float32 or bfloat16; index and "
        "ranks int32 or int64. One pass over the weight for all rows.");
#ifdef LORS_WITH_CUDA
  m.def("lors_linear_forward_cuda", &lors_linear_forward_cuda, pybind11::arg("x2"), pybind11::arg("weight"),
        pybind11::arg("down"), pybind11::arg("up"), pybind11::arg("bias"), pybind11::arg("scaling"),
        "Static LORS linear forward on CUDA for decode (M <= 16, R <= 512): x2 [M, K] @ weight[N, K]^T + scaling * "
        "(x2 @ down[R, K]^T) @ up[N, R]^T + bias[N] -> [M, N]; float32, float16 or bfloat16. One launch, split-K, "
        "deterministic.");
#endif
}

}  // namespace bindings
}  // namespace lors_kernels
