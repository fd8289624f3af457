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
//
// The indexed kernel takes rows at different layers of a stack: down [L, R, K], up [L, N, R], scaling [L],
// index [M] in [-1, L), ranks [L] in [0, R] or null (every layer of rank R), bias null, [N] or (with
// bias_per_layer) [L, N]. Row m with i = index[m], r_i = ranks[i]:
//
//   y[m] = x[m] @ weight^T + scaling[i] * (x[m] @ down[i, :r_i]^T) @ up[i, :, :r_i]^T + bias (or bias[i])
//
// and a row at i = -1 gets the shared weight alone (and a bias [N], not a bias [L, N]). Entries of down
// and up beyond a layer's rank are never read. One pass over the weight for all M rows, as above.
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

void lors_linear_indexed_forward_f32(const float* x, const float* weight, const float* down, const float* up,
                                     const float* bias, bool bias_per_layer, const float* scaling,
                                     const int64_t* index, const int64_t* ranks, float* y, int64_t m, int64_t n,
                                     int64_t k, int64_t l, int64_t r, int num_threads);

void lors_linear_indexed_forward_bf16(const uint16_t* x, const uint16_t* weight, const uint16_t* down,
                                      const uint16_t* up, const uint16_t* bias, bool bias_per_layer,
                                      const float* scaling, const int64_t* index, const int64_t* ranks,
                                      uint16_t* y, int64_t m, int64_t n, int64_t k, int64_t l, int64_t r,
                                      int num_threads);

}  // namespace cpu
}  // namespace lors_kernels
