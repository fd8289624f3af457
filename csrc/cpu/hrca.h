// FASeg's high-resolution cross-attention on the CPU: raw-pointer kernels, no torch headers
// (csrc/bindings/hrca.cpp wraps them). Every array is dense row-major; num_threads, where taken, is the most
// OpenMP threads to use, and every result is bitwise independent of it.
#pragma once

#include <cstdint>

namespace lors_kernels {
namespace cpu {

// --- selection (hrca_selection.cpp): float64 values, ties to the lower index, NaN above everything
//     (torch.sort's order), output indices sorted ascending.

// cells: [rows, n_low] scores per low-resolution cell (already summed over queries). Keeps the k best
// cells of each row and expands each to its ws x ws window of the high-resolution map (low width lw):
// out [rows, k * ws * ws] int64, cells ascending, pixels row-major inside a window.
// Rows of at most a few thousand cells: one thread (another would cost more than it saves).
void select_windows(const double* cells, int64_t rows, int64_t lh, int64_t lw, int64_t ws, int64_t k,
                    int64_t* out);

// maps: [rows, lh * lw] low-resolution score maps. Each is upsampled to hh x hw (bilinear,
// align_corners=False, as F.interpolate: along x first, then y, each as a + w * (b - a)) on the fly,
// and the k largest upsampled pixels are kept: out [rows, k] int64, ascending. Working memory per thread
// O(lh * hw + k); the upsampled map is never stored.
void select_topk_pixels(const double* maps, int64_t rows, int64_t lh, int64_t lw, int64_t hh, int64_t hw,
                        int64_t k, int64_t* out, int num_threads);

// --- attention forward (hrca_attention.cpp), for inference and the training forward:
//     out[b, h, n] = sum_s softmax_s(scale * q[b, h, n] . k[b, h, i_s]) v[b, h, i_s]
// over the slots s of index[b, :] (shared, per_query = false) or index[b, n, :] (per query), entries -1
// skipped, duplicates counted once per occurrence. q [B, H, N, D], k/v [B, H, L, D], out [B, H, N, D],
// lse [B, H, N] fp32 (+inf where a row has no valid slot; its out is 0). Entries must be -1 or in [0, L)
// (the caller checks). fp32 accumulation; bf16 tensors are raw uint16 bit patterns.

void sparse_attention_forward_f32(const float* q, const float* k, const float* v, const int64_t* index,
                                  float* out, float* lse, int64_t b, int64_t h, int64_t n, int64_t l, int64_t s,
                                  int64_t d, bool per_query, float scale, int num_threads);

void sparse_attention_forward_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* index,
                                   uint16_t* out, float* lse, int64_t b, int64_t h, int64_t n, int64_t l,
                                   int64_t s, int64_t d, bool per_query, float scale, int num_threads);

}  // namespace cpu
}  // namespace lors_kernels
