// FASeg's high-resolution cross-attention on the GPU: the top-k pixel selection. A raw-pointer
// launcher without torch headers (csrc/bindings/hrca.cpp wraps it).
//
// scores [images, queries, low_h * low_w] (dense, row-major) are low-resolution attention scores. A
// selection row is one map: an image's scores summed over its queries (shared), or one query's
// (per_query). For each row the launcher writes the indices (row-major into high_h x high_w) of the k
// largest pixels of the bilinearly upsampled map (F.interpolate, mode="bilinear",
// align_corners=False), ties to the lower index, sorted ascending:
//   out [images, k] (shared) or [images, queries, k] (per_query), int64.
//
// Numerics, those of the Triton kernel (lors_kernels/hrca/triton.py): scores widened to fp32, the sum
// over queries in fp32, taps and interpolation in fp32 (topk_select.h). The Triton path sums with
// torch's .sum, whose order may differ: maps can differ in the last bit, and with them the choice
// between pixels whose values are that close. NaN: see topk::order_key.
//
// One thread block per row, no workspace: the low-resolution map sits in shared memory and every
// pass recomputes the upsampled values from it (4 radix passes, then one compaction pass that writes
// the chosen indices in index order, so the output comes out sorted).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace lors_kernels {
namespace cuda {

// The low-resolution map of a row lives in shared memory: at most this many cells (32 KiB of fp32).
constexpr int64_t kTopkMaxLowCells = 8192;
// Pixels are int32, and a block's loops step past the last one by up to a block: room is kept.
constexpr int64_t kTopkMaxPixels = int64_t{1} << 30;

// Returns cudaErrorInvalidValue (launching nothing) unless: sizes positive, low_h * low_w <=
// kTopkMaxLowCells, high_h * high_w <= kTopkMaxPixels, 1 <= k <= high_h * high_w, images and
// queries >= 0.
// A launch error is returned as cudaGetLastError() reports it; the kernel runs on `stream`.
cudaError_t select_topk_pixels(const void* scores, Dtype dtype, int64_t images, int64_t queries, int64_t low_h,
                               int64_t low_w, int64_t high_h, int64_t high_w, int64_t k, bool per_query,
                               int64_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace lors_kernels
