// Static LORS linear on the CPU: raw-pointer kernels, no torch headers (csrc/bindings/static.cpp wraps
// them).
//
//   y[M, N] = x[M, K] @ weight[N, K]^T + scaling * (x @ down[R, K]^T) @ up[N, R]^T + bias[N]
//
// Every array is dense row-major. bias may be null; M, N, K and R may be 0. bf16 arrays are raw
// uint16 bit patterns: widened to fp32 on load, accumulated in fp32 (t = x @ down^T included), rounded
// to nearest even on store. Made for few rows (decode, M <= 16: one pass over weight); any M works.
// num_threads: the most OpenMP threads to use (small problems use fewer); results are bitwise
// independent of it.
#pragma once

#include <cstdint>

namespace lors_kernels {
namespace cpu {

void lors_linear_forward_f32(const float* x, const float* weight, const float* down, const float* up,
                             const float* bias, float scaling, float* y, int64_t m, int64_t n, int64_t k,
                             int64_t r, int num_threads);

void lors_linear_forward_bf16(const uint16_t* x, const uint16_t* weight, const uint16_t* down,
                              const uint16_t* up, const uint16_t* bias, float scaling, uint16_t* y,
                              int64_t m, int64_t n, int64_t k, int64_t r, int num_threads);

}  // namespace cpu
}  // namespace lors_kernels
