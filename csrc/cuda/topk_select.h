// The arithmetic of the top-k pixel selection (hrca.cu) as __host__ __device__ functions: the kernel
// runs them on the GPU, and a host test (python_tests/native/topk_host.cpp) runs the same functions
// through the same passes on the CPU. No CUDA headers needed: g++ compiles this file as plain C++.
//
// A pixel's value is the bilinearly upsampled low-resolution score (F.interpolate, mode="bilinear",
// align_corners=False), computed from the four taps on demand. Values become order-preserving uint32
// keys; a radix select over 4 digits of 8 bits finds the k-th largest key (the threshold), narrowing a
// prefix of the threshold one digit per pass.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define LORS_HD __host__ __device__ __forceinline__
#else
#define LORS_HD inline
#endif

namespace lors_kernels {
namespace cuda {
namespace topk {

// One axis of F.interpolate(bilinear, align_corners=False): output position pos reads inputs i0 and
// i1 with weight w on i1. scale = in_size / out_size rounded to fp32. (pos + 0.5) * scale - 0.5 is one
// fused multiply-add, as in the Triton kernel's compiled code (its PTX has fma.rn.f32 here and in the
// interpolation below: Triton fuses by default).
struct Tap {
  int i0;
  int i1;
  float w;
};

LORS_HD Tap source_tap(int pos, float scale, int in_size) {
  const float src = fmaxf(fmaf(static_cast<float>(pos) + 0.5f, scale, -0.5f), 0.0f);
  const int below = static_cast<int>(src);  // src >= 0: truncation is floor
  const int i0 = below < in_size - 1 ? below : in_size - 1;
  return {i0, i0 + 1 < in_size ? i0 + 1 : in_size - 1, src - static_cast<float>(i0)};
}

// a + w (b - a), one rounding of the product and sum: where both taps are equal (clamped borders,
// flat regions) the result is exactly a, so equal pixels tie and go by index. A tap of weight 0 is left
// out and an infinite a kept, where the formula would make NaN of both (the reference's _lerp).
LORS_HD float lerp(float a, float b, float w) {
  if (w == 0.0f || a == b) return a;
  return isinf(a) ? a + b : fmaf(w, b - a, a);
}

// The upsampled value at the pixel whose row taps are y and column taps x; low is row-major, low_w wide.
LORS_HD float bilinear(const float* low, int low_w, Tap y, Tap x) {
  const float* top = low + y.i0 * low_w;
  const float* bottom = low + y.i1 * low_w;
  return lerp(lerp(top[x.i0], top[x.i1], x.w), lerp(bottom[x.i0], bottom[x.i1], x.w), y.w);
}

// Unsigned order of keys = float order of values: negative floats have their bits flipped (larger
// magnitude, smaller key), positive ones get the sign bit set (above every negative). -0.0 maps to
// the key of +0.0, which it equals. Every NaN, whatever its sign bit, gets the largest key (above +inf),
// as torch.topk ranks NaN.
LORS_HD uint32_t order_key(float value) {
  if (isnan(value)) return 0xFFFFFFFFu;
  uint32_t bits;
#ifdef __CUDA_ARCH__
  bits = __float_as_uint(value);
#else
  memcpy(&bits, &value, sizeof bits);
#endif
  if (bits == 0x80000000u) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// F.interpolate's scale of one axis, in_size / out_size, rounded to fp32 as the Triton kernel's
// float argument is.
LORS_HD float axis_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(static_cast<double>(in_size) / static_cast<double>(out_size));
}

// A selection row's upsampled map: its low-resolution map (row-major, low_h x low_w) and the two
// axes' scales. Pixel p is row p / high_w, column p % high_w of the high-resolution map.
struct Upsampled {
  const float* low;
  int low_h, low_w, high_w;
  float scale_y, scale_x;

  LORS_HD uint32_t key(int pixel) const {
    const int py = pixel / high_w;
    const int px = pixel - py * high_w;
    return order_key(bilinear(low, low_w, source_tap(py, scale_y, low_h), source_tap(px, scale_x, low_w)));
  }
};

constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kPasses = 32 / kDigitBits;

// Pass p looks at the p-th digit from the top. Its histogram bins run from the highest digit down
// (bin 0 holds digit 255), so a scan from bin 0 meets the largest keys first.
LORS_HD int digit_shift(int pass) { return 32 - kDigitBits * (pass + 1); }
LORS_HD uint32_t bin_of(uint32_t key, int pass) { return (kBins - 1) - ((key >> digit_shift(pass)) & (kBins - 1)); }

// Whether key's digits before pass equal prefix's: the keys pass p still has to tell apart.
LORS_HD bool matches_prefix(uint32_t key, uint32_t prefix, int pass) {
  return pass == 0 || ((key ^ prefix) >> (32 - kDigitBits * pass)) == 0;
}

// What the passes so far have fixed: the threshold's leading digits (prefix) and how many keys with
// those digits are still to be taken (remaining). Every key above prefix's range is taken.
struct Narrowing {
  uint32_t prefix;
  uint32_t remaining;
};

// A run of consecutive bins, counts[j] candidates each, with *above candidates in the bins before
// it: the first bin j of the run whose candidates reach the remaining-th largest; *above becomes the
// candidates before bin j. Requires *above < remaining <= *above + sum(counts[0 .. bins)).
LORS_HD int find_bin(const uint32_t* counts, int bins, uint32_t remaining, uint32_t* above) {
  int j = 0;
  while (j + 1 < bins && remaining > *above + counts[j]) *above += counts[j++];
  return j;
}

// The state after pass `pass` chose bin b, with `above` candidates in the bins before b (all taken).
LORS_HD Narrowing narrow(Narrowing s, int pass, uint32_t b, uint32_t above) {
  return {s.prefix | (((kBins - 1) - b) << digit_shift(pass)), s.remaining - above};
}

// Compaction in index order, a chunk of pixels at a time. Keys above the threshold are all taken;
// keys equal to it are taken while fewer than `wanted` ties have been: with `taken_ties` taken in
// earlier chunks and `ties_before` tied pixels before this one in its chunk, the ties this chunk
// takes before it.
LORS_HD uint32_t ties_taken_before(uint32_t wanted, uint32_t taken_ties, uint32_t ties_before) {
  return wanted - taken_ties < ties_before ? wanted - taken_ties : ties_before;
}

}  // namespace topk
}  // namespace cuda
}  // namespace lors_kernels
