// What every family's bindings share: error-message helpers and input checks. Only the files of
// csrc/bindings/*.cpp include torch; the kernels in csrc/cpu and csrc/cuda take raw pointers.
#pragma once

#include <torch/extension.h>

#include "bindings/register.h"

#include <string>
#include <utility>
#include <vector>

#ifdef LORS_WITH_CUDA
// c10's CUDA headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS and cuSPARSE headers, which
// a bare CUDA toolkit (enough for these kernels) may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/dtype.h"
#endif

namespace lors_kernels {
namespace bindings {

inline std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

using NamedTensors = std::vector<std::pair<const char*, const at::Tensor*>>;

// Every named tensor on the CPU, Float or BFloat16, and of the first one's dtype.
inline void check_cpu_float(const char* op, const NamedTensors& named) {
  const auto& [lead_name, lead] = named.front();
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op, ": ", name,
                     " has dtype ", t->scalar_type(), "; expected Float or BFloat16");
    TORCH_CHECK_TYPE(t->scalar_type() == lead->scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but ", lead_name, " has ", lead->scalar_type(), "; all tensors must share one dtype");
  }
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

#ifdef LORS_WITH_CUDA

inline cuda::Dtype cuda_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(), "; expected Float, Half or BFloat16");
  }
}

inline void check_cuda(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but the first input on ",
                    first.device(), "; all tensors must be on one device");
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

#endif  // LORS_WITH_CUDA

}  // namespace bindings
}  // namespace lors_kernels
