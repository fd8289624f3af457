// The GPU top-k selection (csrc/cuda/hrca.cu) run serially on the host, through the functions of
// csrc/cuda/topk_select.h that the kernel runs: the same sum over queries, keys, digit passes (bins
// found lane run by lane run, as the kernel's warp does) and chunked index-order compaction. What it
// cannot run is the kernel's parallel bookkeeping: histogram atomics, warp scans, ballots.
// python_tests/hrca/test_cuda.py builds it with the host compiler and calls it through ctypes.
#include <stdint.h>

#include <vector>

#include "cuda/topk_select.h"

namespace topk = lors_kernels::cuda::topk;

extern "C" {

uint32_t lors_order_key(float value) { return topk::order_key(value); }

// scores: one row's maps_per_row maps of low_h * low_w (summed in order, as the kernel's shared rows).
// chunk: pixels per compaction step (the kernel's block size). Writes k indices; returns how many the
// compaction took (k when the passes found the threshold right), or UINT32_MAX where a slot would
// lie past k (a write out of bounds, in the kernel).
uint32_t lors_select_topk_host(const float* scores, int64_t maps_per_row, int low_h, int low_w, int high_h,
                               int high_w, uint32_t k, int chunk, int64_t* out) {
  const int n_low = low_h * low_w, pixels = high_h * high_w;
  std::vector<float> low(n_low);
  for (int c = 0; c < n_low; ++c) {
    float sum = 0.0f;
    for (int64_t q = 0; q < maps_per_row; ++q) sum += scores[q * n_low + c];
    low[c] = sum;
  }
  const topk::Upsampled map{low.data(), low_h, low_w, high_w, topk::axis_scale(low_h, high_h),
                            topk::axis_scale(low_w, high_w)};

  topk::Narrowing s{0u, k};
  for (int pass = 0; pass < topk::kPasses; ++pass) {
    uint32_t hist[topk::kBins] = {};
    for (int pixel = 0; pixel < pixels; ++pixel) {
      const uint32_t key = map.key(pixel);
      if (topk::matches_prefix(key, s.prefix, pass)) ++hist[topk::bin_of(key, pass)];
    }
    constexpr int kRun = topk::kBins / 32;
    uint32_t above = 0;
    for (int lane = 0; lane < 32; ++lane) {
      const uint32_t* run = hist + lane * kRun;
      uint32_t in_run = 0;
      for (int j = 0; j < kRun; ++j) in_run += run[j];
      if (above < s.remaining && s.remaining <= above + in_run) {
        const int j = topk::find_bin(run, kRun, s.remaining, &above);
        s = topk::narrow(s, pass, static_cast<uint32_t>(lane * kRun + j), above);
        break;
      }
      above += in_run;
    }
  }

  const uint32_t threshold = s.prefix, wanted_ties = s.remaining;
  uint32_t taken = 0, taken_ties = 0;
  for (int base = 0; base < pixels && taken < k; base += chunk) {
    uint32_t above_before = 0, ties_before = 0;
    for (int pixel = base; pixel < base + chunk && pixel < pixels; ++pixel) {
      const uint32_t key = map.key(pixel);
      const bool above = key > threshold, tied = key == threshold;
      if (above || (tied && taken_ties + ties_before < wanted_ties)) {
        const uint32_t slot = taken + above_before + topk::ties_taken_before(wanted_ties, taken_ties, ties_before);
        if (slot >= k) return UINT32_MAX;
        out[slot] = pixel;
      }
      above_before += above;
      ties_before += tied;
    }
    const uint32_t chunk_ties = topk::ties_taken_before(wanted_ties, taken_ties, ties_before);
    taken += above_before + chunk_ties;
    taken_ties += chunk_ties;
  }
  return taken;
}

}  // extern "C"
