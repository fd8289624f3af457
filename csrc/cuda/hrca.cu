// Top-k pixel selection (hrca.h): a radix select over the keys of the upsampled map, which is never
// stored. One block per selection row:
//
//   1. the row's low-resolution map (summed over queries when shared) goes to shared memory, in fp32;
//   2. 4 passes, one per 8-bit digit of the keys from the top: a shared-memory histogram of the digit
//      over the keys that match the threshold's digits found so far, then one warp finds the bin that
//      holds the k-th largest key, which fixes the next digit of the threshold (topk_select.h);
//   3. one compaction pass in index order, a block-wide chunk of pixels at a time: keys above the
//      threshold are taken, and keys equal to it while fewer than the ties still wanted have been. A
//      pixel's output slot is the count of pixels taken before it, so the indices come out ascending
//      and the result is deterministic (no atomics decide where anything goes).
//
// Every pass recomputes each pixel's value from the four taps: O(high_h * high_w) work per pass, no
// global scratch. Recomputation gives bitwise the same key each time (same code, same inputs).
#include "hrca.h"

#include <climits>

#include "numeric.cuh"
#include "topk_select.h"

namespace lors_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == 32, "the compaction scans per-warp counts with one warp's lanes");
constexpr unsigned kAllLanes = 0xffffffffu;

// Inclusive sum over the lanes of the warp, lane 0 first.
__device__ __forceinline__ uint32_t lane_prefix_sum(uint32_t value, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t lower = __shfl_up_sync(kAllLanes, value, offset);
    if (lane >= offset) value += lower;
  }
  return value;
}

// maps_per_row: 1 (per query) or the number of queries (shared: their maps are summed).
template <class T>
__global__ void __launch_bounds__(kThreads) topk_pixels_kernel(const T* scores, int64_t maps_per_row, int low_h,
                                                               int low_w, int high_h, int high_w, float scale_y,
                                                               float scale_x, uint32_t k, int64_t* out) {
  extern __shared__ float low[];               // [low_h * low_w]
  __shared__ uint32_t hist[topk::kBins];       // candidates per bin of the current digit
  __shared__ topk::Narrowing narrowing;        // warp 0's result of a pass, for every thread
  __shared__ uint32_t warp_counts[2][2][kWarps];  // [chunk parity][above, tied][warp]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t row = blockIdx.x;
  const int n_low = low_h * low_w;
  const int pixels = high_h * high_w;

  const T* maps = scores + row * maps_per_row * n_low;
  for (int c = tid; c < n_low; c += kThreads) {
    float sum = 0.0f;
    for (int64_t q = 0; q < maps_per_row; ++q) sum += to_float(maps[q * n_low + c]);
    low[c] = sum;
  }
  __syncthreads();
  const topk::Upsampled map{low, low_h, low_w, high_w, scale_y, scale_x};

  topk::Narrowing s{0u, k};
  for (int pass = 0; pass < topk::kPasses; ++pass) {
    for (int b = tid; b < topk::kBins; b += kThreads) hist[b] = 0;
    __syncthreads();
    // Same trip count in every lane of a warp: they all meet in the ballot and match below.
    for (int base = 0; base < pixels; base += kThreads) {
      const int pixel = base + tid;
      bool candidate = false;
      uint32_t bin = 0;
      if (pixel < pixels) {
        const uint32_t key = map.key(pixel);
        candidate = topk::matches_prefix(key, s.prefix, pass);
        bin = topk::bin_of(key, pass);
      }
      // A smooth map puts most keys of a warp in one bin: the lanes of a bin add once, together.
      const unsigned voters = __ballot_sync(kAllLanes, candidate);
      if (candidate) {
        const unsigned same_bin = __match_any_sync(voters, bin);
        if (lane == __ffs(same_bin) - 1) atomicAdd(&hist[bin], static_cast<uint32_t>(__popc(same_bin)));
      }
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns a run of bins [l * kRun, (l + 1) * kRun); the lane whose run holds the
      // remaining-th largest candidate finds its bin.
      constexpr int kRun = topk::kBins / 32;
      const uint32_t* run = hist + lane * kRun;
      uint32_t in_run = 0;
#pragma unroll
      for (int j = 0; j < kRun; ++j) in_run += run[j];
      const uint32_t through = lane_prefix_sum(in_run, lane);
      uint32_t above = through - in_run;
      if (above < s.remaining && s.remaining <= through) {
        const int j = topk::find_bin(run, kRun, s.remaining, &above);
        narrowing = topk::narrow(s, pass, static_cast<uint32_t>(lane * kRun + j), above);
      }
    }
    __syncthreads();
    s = narrowing;  // rewritten only after two more barriers: every thread has read it by then
  }

  // s.prefix is now the k-th largest key; k - s.remaining keys lie above it, s.remaining ties are taken.
  const uint32_t threshold = s.prefix, wanted_ties = s.remaining;
  int64_t* row_out = out + row * k;
  uint32_t taken = 0, taken_ties = 0;  // the same in every thread: updated from block-wide totals
  const unsigned lower_lanes = (1u << lane) - 1u;
  // warp_counts is double-buffered by chunk parity: one barrier per chunk (a warp may write the next
  // chunk's counts while a slower one still reads this chunk's).
  for (int base = 0, parity = 0; base < pixels && taken < k; base += kThreads, parity ^= 1) {
    const int pixel = base + tid;
    const uint32_t key = pixel < pixels ? map.key(pixel) : 0u;
    const bool above = pixel < pixels && key > threshold;
    const bool tied = pixel < pixels && key == threshold;
    const unsigned above_lanes = __ballot_sync(kAllLanes, above);
    const unsigned tied_lanes = __ballot_sync(kAllLanes, tied);
    if (lane == 0) {
      warp_counts[parity][0][warp] = __popc(above_lanes);
      warp_counts[parity][1][warp] = __popc(tied_lanes);
    }
    __syncthreads();
    // Lane w of every warp reads warp w's counts: prefix sums over lanes are prefix sums over warps.
    const uint32_t above_in_warp = warp_counts[parity][0][lane], tied_in_warp = warp_counts[parity][1][lane];
    const uint32_t above_through = lane_prefix_sum(above_in_warp, lane);
    const uint32_t tied_through = lane_prefix_sum(tied_in_warp, lane);
    const uint32_t above_before =
        __shfl_sync(kAllLanes, above_through - above_in_warp, warp) + __popc(above_lanes & lower_lanes);
    const uint32_t ties_before =
        __shfl_sync(kAllLanes, tied_through - tied_in_warp, warp) + __popc(tied_lanes & lower_lanes);
    const uint32_t ties_taken_before = topk::ties_taken_before(wanted_ties, taken_ties, ties_before);
    if (above || (tied && taken_ties + ties_before < wanted_ties)) {  // a tie: among the first wanted
      row_out[taken + above_before + ties_taken_before] = pixel;
    }
    const uint32_t chunk_ties =
        topk::ties_taken_before(wanted_ties, taken_ties, __shfl_sync(kAllLanes, tied_through, 31));
    taken += __shfl_sync(kAllLanes, above_through, 31) + chunk_ties;
    taken_ties += chunk_ties;
  }
}

template <class T>
void launch(const void* scores, int64_t rows, int64_t maps_per_row, int low_h, int low_w, int high_h, int high_w,
            uint32_t k, int64_t* out, cudaStream_t stream) {
  const float scale_y = topk::axis_scale(low_h, high_h), scale_x = topk::axis_scale(low_w, high_w);
  const size_t low_bytes = sizeof(float) * static_cast<size_t>(low_h) * low_w;
  topk_pixels_kernel<T><<<static_cast<unsigned>(rows), kThreads, low_bytes, stream>>>(
      static_cast<const T*>(scores), maps_per_row, low_h, low_w, high_h, high_w, scale_y, scale_x, k, out);
}

}  // namespace

cudaError_t select_topk_pixels(const void* scores, Dtype dtype, int64_t images, int64_t queries, int64_t low_h,
                               int64_t low_w, int64_t high_h, int64_t high_w, int64_t k, bool per_query,
                               int64_t* out, cudaStream_t stream) {
  const bool sizes_ok = low_h > 0 && low_w > 0 && low_h <= kTopkMaxLowCells && low_w <= kTopkMaxLowCells &&
                        low_h * low_w <= kTopkMaxLowCells && high_h > 0 && high_w > 0 && high_h <= kTopkMaxPixels &&
                        high_w <= kTopkMaxPixels && high_h * high_w <= kTopkMaxPixels && k >= 1 &&
                        k <= high_h * high_w && images >= 0 && queries >= 0;
  if (!sizes_ok) return cudaErrorInvalidValue;
  const int64_t rows = per_query ? images * queries : images;
  if (rows == 0) return cudaSuccess;
  if (rows > INT_MAX) return cudaErrorInvalidValue;  // one block per row: gridDim.x < 2^31
  const int64_t maps_per_row = per_query ? 1 : queries;
  const auto kk = static_cast<uint32_t>(k);
  const int lh = static_cast<int>(low_h), lw = static_cast<int>(low_w);
  const int hh = static_cast<int>(high_h), hw = static_cast<int>(high_w);
  switch (dtype) {
    case Dtype::kFloat32: launch<float>(scores, rows, maps_per_row, lh, lw, hh, hw, kk, out, stream); break;
    case Dtype::kFloat16: launch<__half>(scores, rows, maps_per_row, lh, lw, hh, hw, kk, out, stream); break;
    case Dtype::kBFloat16: launch<__nv_bfloat16>(scores, rows, maps_per_row, lh, lw, hh, hw, kk, out, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lors_kernels
