// Static LORS linear for few rows (decode, M <= 16): one pass over the shared weight.
//
//   t = scaling * x @ down^T                               [M, R], tiny, computed first
//   y[m, n] = dot(x[m], W[n]) + dot(t[m], up[n]) + bias[n]
//
// The two dot products of an output share one set of accumulators: [x[m], t[m]] . [W[n], up[n]] is a
// single dot product over K + R. The weight is walked in blocks of 4 rows (OpenMP splits the blocks);
// a block is used by every row of x while it sits in L1, so W is read from memory once, as a dense
// GEMV reads it. The summation order of every output depends only on the shapes, never on the thread
// count; all instruction-set clones run the same 8 lanes and the same final tree (only the baseline
// clone, without FMA, rounds each product).
//
// The indexed kernel (rows at different layers of a stack) is the same pass: row m's second segment is
// t[m] against the up rows of its own layer, r_i long; the plain kernel is a stack of one layer.
#include "static.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace lors_kernels {
namespace cpu {
namespace {

constexpr int64_t kRows = 4;      // weight rows per block: 2 rows of x times 4 of W = 8 accumulators
constexpr int64_t kChunk = 1024;  // K per pass: the 4 weight rows of a chunk (16 KiB fp32) stay in L1
constexpr int64_t kMinWorkPerThread = 1 << 15;  // multiply-adds; below this another thread costs more

// out[j] += hsum(a[j]) for 4 accumulators at once, in the same tree, with shuffles instead of scalars.
LORS_INLINE void hsum4_add(const f32x8* a, float* out) {
#if LORS_VECTOR_EXT && (defined(__clang__) || __GNUC__ >= 12)  // __builtin_shufflevector
  typedef float f32x4 __attribute__((vector_size(16)));
  const f32x8 ab = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a[0], a[1], 4, 5, 6, 7, 12, 13, 14, 15);  // a: 0+4 1+5 2+6 3+7, b: ..
  const f32x8 cd = __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a[2], a[3], 4, 5, 6, 7, 12, 13, 14, 15);
  const f32x8 e = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +  // (0+4)+(2+6), (1+5)+(3+7)
                  __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  const f32x4 s = __builtin_shufflevector(e, e, 0, 2, 4, 6) + __builtin_shufflevector(e, e, 1, 3, 5, 7);
  f32x4 o;
  std::memcpy(&o, out, sizeof o);
  o += s;
  std::memcpy(out, &o, sizeof o);
#else
  for (int j = 0; j < 4; ++j) out[j] += hsum(a[j]);
#endif
}

// One dot-product segment: rows of x (stride ldx) against rows of w (stride ldw), k elements each.
template <class T>
struct Segment {
  const float* x;
  int64_t ldx;
  const T* w;
  int64_t ldw;
  int64_t k;
};

template <int MR, int NR, class T>
LORS_INLINE void accumulate(f32x8 (*acc)[NR], const Segment<T>& s) {
  f32x8 wv[NR];
  int64_t i = 0;
  if (MR == 1) {
    // One row of x: a second set of accumulators keeps enough loads in flight to stream the weight.
    f32x8 acc2[NR] = {};
    for (; i + 16 <= s.k; i += 16) {
      const f32x8 x0 = load8(s.x + i), x1 = load8(s.x + i + 8);
      for (int j = 0; j < NR; ++j) {
        acc[0][j] += x0 * load8(s.w + j * s.ldw + i);
        acc2[j] += x1 * load8(s.w + j * s.ldw + i + 8);
      }
    }
    for (int j = 0; j < NR; ++j) acc[0][j] += acc2[j];
  }
  for (; i + 8 <= s.k; i += 8) {
    for (int j = 0; j < NR; ++j) wv[j] = load8(s.w + j * s.ldw + i);
    for (int r = 0; r < MR; ++r) {
      const f32x8 xv = load8(s.x + r * s.ldx + i);
      for (int j = 0; j < NR; ++j) acc[r][j] += xv * wv[j];
    }
  }
  if (i < s.k) {
    for (int j = 0; j < NR; ++j) wv[j] = load8_tail(s.w + j * s.ldw + i, s.k - i);
    for (int r = 0; r < MR; ++r) {
      const f32x8 xv = load8_tail(s.x + r * s.ldx + i, s.k - i);
      for (int j = 0; j < NR; ++j) acc[r][j] += xv * wv[j];
    }
  }
}

// Where the rows of x sit in a stack of layers: row i at layer index[i] in [-1, L) (-1: the shared weight
// alone), layer l of rank ranks[l] <= r. null index: every row at layer 0; null ranks: every layer of rank r.
struct Layers {
  const int64_t* index;
  const int64_t* ranks;
  int64_t r;

  LORS_INLINE int64_t of(int64_t i) const { return index != nullptr ? index[i] : 0; }
  LORS_INLINE int64_t rank(int64_t layer) const { return layer < 0 ? 0 : ranks != nullptr ? ranks[layer] : r; }
};

// The second segment of the weight pass: t [M, r] against up [L, n, r], row i against its layer's up
// (up: a block's first row in layer 0, n: the rows of a layer).
template <class T>
struct LowRank {
  const float* t;
  const T* up;
  int64_t n;
  Layers layers;

  // Row i's segment against the up rows from j on: only the first rank(layer) columns of each.
  LORS_INLINE Segment<T> row(int64_t i, int64_t j) const {
    const int64_t layer = layers.of(i);
    if (layer < 0) return Segment<T>{t, layers.r, up, layers.r, 0};
    return Segment<T>{t + i * layers.r, layers.r, up + (layer * n + j) * layers.r, layers.r, layers.rank(layer)};
  }
};

// out[r * ldo + j] += dot over segment a then row r's segment b[r], for MR rows of x and NR rows of w.
// Each weight vector loaded feeds MR rows of x; 2 x 4 independent accumulators hide the FMA latency.
template <int MR, int NR, class Ta, class Tb>
LORS_INLINE void dot_block(const Segment<Ta>& a, const Segment<Tb>* b, float* out, int64_t ldo) {
  f32x8 acc[MR][NR] = {};
  accumulate<MR, NR>(acc, a);
  if (MR == 1 || (b[0].w == b[MR - 1].w && b[0].k == b[MR - 1].k)) {
    // Both rows at one layer (t rows are adjacent as x rows are): as segment a, whatever the stack.
    if (b[0].k > 0) accumulate<MR, NR>(acc, b[0]);
  } else {
    for (int r = 0; r < MR; ++r)
      if (b[r].k > 0) accumulate<1, NR>(acc + r, b[r]);
  }
  for (int r = 0; r < MR; ++r) {
    if (NR == 4) {
      hsum4_add(acc[r], out + r * ldo);
    } else {
      for (int j = 0; j < NR; ++j) out[r * ldo + j] += hsum(acc[r][j]);
    }
  }
}

// out[i * ldo + j] += dot(a.x[i], a.w[j]) + row i's low-rank dot with w row j, for i < m, j < rows
// (a.k <= kChunk; b null: segment a alone).
template <class Ta, class Tb>
LORS_INLINE void dot_rows(int64_t m, int64_t rows, const Segment<Ta>& a, const LowRank<Tb>* b, float* out,
                          int64_t ldo) {
  for (int64_t j = 0; j < rows;) {
    const int64_t nr = rows - j >= 4 ? 4 : 1;
    for (int64_t i = 0; i < m;) {
      const int64_t mr = m - i >= 2 ? 2 : 1;
      const Segment<Ta> sa{a.x + i * a.ldx, a.ldx, a.w + j * a.ldw, a.ldw, a.k};
      Segment<Tb> sb[2] = {};  // k = 0: nothing
      if (b != nullptr)
        for (int64_t r = 0; r < mr; ++r) sb[r] = b->row(i + r, j);
      float* o = out + i * ldo + j;
      if (nr == 4 && mr == 2) {
        dot_block<2, 4>(sa, sb, o, ldo);
      } else if (nr == 4) {
        dot_block<1, 4>(sa, sb, o, ldo);
      } else if (mr == 2) {
        dot_block<2, 1>(sa, sb, o, ldo);
      } else {
        dot_block<1, 1>(sa, sb, o, ldo);
      }
      i += mr;
    }
    j += nr;
  }
}

// out[i * ldo + j] = dot(a.x[i], a.w[j]) + row i's low-rank dot with up row j, for i < m, j < rows <= kRows
// (b may be null). Segment a is walked in K chunks (outermost) so that the weight rows of a chunk are
// reused by all m rows of x from L1; the low-rank segment is short (the rank) and joins the last chunk.
template <class T>
LORS_INLINE void dot_tile_impl(int64_t m, int64_t rows, Segment<T> a, const LowRank<T>* b, float* out,
                               int64_t ldo) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < rows; ++j) out[i * ldo + j] = 0.f;
  // bf16 weight chunks read by more than two rows of x are widened once, into L1, and then read as
  // fp32: widening costs as much as the multiply-adds (measured faster from 5 rows on while the weight
  // streams from memory, from 3 rows on while it sits in cache). Widening is exact: same sums.
  const bool widen_once = !std::is_same<T, float>::value && m > 4;
  const int64_t k = a.k;
  int64_t k0 = 0;
  do {
    const int64_t kc = std::min(kChunk, k - k0);
    const LowRank<T>* sb = k0 + kc >= k ? b : nullptr;
    if (widen_once) {
      float w32[kRows * kChunk];
      for (int64_t j = 0; j < rows; ++j)
        for (int64_t i = 0; i < kc; ++i) w32[j * kc + i] = widen(a.w[j * a.ldw + k0 + i]);
      dot_rows(m, rows, Segment<float>{a.x + k0, a.ldx, w32, kc, kc}, sb, out, ldo);
    } else {
      dot_rows(m, rows, Segment<T>{a.x + k0, a.ldx, a.w + k0, a.ldw, kc}, sb, out, ldo);
    }
    k0 += kc;
  } while (k0 < k);
}

// The multiversioned entry points, one per weight type (templates cannot be cloned).
LORS_MULTIVERSION void dot_tile(int64_t m, int64_t rows, Segment<float> a, const LowRank<float>* b, float* out,
                                int64_t ldo) {
  dot_tile_impl(m, rows, a, b, out, ldo);
}

LORS_MULTIVERSION void dot_tile(int64_t m, int64_t rows, Segment<uint16_t> a, const LowRank<uint16_t>* b,
                                float* out, int64_t ldo) {
  dot_tile_impl(m, rows, a, b, out, ldo);
}

int threads_for(int64_t work, int num_threads) {
  const int64_t useful = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, useful)));
}

// x is fp32 here (the caller widens bf16 x once: it is small and read once per weight block). down [L, r, k],
// up [L, n, r], scaling [L]; bias [n], or [L, n] with bias_per_layer (rows at layer -1 get none of it).
template <class T>
void forward(const float* x, const T* weight, const T* down, const T* up, const T* bias, bool bias_per_layer,
             const float* scaling, Layers layers, T* y, int64_t m, int64_t n, int64_t k, int num_threads) {
  if (m == 0 || n == 0) return;
  const int64_t r = layers.r;
  // Runs of adjacent rows at one layer: the t of a run reads its layer's down once (the plain kernel: one
  // run of all the rows).
  struct Run {
    int64_t start, count, layer;
  };
  std::vector<Run> runs;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t layer = layers.of(i);
    if (!runs.empty() && runs.back().layer == layer) {
      ++runs.back().count;
    } else {
      runs.push_back(Run{i, 1, layer});
    }
  }
  std::vector<float> t(static_cast<size_t>(m * r));
  const int64_t r_blocks = (r + kRows - 1) / kRows;
  const int64_t t_items = static_cast<int64_t>(runs.size()) * r_blocks;
  const int64_t n_blocks = (n + kRows - 1) / kRows;
  const int threads = threads_for(m * (n + r) * k + m * n * r, num_threads);
  (void)threads;  // unused without OpenMP

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < t_items; ++item) {
      const Run& run = runs[static_cast<size_t>(item / r_blocks)];
      const int64_t j0 = item % r_blocks * kRows;
      const int64_t rank = layers.rank(run.layer);
      if (j0 >= rank) continue;  // beyond the layer's rank (or a run at -1): never read
      const int64_t rows = std::min(kRows, rank - j0);
      float* tr = t.data() + run.start * r + j0;
      dot_tile(run.count, rows, Segment<T>{x + run.start * k, k, down + (run.layer * r + j0) * k, k, k}, nullptr,
               tr, r);
      for (int64_t i = 0; i < run.count; ++i)
        for (int64_t j = 0; j < rows; ++j) tr[i * r + j] *= scaling[run.layer];
    }
    // (implicit barrier: every output needs all of t)

    float on_stack[16 * kRows];  // the m x kRows outputs of a block; on the heap only for m > 16
    std::vector<float> on_heap(m > 16 ? static_cast<size_t>(m * kRows) : 0);
    float* out = m > 16 ? on_heap.data() : on_stack;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t n0 = blk * kRows;
      const int64_t rows = std::min(kRows, n - n0);
      const LowRank<T> low_rank{t.data(), up + n0 * r, n, layers};
      dot_tile(m, rows, Segment<T>{x, k, weight + n0 * k, k, k}, &low_rank, out, kRows);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t layer = layers.of(i);
        const T* b = (bias == nullptr || !bias_per_layer) ? bias : layer >= 0 ? bias + layer * n : nullptr;
        for (int64_t j = 0; j < rows; ++j) {
          const float v = out[i * kRows + j];
          store(b != nullptr ? v + widen(b[n0 + j]) : v, y + i * n + n0 + j);
        }
      }
    }
  }
}

std::vector<float> widened(const uint16_t* x, int64_t count) {
  std::vector<float> x32(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) x32[i] = widen(x[i]);
  return x32;
}

}  // namespace

void lors_linear_forward_f32(const float* x, const float* weight, const float* down, const float* up,
                             const float* bias, float scaling, float* y, int64_t m, int64_t n, int64_t k,
                             int64_t r, int num_threads) {
  forward(x, weight, down, up, bias, false, &scaling, Layers{nullptr, nullptr, r}, y, m, n, k, num_threads);
}

void lors_linear_forward_bf16(const uint16_t* x, const uint16_t* weight, const uint16_t* down,
                              const uint16_t* up, const uint16_t* bias, float scaling, uint16_t* y,
                              int64_t m, int64_t n, int64_t k, int64_t r, int num_threads) {
  forward(widened(x, m * k).data(), weight, down, up, bias, false, &scaling, Layers{nullptr, nullptr, r}, y, m, n,
          k, num_threads);
}

// l (the layers of the stack) is not needed: index and ranks are valid (the callers check them).
void lors_linear_indexed_forward_f32(const float* x, const float* weight, const float* down, const float* up,
                                     const float* bias, bool bias_per_layer, const float* scaling,
                                     const int64_t* index, const int64_t* ranks, float* y, int64_t m, int64_t n,
                                     int64_t k, int64_t /*l*/, int64_t r, int num_threads) {
  forward(x, weight, down, up, bias, bias_per_layer, scaling, Layers{index, ranks, r}, y, m, n, k, num_threads);
}

void lors_linear_indexed_forward_bf16(const uint16_t* x, const uint16_t* weight, const uint16_t* down,
                                      const uint16_t* up, const uint16_t* bias, bool bias_per_layer,
                                      const float* scaling, const int64_t* index, const int64_t* ranks,
                                      uint16_t* y, int64_t m, int64_t n, int64_t k, int64_t /*l*/, int64_t r,
                                      int num_threads) {
  forward(widened(x, m * k).data(), weight, down, up, bias, bias_per_layer, scaling, Layers{index, ranks, r}, y, m,
          n, k, num_threads);
}

}  // namespace cpu
}  // namespace lors_kernels
