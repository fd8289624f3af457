// Static LORS linear for decode on the GPU: a raw-pointer launcher, no torch headers
// (csrc/bindings/static.cpp wraps it).
//
//   y[M, N] = x[M, K] @ weight[N, K]^T + scaling * (x @ down[R, K]^T) @ up[N, R]^T + bias[N]
//
// For few rows (1 <= M <= kDecodeMaxRows) the product is bound by reading the shared weight once. One
// launch: a grid of (column tiles of N) x (splits of K); every block streams its slice of the weight
// rows of its tile, and the same slice of all of down, for all M rows of x. Its partial sums go to a
// workspace; the last block of a tile to finish (an atomic ticket) adds the tile's partials in split
// order, the low-rank term scaling * t @ up^T with t = x @ down^T, and bias. The order of every sum
// depends on the shapes and num_sms only, never on which block finishes last: results are
// deterministic.
//
// Arrays are dense row-major, 16-bit types as raw __half / __nv_bfloat16. fp32 accumulation
// throughout; t stays fp32 (the Triton kernel rounds scaling * t to the input dtype before its dot
// with up); y is rounded once, to nearest even. bias may be null; R may be 0 (down, up then unused).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace lors_kernels {
namespace cuda {

constexpr int64_t kDecodeMaxRows = 16;
// t = x @ down^T of a tile is reduced in shared memory next to x: the rank it has room for.
constexpr int64_t kDecodeMaxRank = 512;

struct DecodeWorkspace {
  size_t bytes;         // total, 16-byte aligned pieces
  size_t ticket_bytes;  // the first ticket_bytes: per-tile counters that must be zero at launch
};

// The workspace of lors_linear_decode for these sizes on a device with num_sms multiprocessors (the
// split of K depends on it: pass the same num_sms to both). Each launch leaves the tickets at zero
// again, so one workspace serves launches ordered on one stream after a single zero fill.
DecodeWorkspace lors_linear_decode_workspace(int64_t m, int64_t n, int64_t k, int64_t r, Dtype dtype, int num_sms);

// Returns cudaErrorInvalidValue (launching nothing) unless 1 <= m <= kDecodeMaxRows, n >= 1,
// k >= 0, 0 <= r <= kDecodeMaxRank, num_sms >= 1 and the split fits the grid. weight and down are
// read 16 bytes at a time when both are 16-byte aligned and K * sizeof(element) is a multiple of 16,
// element by element otherwise. A launch error is returned as cudaGetLastError() reports it.
cudaError_t lors_linear_decode(const void* x, const void* weight, const void* down, const void* up, const void* bias,
                               float scaling, void* y, int64_t m, int64_t n, int64_t k, int64_t r, Dtype dtype,
                               int num_sms, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace lors_kernels
