// Loads and stores of the three element types as fp32 (device code of the csrc/cuda kernels only).
//
// torch builds CUDA sources with __CUDA_NO_HALF_CONVERSIONS__ and friends: every conversion here is
// an explicit intrinsic, so the kernels compile the same with and without those macros.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lors_kernels {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kVec consecutive elements at p, widened: one 16-byte load when kVec * sizeof(T) == 16 (p must then
// be 16-byte aligned), else kVec element loads.
template <int kVec, class T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[kVec]) {
  if constexpr (kVec * sizeof(T) == 16) {
    const uint4 bits = *reinterpret_cast<const uint4*>(p);
    T elems[kVec];
    static_assert(sizeof(elems) == sizeof(bits), "16 bytes of elements");
    __builtin_memcpy(elems, &bits, sizeof bits);
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = to_float(elems[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = to_float(p[e]);
  }
}

}  // namespace cuda
}  // namespace lors_kernels
