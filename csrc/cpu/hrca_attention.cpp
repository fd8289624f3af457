// HRCA attention forward on the CPU: softmax attention of each query over the key rows its index set
// lists, reading K and V rows by index (no gathered copies).
//
// Work is split into tiles of up to kQueries queries of one (image, head) that share an index set (a
// shared set: consecutive queries; a per-query set: one query). A tile scores every slot (each key row
// is loaded once and used by all queries of the tile), takes a two-pass softmax over its [tile, S]
// logits (S is at most a few thousand: 8 x 4096 fp32 = 128 KiB, in L2), then sums the value rows
// weighted by the probabilities, each value row again loaded once per tile. Every sum runs in a fixed
// order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "hrca.h"
#include "vec.h"

namespace lors_kernels {
namespace cpu {
namespace {

constexpr int64_t kQueries = 8;

// A row as fp32: the row itself, or widened into buf (bf16).
template <class T>
LORS_INLINE const float* fp32_row(const T* row, int64_t d, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    (void)d, (void)buf;
    return row;
  } else {
    for (int64_t i = 0; i < d; ++i) buf[i] = widen(row[i]);
    return buf;
  }
}

LORS_INLINE float dot(const float* a, const float* b, int64_t d) {
  f32x8 acc = {};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc += load8(a + i) * load8(b + i);
  if (i < d) acc += load8_tail(a + i, d - i) * load8_tail(b + i, d - i);
  return hsum(acc);
}

// y += a * x over d elements.
LORS_INLINE void add_scaled(float a, const float* x, float* y, int64_t d) {
  int64_t i = 0;
#if LORS_VECTOR_EXT
  const f32x8 av = {a, a, a, a, a, a, a, a};
  for (; i + 8 <= d; i += 8) {
    f32x8 yv = load8(y + i);
    yv += av * load8(x + i);
    std::memcpy(y + i, &yv, sizeof yv);
  }
#endif
  for (; i < d; ++i) y[i] += a * x[i];
}

struct Scratch {
  std::vector<float> q, logits, row, acc;
  Scratch(int64_t s, int64_t d)
      : q(static_cast<size_t>(kQueries * d)), logits(static_cast<size_t>(kQueries * s)),
        row(static_cast<size_t>(d)), acc(static_cast<size_t>(kQueries * d)) {}
};

// Queries q[0 .. nq) (rows of d) against the slots `index[0 .. s)` of one head's k, v (rows of d).
template <class T>
LORS_INLINE void attend_tile_impl(const T* q, int64_t nq, const T* k, const T* v, const int64_t* index, int64_t s,
                                  int64_t d, float scale, T* out, float* lse, Scratch& w) {
  float* qf = w.q.data();
  float* logits = w.logits.data();
  float* acc = w.acc.data();
  for (int64_t t = 0; t < nq; ++t)
    for (int64_t i = 0; i < d; ++i) qf[t * d + i] = widen(q[t * d + i]);

  bool any = false;
  for (int64_t j = 0; j < s; ++j) {
    if (index[j] < 0) {  // padding: probability 0
      for (int64_t t = 0; t < nq; ++t) logits[t * s + j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    any = true;
    const float* key = fp32_row(k + index[j] * d, d, w.row.data());
    for (int64_t t = 0; t < nq; ++t) logits[t * s + j] = dot(qf + t * d, key, d) * scale;
  }
  std::fill(acc, acc + nq * d, 0.f);
  if (!any) {  // nothing to attend to: zeros, and lse = +inf (exp(logit - lse) = 0, the kernels' rule)
    for (int64_t t = 0; t < nq; ++t) {
      lse[t] = std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < d; ++i) store(0.f, out + t * d + i);
    }
    return;
  }
  float total[kQueries];
  for (int64_t t = 0; t < nq; ++t) {
    float* row = logits + t * s;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < s; ++j) top = std::max(top, row[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < s; ++j) {
      row[j] = std::exp(row[j] - top);
      sum += row[j];
    }
    total[t] = sum;
    lse[t] = top + std::log(sum);
  }
  for (int64_t j = 0; j < s; ++j) {
    if (index[j] < 0) continue;
    const float* value = fp32_row(v + index[j] * d, d, w.row.data());
    for (int64_t t = 0; t < nq; ++t) add_scaled(logits[t * s + j], value, acc + t * d, d);
  }
  for (int64_t t = 0; t < nq; ++t) {
    const float inv = 1.f / total[t];
    for (int64_t i = 0; i < d; ++i) store(acc[t * d + i] * inv, out + t * d + i);
  }
}

// The multiversioned entry points, one per element type (templates cannot be cloned).
LORS_MULTIVERSION void attend_tile(const float* q, int64_t nq, const float* k, const float* v, const int64_t* index,
                                   int64_t s, int64_t d, float scale, float* out, float* lse, Scratch& w) {
  attend_tile_impl(q, nq, k, v, index, s, d, scale, out, lse, w);
}

LORS_MULTIVERSION void attend_tile(const uint16_t* q, int64_t nq, const uint16_t* k, const uint16_t* v,
                                   const int64_t* index, int64_t s, int64_t d, float scale, uint16_t* out, float* lse,
                                   Scratch& w) {
  attend_tile_impl(q, nq, k, v, index, s, d, scale, out, lse, w);
}

template <class T>
void forward(const T* q, const T* k, const T* v, const int64_t* index, T* out, float* lse, int64_t b, int64_t h,
             int64_t n, int64_t l, int64_t s, int64_t d, bool per_query, float scale, int num_threads) {
  const int64_t tile = per_query ? 1 : kQueries;
  const int64_t tiles = (n + tile - 1) / tile, tasks = b * h * tiles;
  if (tasks == 0) return;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks)));
  (void)threads;  // unused without OpenMP

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Scratch scratch(s, d);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / tiles, n0 = (task % tiles) * tile, image = bh / h;
      const int64_t nq = std::min(tile, n - n0);
      const int64_t* slots = index + (per_query ? (image * n + n0) * s : image * s);
      attend_tile(q + (bh * n + n0) * d, nq, k + bh * l * d, v + bh * l * d, slots, s, d, scale,
                  out + (bh * n + n0) * d, lse + bh * n + n0, scratch);
    }
  }
}

}  // namespace

void sparse_attention_forward_f32(const float* q, const float* k, const float* v, const int64_t* index,
                                  float* out, float* lse, int64_t b, int64_t h, int64_t n, int64_t l, int64_t s,
                                  int64_t d, bool per_query, float scale, int num_threads) {
  forward(q, k, v, index, out, lse, b, h, n, l, s, d, per_query, scale, num_threads);
}

void sparse_attention_forward_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* index,
                                   uint16_t* out, float* lse, int64_t b, int64_t h, int64_t n, int64_t l,
                                   int64_t s, int64_t d, bool per_query, float scale, int num_threads) {
  forward(q, k, v, index, out, lse, b, h, n, l, s, d, per_query, scale, num_threads);
}

}  // namespace cpu
}  // namespace lors_kernels
