// Python bindings of lors_kernels._C: the one file that sees torch. Checks inputs, makes them dense,
// dispatches on dtype and calls the raw-pointer kernels of csrc/cpu (and csrc/cuda when built).
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cpu/lors_linear.h"

namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

std::vector<std::string> built_backends() {
  std::vector<std::string> backends{"cpu"};
#ifdef LORS_WITH_CUDA
  backends.emplace_back("cuda");
#endif
  return backends;
}

// y [M, N] = x2 @ weight^T + scaling * (x2 @ down^T) @ up^T + bias
at::Tensor lors_linear_forward_cpu(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                                   const at::Tensor& up, const std::optional<at::Tensor>& bias,
                                   double scaling) {
  const char* op = "lors_linear_forward_cpu";
  std::vector<std::pair<const char*, const at::Tensor*>> named{
      {"x2", &x2}, {"weight", &weight}, {"down", &down}, {"up", &up}};
  if (bias.has_value()) named.emplace_back("bias", &*bias);
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op, ": ", name,
                     " has dtype ", t->scalar_type(), "; expected Float or BFloat16");
    TORCH_CHECK_TYPE(t->scalar_type() == x2.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but x2 has ", x2.scalar_type(), "; all tensors must share one dtype");
  }
  TORCH_CHECK_VALUE(x2.dim() == 2, op, ": x2 must be 2-D [M, K], got ", shape_of(x2));
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got ", shape_of(weight));
  TORCH_CHECK_VALUE(down.dim() == 2, op, ": down must be 2-D [R, K], got ", shape_of(down));
  TORCH_CHECK_VALUE(up.dim() == 2, op, ": up must be 2-D [N, R], got ", shape_of(up));
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), r = down.size(0);
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lors_kernels native kernels (C++ CPU; CUDA when built with it)";
  m.def("built_backends", &built_backends, "Backends compiled into this module: 'cpu', plus 'cuda' if built.");
  m.def("lors_linear_forward_cpu", &lors_linear_forward_cpu, pybind11::arg("x2"), pybind11::arg("weight"),
        pybind11::arg("down"), pybind11::arg("up"), pybind11::arg("bias"), pybind11::arg("scaling"),
        "Static LORS linear forward on CPU: x2 [M, K] @ weight[N, K]^T + scaling * (x2 @ down[R, K]^T) @ "
        "up[N, R]^T + bias[N] -> [M, N]; float32 or bfloat16. Built for few rows (M <= 16): one pass over "
        "the weight.");
}
