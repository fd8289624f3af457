// Shared pieces of the CPU kernels: fp32/bf16 loads and stores, eight-lane fp32 vectors, and the
// multiversioning attribute. Header-only and forced inline, so that each kernel's instruction-set
// clones inline them with their own ISA.
#pragma once

#include <cstdint>
#include <cstring>

// Function multiversioning: a kernel's hot entry points get an AVX2+FMA clone picked once at load
// time (ifunc), so the library runs on any x86-64 without -march=native. Elsewhere: one generic build.
// LORS_MULTIVERSION_AVX512 adds an AVX-512 clone, for register-blocked products: still 8-lane
// vectors, but EVEX-encoded (32 registers, broadcasts folded into the FMAs): 2-3% on adaptive mixing's
// small GEMMs, up to 12% on those with K = 16.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define LORS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#define LORS_MULTIVERSION_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GLIBC__) && defined(__clang__) && __clang_major__ >= 14
#define LORS_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#define LORS_MULTIVERSION_AVX512 LORS_MULTIVERSION
#else
#define LORS_MULTIVERSION
#define LORS_MULTIVERSION_AVX512
#endif

// Everything the clones call is forced inline: an out-of-line helper would get the baseline ISA only.
#if defined(__GNUC__)
#define LORS_INLINE inline __attribute__((always_inline))
#else
#define LORS_INLINE inline
#endif

namespace lors_kernels {
namespace cpu {

LORS_INLINE float widen(float v) { return v; }

LORS_INLINE float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

LORS_INLINE void store(float v, float* out) { *out = v; }

// Round to nearest even; NaN stays a (quiet) NaN.
LORS_INLINE void store(float v, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = static_cast<uint16_t>((bits >> 16) | 0x0040u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

// Eight fp32 lanes: GCC/clang vector extensions (SSE2 pairs or AVX2 registers, by clone), else a struct
// (LORS_NO_VECTOR_EXT forces the struct, so that the portable path can be compiled in a test).
#if defined(__GNUC__) && !defined(LORS_NO_VECTOR_EXT)
#define LORS_VECTOR_EXT 1
#else
#define LORS_VECTOR_EXT 0
#endif

#if LORS_VECTOR_EXT
// Only passed between always-inlined functions: the note about the ABI of 32-byte vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x8 __attribute__((vector_size(32)));

LORS_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

LORS_INLINE f32x8 load8(const uint16_t* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 half;
  std::memcpy(&half, p, sizeof half);
  const u32x8 bits = __builtin_convertvector(half, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

LORS_INLINE f32x8 broadcast8(float s) {
#if defined(__clang__) || __GNUC__ >= 12
  // Lane 0 shuffled into every lane. GCC 12 builds a {s, s, ...} constructor, inlined from baseline
  // code into an AVX2 clone, from 8 inserts; this is a vbroadcastss (for a vector times a scalar in a
  // hot loop, v * s is better still: a vbroadcastss straight from memory).
  f32x8 v = {};
  v[0] = s;
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
#else
  return f32x8{s, s, s, s, s, s, s, s};
#endif
}

LORS_INLINE void store8(const f32x8& v, float* p) { std::memcpy(p, &v, sizeof v); }

// Round to nearest even, lane by lane as store(float, uint16_t*) does.
LORS_INLINE void store8(const f32x8& v, uint16_t* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u32x8 bits;
  std::memcpy(&bits, &v, sizeof bits);
  const u32x8 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const u32x8 quiet_nan = (bits >> 16) | 0x0040u;
  const u32x8 half = (bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
  const u16x8 out = __builtin_convertvector(half, u16x8);
  std::memcpy(p, &out, sizeof out);
}

// max(v, 0); NaN stays NaN, as torch.relu keeps it.
LORS_INLINE f32x8 relu8(const f32x8& v) { return v < 0.f ? f32x8{} : v; }

// v where key > 0, else 0 (the gradient through a ReLU of key).
LORS_INLINE f32x8 where_positive(const f32x8& key, const f32x8& v) { return key > 0.f ? v : f32x8{}; }
#else
struct f32x8 {
  float v[8];
  float operator[](int i) const { return v[i]; }
  f32x8& operator+=(const f32x8& o) {
    for (int i = 0; i < 8; ++i) v[i] += o.v[i];
    return *this;
  }
  friend f32x8 operator*(f32x8 a, const f32x8& b) {
    for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
    return a;
  }
  friend f32x8 operator*(f32x8 a, float s) {
    for (int i = 0; i < 8; ++i) a.v[i] *= s;
    return a;
  }
  friend f32x8 operator+(f32x8 a, const f32x8& b) { return a += b; }
  friend f32x8 operator-(f32x8 a, const f32x8& b) {
    for (int i = 0; i < 8; ++i) a.v[i] -= b.v[i];
    return a;
  }
};

template <class T>
LORS_INLINE f32x8 load8(const T* p) {
  f32x8 v;
  for (int i = 0; i < 8; ++i) v.v[i] = widen(p[i]);
  return v;
}

LORS_INLINE f32x8 broadcast8(float s) { return f32x8{{s, s, s, s, s, s, s, s}}; }

template <class T>
LORS_INLINE void store8(const f32x8& v, T* p) {
  for (int i = 0; i < 8; ++i) store(v.v[i], p + i);
}

LORS_INLINE f32x8 relu8(f32x8 v) {
  for (int i = 0; i < 8; ++i) v.v[i] = v.v[i] < 0.f ? 0.f : v.v[i];
  return v;
}

LORS_INLINE f32x8 where_positive(const f32x8& key, f32x8 v) {
  for (int i = 0; i < 8; ++i) v.v[i] = key.v[i] > 0.f ? v.v[i] : 0.f;
  return v;
}
#endif

// The last n < 8 elements, zero-padded: 0 * 0 adds nothing.
template <class T>
LORS_INLINE f32x8 load8_tail(const T* p, int64_t n) {
  T buf[8] = {};
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(T));
  return load8(buf);
}

// The first n < 8 lanes of v.
template <class T>
LORS_INLINE void store8_tail(const f32x8& v, T* p, int64_t n) {
  T buf[8];
  store8(v, buf);
  std::memcpy(p, buf, static_cast<size_t>(n) * sizeof(T));
}

// The lanes of one accumulator are summed in this tree: ((0+4) + (2+6)) + ((1+5) + (3+7)).
LORS_INLINE float hsum(const f32x8& v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

// r[i][j] <- r[j][i]: an 8 x 8 block transposed in registers (24 shuffles), else through memory.
LORS_INLINE void transpose8x8(f32x8 (&r)[8]) {
#if LORS_VECTOR_EXT && (defined(__clang__) || __GNUC__ >= 12)  // __builtin_shufflevector
  f32x8 a[8], b[8];
  for (int i = 0; i < 4; ++i) {  // interleave row pairs: a[2i] = r0[0] r1[0] r0[1] r1[1] | r0[4] r1[4] ..
    a[2 * i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    a[2 * i + 1] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {  // pairs of pairs: b[i] = r0[i] r1[i] r2[i] r3[i] | r0[i+4] .. (and rows 4-7)
    for (int j = 0; j < 2; ++j) {
      b[4 * i + 2 * j] = __builtin_shufflevector(a[4 * i + j], a[4 * i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      b[4 * i + 2 * j + 1] = __builtin_shufflevector(a[4 * i + j], a[4 * i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int i = 0; i < 4; ++i) {  // the 128-bit halves: rows 0-3 low, rows 4-7 high
    r[i] = __builtin_shufflevector(b[i], b[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[i + 4] = __builtin_shufflevector(b[i], b[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
#else
  float m[8][8];
  for (int i = 0; i < 8; ++i) store8(r[i], m[i]);
  for (int i = 0; i < 8; ++i) {
    float t[8];
    for (int j = 0; j < 8; ++j) t[j] = m[j][i];
    r[i] = load8(t);
  }
#endif
}

// A hint to bring the cache line holding p closer (write: about to be written).
LORS_INLINE void prefetch(const void* p, bool write) {
#if defined(__GNUC__)
  if (write) {
    __builtin_prefetch(p, 1, 3);
  } else {
    __builtin_prefetch(p, 0, 3);
  }
#else
  (void)p, (void)write;
#endif
}

}  // namespace cpu
}  // namespace lors_kernels
