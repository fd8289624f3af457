// Element types of the CUDA launchers' raw pointers. Plain C++: csrc/bindings/ (no nvcc) includes it.
#pragma once

namespace lors_kernels {
namespace cuda {

// float, __half, __nv_bfloat16; every kernel widens to fp32 on load and accumulates in fp32.
enum class Dtype { kFloat32, kFloat16, kBFloat16 };

}  // namespace cuda
}  // namespace lors_kernels
