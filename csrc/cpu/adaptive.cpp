// Adaptive mixing, one (query, group) tile at a time: every P x C intermediate of a tile lives in one
// thread's scratch (a few hundred KB at the LORS paper's shapes: L2-resident), nothing of size BN is
// ever built besides the outputs.
//
// Forward of a tile:
//   pre1  = x @ M + T @ F^M_all,  T = [(x E^M_k) Q^M_k]_k   (factored: never a C_in x C_out private matrix)
//   h     = relu(LN(pre1))
//   S_eff = S + [E^S_k Q^S_k]_k @ F^S_all                    (a P_out x P_in tile, like S itself)
//   pre2  = S_eff @ h;  out = relu(LN(pre2))
// X_all stacks a part's K factors: E_all = [E_0 .. E_{K-1}] (r columns each), F_all = [F_0; ..; F_{K-1}].
// The spatial part is folded into S_eff rather than applied as E (Q (F h)): that costs P_out*P_in*K*r
// multiply-adds instead of (P_in + P_out)*C_out*K*r, 3x fewer at the paper's shapes, and dS_eff is
// needed anyway for dS.
//
// The backward recomputes h and pre2 per tile instead of saving them from the forward: saving both
// would cost BN*G*(P_in + P_out)*C_out*4 bytes (315 MB for B=16, N=100 at the paper's shapes), the
// recompute one more forward's worth of cache-resident FLOPs. A training forward may save pre1 alone
// (fp32, a third of that: 105 MB there, 13 MB at B=2): the backward then skips x M + T F^M_all, 8% of
// a CPU training step at B=2, N=100 (64 -> 59 ms, 2 threads). dE and dF sum over every
// query: each chunk of queries (fixed by BN alone) sums its own in query order, and the chunks are
// added in chunk order, so no result depends on the thread count or on which thread ran what.
//
// All products run through one GEMM: A read in place (row-major or transposed), B packed into panels
// of 16 columns (bf16 widened once), a 6 x 16 register-blocked micro-tile; AVX2 and AVX-512 clones.
#include "adaptive.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec.h"

namespace lors_kernels {
namespace cpu {
namespace {

constexpr int64_t kNR = 16;  // columns of a packed B panel: two 8-lane vectors
// Rows of a micro-tile: 6 x 2 accumulators, 2 B vectors and a broadcast use 15 of the 16 AVX2 registers.
constexpr int kMR = 6;
// dE and dF partial sums per group: a bound on their memory that still leaves work for 32 threads.
constexpr int64_t kMaxChunksPerGroup = 32;
constexpr int64_t kSumBlock = 256;  // dE, dF elements summed over the chunks at a time
constexpr int64_t kAlign = 16;      // floats: scratch arrays start on 64-byte cache lines

// ---------------------------------------------------------------------------------------------
// GEMM on tile scratch

// A [m, k] read in place: element (i, kk) at p[i * rs + kk * cs].
struct MatA {
  const float* p;
  int64_t rs, cs;
};

LORS_INLINE MatA rows_of(const float* p, int64_t ld) { return {p, ld, 1}; }
LORS_INLINE MatA transpose_of(const float* p, int64_t ld) { return {p, 1, ld}; }

LORS_INLINE int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }
// Floats of B [k, n] packed: whole panels of kNR columns.
LORS_INLINE int64_t packed_size(int64_t k, int64_t n) { return k * round_up(n, kNR); }

// B [k, n] = src (row-major, leading dimension ld) into panels: dst[panel][kk][0, kNR), zero past n.
// A micro-tile then walks one panel front to back, L1-resident whatever ld is (a power of two would
// map the rows onto a few cache sets). Row by row: the source is read front to back (a new query's M
// streams from memory).
template <class S>
LORS_INLINE void pack_b(const S* src, int64_t ld, int64_t k, int64_t n, float* dst) {
  const int64_t full = n / kNR, panel = k * kNR;
  for (int64_t kk = 0; kk < k; ++kk) {
    const S* row = src + kk * ld;
    float* out = dst + kk * kNR;
    for (int64_t p = 0; p < full; ++p) {
      store8(load8(row + p * kNR), out + p * panel);
      store8(load8(row + p * kNR + 8), out + p * panel + 8);
    }
    for (int64_t j = full * kNR; j < round_up(n, kNR); ++j) out[full * panel + j % kNR] = j < n ? widen(row[j]) : 0.f;
  }
}

// B [k, n] = src^T (src row-major [n, k], leading dimension ld) into panels, as pack_b: 8 x 8 blocks
// transposed in registers, the ragged edges element by element.
template <class S>
LORS_INLINE void pack_bt(const S* src, int64_t ld, int64_t k, int64_t n, float* dst) {
  const int64_t panel = k * kNR, k8 = k / 8 * 8, n8 = n / 8 * 8;
  if (n % kNR) std::memset(dst + n / kNR * panel, 0, static_cast<size_t>(panel) * sizeof(float));
  for (int64_t j = 0; j < n; j += 8) {
    float* out = dst + j / kNR * panel + j % kNR;  // B's columns j .. j + 7, row 0
    const S* col = src + j * ld;                   // their source rows
    if (j < n8) {
      for (int64_t kk = 0; kk < k8; kk += 8) {
        f32x8 block[8];
        for (int i = 0; i < 8; ++i) block[i] = load8(col + i * ld + kk);
        transpose8x8(block);
        for (int i = 0; i < 8; ++i) store8(block[i], out + (kk + i) * kNR);
      }
    }
    for (int64_t jj = j; jj < std::min(j + 8, n); ++jj)
      for (int64_t kk = jj < n8 ? k8 : 0; kk < k; ++kk) out[kk * kNR + jj - j] = widen(src[jj * ld + kk]);
  }
}

// C [MR, cols <= kNR] (= or +=) A [MR, k] @ one packed panel. Broadcast A(i, kk) times the panel's row kk.
template <int MR, class TC>
LORS_INLINE void micro_tile(int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, TC* c,
                            int64_t ldc, int64_t cols, bool accumulate) {
  f32x8 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = f32x8{};
  if constexpr (std::is_same<TC, float>::value) {
    if (accumulate) {
      for (int i = 0; i < MR; ++i) {
        const float* ci = c + i * ldc;
        acc[i][0] = cols >= 8 ? load8(ci) : load8_tail(ci, cols);
        if (cols > 8) acc[i][1] = cols == kNR ? load8(ci + 8) : load8_tail(ci + 8, cols - 8);
      }
    }
  }
  for (int64_t kk = 0; kk < k; ++kk, a += a_cs, b += kNR) {
    const f32x8 b0 = load8(b), b1 = load8(b + 8);
    for (int i = 0; i < MR; ++i) {
      // vector * scalar: one vbroadcastss from memory per row (GCC 12 makes a broadcast8 an extra move)
      const float ai = a[i * a_rs];
      acc[i][0] += b0 * ai;
      acc[i][1] += b1 * ai;
    }
  }
  for (int i = 0; i < MR; ++i) {
    TC* ci = c + i * ldc;
    if (cols == kNR) {
      store8(acc[i][0], ci);
      store8(acc[i][1], ci + 8);
    } else if (cols > 8) {
      store8(acc[i][0], ci);
      store8_tail(acc[i][1], ci + 8, cols - 8);
    } else if (cols == 8) {
      store8(acc[i][0], ci);
    } else {
      store8_tail(acc[i][0], ci, cols);
    }
  }
}

// The next tile's inputs and outputs, pulled into cache a few lines per micro-tile while this tile
// computes. A tile reads its inputs in bursts (all of M at once: 64 KB at the paper's shapes) that the
// hardware prefetcher does not run far enough ahead of.
class Prefetcher {
 public:
  void add(const void* p, int64_t bytes, bool write) {
    if (p != nullptr && bytes > 0 && count_ < kMaxRanges) {
      const char* begin = static_cast<const char*>(p);
      ranges_[count_++] = {begin, begin + bytes, write};
    }
  }

  LORS_INLINE void step() {
    for (int i = 0; i < kLinesPerStep && at_ < count_; ++i) {
      Range& range = ranges_[at_];
      prefetch(range.next, range.write);
      range.next += 64;
      if (range.next >= range.end) ++at_;
    }
  }

 private:
  static constexpr int kMaxRanges = 10, kLinesPerStep = 4;
  struct Range {
    const char* next;
    const char* end;
    bool write;
  };
  Range ranges_[kMaxRanges] = {};
  int count_ = 0, at_ = 0;
};

// C [m, n] (ldc) = A [m, k] @ B [k, n] (B packed), or += when accumulate (fp32 C only). Panels outer:
// a panel (k x 64 bytes) stays in L1 while every row block of A passes over it.
template <class TC>
LORS_INLINE void gemm_impl(int64_t m, int64_t n, int64_t k, MatA a, const float* bp, TC* c, int64_t ldc,
                           Prefetcher& pf, bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += kNR, bp += k * kNR) {
    const int64_t cols = std::min(kNR, n - j0);
    int64_t i = 0;
    for (; i + kMR <= m; i += kMR) {
      micro_tile<kMR>(k, a.p + i * a.rs, a.rs, a.cs, bp, c + i * ldc + j0, ldc, cols, accumulate);
      pf.step();
    }
    const float* ai = a.p + i * a.rs;
    TC* ci = c + i * ldc + j0;
    switch (m - i) {
      case 5: micro_tile<5>(k, ai, a.rs, a.cs, bp, ci, ldc, cols, accumulate); break;
      case 4: micro_tile<4>(k, ai, a.rs, a.cs, bp, ci, ldc, cols, accumulate); break;
      case 3: micro_tile<3>(k, ai, a.rs, a.cs, bp, ci, ldc, cols, accumulate); break;
      case 2: micro_tile<2>(k, ai, a.rs, a.cs, bp, ci, ldc, cols, accumulate); break;
      case 1: micro_tile<1>(k, ai, a.rs, a.cs, bp, ci, ldc, cols, accumulate); break;
      default: break;
    }
  }
}

// The GEMM entry points, one per C type, multiversioned themselves: out of line, so that the micro-tile
// is compiled once per instruction set rather than at each of the tile's 30 products.
LORS_MULTIVERSION_AVX512 void gemm(int64_t m, int64_t n, int64_t k, MatA a, const float* bp, float* c,
                                   int64_t ldc, Prefetcher& pf, bool accumulate = false) {
  gemm_impl(m, n, k, a, bp, c, ldc, pf, accumulate);
}

LORS_MULTIVERSION_AVX512 void gemm(int64_t m, int64_t n, int64_t k, MatA a, const float* bp, uint16_t* c,
                                   int64_t ldc, Prefetcher& pf) {
  gemm_impl(m, n, k, a, bp, c, ldc, pf, false);
}

// ---------------------------------------------------------------------------------------------
// Element-wise passes

template <class S>
LORS_INLINE void widen_into(const S* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store8(load8(src + i), dst + i);
  for (; i < count; ++i) dst[i] = widen(src[i]);
}

template <class T>
LORS_INLINE void store_tile(const float* src, int64_t count, T* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store8(load8(src + i), dst + i);
  for (; i < count; ++i) store(src[i], dst + i);
}

// Sum of a dense array in a fixed order: four 8-lane accumulators, then the lanes.
LORS_INLINE float sum_of(const float* p, int64_t count) {
  f32x8 acc[4] = {};
  int64_t i = 0;
  for (; i + 32 <= count; i += 32)
    for (int j = 0; j < 4; ++j) acc[j] += load8(p + i + 8 * j);
  for (; i + 8 <= count; i += 8) acc[0] += load8(p + i);
  if (i < count) acc[0] += load8_tail(p + i, count - i);
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

struct Stats {
  float mean, rstd;
};

// Joint LayerNorm statistics of a dense tile: the mean, then the mean squared deviation from it (two
// passes: no cancellation).
LORS_INLINE Stats layer_norm_stats(const float* p, int64_t count, float eps) {
  if (count == 0) return {0.f, 1.f / std::sqrt(eps)};
  const float mean = sum_of(p, count) / static_cast<float>(count);
  const f32x8 mv = broadcast8(mean);
  f32x8 acc[4] = {};
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    for (int j = 0; j < 4; ++j) {
      const f32x8 d = load8(p + i + 8 * j) - mv;
      acc[j] += d * d;
    }
  }
  for (; i + 8 <= count; i += 8) {
    const f32x8 d = load8(p + i) - mv;
    acc[0] += d * d;
  }
  float tail = 0.f;
  for (; i < count; ++i) tail += (p[i] - mean) * (p[i] - mean);
  const float var = (hsum((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail) / static_cast<float>(count);
  return {mean, 1.f / std::sqrt(var + eps)};
}

// Padding columns of a packed B must be zero: its last panel is cleared before a partial fill.
LORS_INLINE void clear_padding(float* bp, int64_t rows, int64_t cols) {
  if (cols % kNR) std::memset(bp + (cols / kNR) * rows * kNR, 0, static_cast<size_t>(rows * kNR) * sizeof(float));
}

// Calls block(at, n, packed) for each run of n <= 8 columns of a dense [rows, cols] tile: at is its
// dense offset, packed its place in the tile packed as a GEMM's B (rows as K). Panel by panel, so that
// the packed side is written front to back.
template <class F>
LORS_INLINE void for_each_block(int64_t rows, int64_t cols, float* bp, F&& block) {
  for (int64_t c0 = 0; c0 < cols; c0 += kNR) {
    float* panel = bp + c0 / kNR * rows * kNR;
    if (c0 + kNR <= cols) {
      for (int64_t r = 0; r < rows; ++r) {
        block(r * cols + c0, 8, panel + r * kNR);
        block(r * cols + c0 + 8, 8, panel + r * kNR + 8);
      }
    } else {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = c0; c < cols; c += 8)
          block(r * cols + c, std::min<int64_t>(8, cols - c), panel + r * kNR + c - c0);
    }
  }
}

// h = relu(LN(pre)) of a dense [rows, cols] tile, packed as a GEMM's B (rows as K), and row-major to h
// when not null.
LORS_INLINE void layer_norm_relu_packed(const float* pre, int64_t rows, int64_t cols, Stats st, float* hp,
                                        float* h) {
  const f32x8 mean = broadcast8(st.mean), rstd = broadcast8(st.rstd);
  clear_padding(hp, rows, cols);
  for_each_block(rows, cols, hp, [&](int64_t at, int64_t n, float* packed) {
    if (n == 8) {
      const f32x8 v = relu8((load8(pre + at) - mean) * rstd);
      store8(v, packed);
      if (h != nullptr) store8(v, h + at);
    } else {
      const f32x8 v = relu8((load8_tail(pre + at, n) - mean) * rstd);
      store8_tail(v, packed, n);
      if (h != nullptr) store8_tail(v, h + at, n);
    }
  });
}

// out = relu(LN(pre)) of a dense tile, stored in the output's dtype.
template <class T>
LORS_INLINE void layer_norm_relu_store(const float* pre, int64_t count, Stats st, T* out) {
  const f32x8 mean = broadcast8(st.mean), rstd = broadcast8(st.rstd);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) store8(relu8((load8(pre + i) - mean) * rstd), out + i);
  for (; i < count; ++i) {
    const float v = (pre[i] - st.mean) * st.rstd;
    store(v < 0.f ? 0.f : v, out + i);
  }
}

// d pre of out = relu(LN(pre)) from d out (grad, any dtype):
//   rstd * (dy - mean(dy) - xhat * mean(dy * xhat)),  dy = grad [xhat > 0],  xhat = (pre - mean) * rstd
// written dense to d (which may alias pre or grad: each block is read before it is written) and packed
// (rows as K) to dp.
template <class G>
LORS_INLINE void layer_norm_relu_backward(const float* pre, const G* grad, int64_t rows, int64_t cols, Stats st,
                                          float* d, float* dp) {
  const int64_t count = rows * cols;
  if (count == 0) return;
  const f32x8 mean = broadcast8(st.mean), rstd = broadcast8(st.rstd);
  f32x8 sum_dy[2] = {}, sum_dyx[2] = {};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    for (int j = 0; j < 2; ++j) {
      const f32x8 xhat = (load8(pre + i + 8 * j) - mean) * rstd;
      const f32x8 dy = where_positive(xhat, load8(grad + i + 8 * j));
      sum_dy[j] += dy;
      sum_dyx[j] += dy * xhat;
    }
  }
  for (; i < count; i += 8) {  // zero-padded tail: dy = 0 there
    const int64_t n = std::min<int64_t>(8, count - i);
    const f32x8 xhat = ((n == 8 ? load8(pre + i) : load8_tail(pre + i, n)) - mean) * rstd;
    const f32x8 dy = where_positive(xhat, n == 8 ? load8(grad + i) : load8_tail(grad + i, n));
    sum_dy[0] += dy;
    sum_dyx[0] += dy * xhat;
  }
  const f32x8 mean_dy = broadcast8(hsum(sum_dy[0] + sum_dy[1]) / static_cast<float>(count));
  const f32x8 mean_dyx = broadcast8(hsum(sum_dyx[0] + sum_dyx[1]) / static_cast<float>(count));
  const auto d_pre = [&](const f32x8& pre_v, const f32x8& grad_v) {
    const f32x8 xhat = (pre_v - mean) * rstd;
    return rstd * (where_positive(xhat, grad_v) - mean_dy - xhat * mean_dyx);
  };
  clear_padding(dp, rows, cols);
  for_each_block(rows, cols, dp, [&](int64_t at, int64_t n, float* packed) {
    if (n == 8) {
      const f32x8 v = d_pre(load8(pre + at), load8(grad + at));
      store8(v, d + at);
      store8(v, packed);
    } else {
      const f32x8 v = d_pre(load8_tail(pre + at, n), load8_tail(grad + at, n));
      store8_tail(v, d + at, n);
      store8_tail(v, packed, n);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The problem, the shared factors and the per-thread scratch

struct Dims {
  int64_t bn, groups, p_in, c_in, c_out, p_out, r, km, ks;
  int64_t rm, rs;  // km * r and ks * r: the widths of E^M_all and E^S_all (0: that part is absent)
};

Dims dims_of(const AdaptiveMixingSizes& s) {
  const int64_t rm = s.k_channel * s.rank, rs = s.k_spatial * s.rank;
  return {s.bn, s.groups, s.p_in, s.c_in, s.c_out, s.p_out, s.rank, s.k_channel, s.k_spatial, rm, rs};
}

template <class T>
struct Problem {
  const T *x, *m, *s, *em, *qm, *fm, *es, *qs, *fs;
  const T* dout;                 // backward
  T* out;                        // forward
  float* pre1_out;               // forward: where to save pre1, or null
  const float* pre1_in;          // backward: the forward's saved pre1, or null (recomputed)
  T *dx, *dm, *ds, *dqm, *dqs;   // backward; dE and dF go through the chunk sums
  Dims d;
  float eps;
};

// E and F of every group in fp32, laid out as the GEMMs read them (built once per call: they are
// shared by every query). Per group: E^M_all packed [C_in, rm] and transposed [rm, C_in], F^M_all packed
// [rm, C_out] and transposed [C_out, rm], E^S dense [ks, P_out, r], F^S_all packed [rs, P_in] and
// transposed [P_in, rs].
struct Factors {
  std::vector<float> em_p, em_tp, fm_p, fm_tp, es, fs_p, fs_tp;
  int64_t em_p_size = 0, em_tp_size = 0, fm_p_size = 0, fm_tp_size = 0, fs_p_size = 0, fs_tp_size = 0;
};

template <class T>
Factors build_factors(const Problem<T>& p, bool backward) {
  const Dims& d = p.d;
  Factors f;
  if (d.rm > 0) {
    f.em_p_size = packed_size(d.c_in, d.rm);
    f.fm_p_size = packed_size(d.rm, d.c_out);
    f.em_p.resize(static_cast<size_t>(d.groups * f.em_p_size));
    f.fm_p.resize(static_cast<size_t>(d.groups * f.fm_p_size));
    if (backward) {
      f.em_tp_size = packed_size(d.rm, d.c_in);
      f.fm_tp_size = packed_size(d.c_out, d.rm);
      f.em_tp.resize(static_cast<size_t>(d.groups * f.em_tp_size));
      f.fm_tp.resize(static_cast<size_t>(d.groups * f.fm_tp_size));
    }
    std::vector<float> e_all(static_cast<size_t>(d.c_in * d.rm));  // E^M_all [C_in, rm] of one group
    for (int64_t g = 0; g < d.groups; ++g) {
      for (int64_t k = 0; k < d.km; ++k)
        for (int64_t c = 0; c < d.c_in; ++c)
          for (int64_t a = 0; a < d.r; ++a)
            e_all[c * d.rm + k * d.r + a] = widen(p.em[((g * d.km + k) * d.c_in + c) * d.r + a]);
      const T* f_all = p.fm + g * d.rm * d.c_out;
      pack_b(e_all.data(), d.rm, d.c_in, d.rm, f.em_p.data() + g * f.em_p_size);
      pack_b(f_all, d.c_out, d.rm, d.c_out, f.fm_p.data() + g * f.fm_p_size);
      if (backward) {
        pack_bt(e_all.data(), d.rm, d.rm, d.c_in, f.em_tp.data() + g * f.em_tp_size);
        pack_bt(f_all, d.c_out, d.c_out, d.rm, f.fm_tp.data() + g * f.fm_tp_size);
      }
    }
  }
  if (d.rs > 0) {
    f.es.resize(static_cast<size_t>(d.groups * d.ks * d.p_out * d.r));
    widen_into(p.es, d.groups * d.ks * d.p_out * d.r, f.es.data());
    f.fs_p_size = packed_size(d.rs, d.p_in);
    f.fs_p.resize(static_cast<size_t>(d.groups * f.fs_p_size));
    if (backward) {
      f.fs_tp_size = packed_size(d.p_in, d.rs);
      f.fs_tp.resize(static_cast<size_t>(d.groups * f.fs_tp_size));
    }
    for (int64_t g = 0; g < d.groups; ++g) {
      const T* f_all = p.fs + g * d.rs * d.p_in;
      pack_b(f_all, d.p_in, d.rs, d.p_in, f.fs_p.data() + g * f.fs_p_size);
      if (backward) pack_bt(f_all, d.p_in, d.p_in, d.rs, f.fs_tp.data() + g * f.fs_tp_size);
    }
  }
  return f;
}

// One thread's tile scratch, fp32. Dense tiles are row-major; *p are packed B operands.
struct Workspace {
  // The forward (and the backward's recompute); x: bf16 only.
  float *x, *xe, *t, *qp, *mp, *p1, *hp, *se, *eq, *p2;
  // The backward; dx: bf16 only.
  float *h = nullptr, *htp = nullptr, *d2p = nullptr, *dsm = nullptr, *dsp = nullptr, *u = nullptr, *up = nullptr,
        *dh = nullptr, *d1p = nullptr, *dx = nullptr, *dt = nullptr, *dtp = nullptr, *dxe = nullptr;
  std::unique_ptr<float[]> storage;

  // fp32 reads x and writes dx in place; bf16 widens x, sums dx in fp32.
  Workspace(const Dims& d, bool backward, bool bf16) {
    const int64_t pi = d.p_in, ci = d.c_in, co = d.c_out, po = d.p_out, r = d.r;
    const std::pair<float**, int64_t> forward_arrays[] = {
        {&x, bf16 ? pi * ci : 0},
        {&xe, pi * d.rm},
        {&t, pi * d.rm},
        {&qp, packed_size(r, r)},
        {&mp, std::max(packed_size(ci, co), packed_size(co, ci))},  // M packed, then M^T in the backward
        {&p1, pi * co},
        {&hp, packed_size(pi, co)},
        {&se, po * pi},
        {&eq, po * d.rs},
        {&p2, po * co},  // pre2; in the backward d pre2 replaces it
    };
    const std::pair<float**, int64_t> backward_arrays[] = {
        {&h, pi * co},
        {&htp, packed_size(co, pi)},
        {&d2p, packed_size(po, co)},
        {&dsm, po * pi},
        {&dsp, packed_size(po, pi)},
        {&u, po * d.rs},
        {&up, packed_size(po, r)},
        {&dh, pi * co},  // dh; d pre1 replaces it
        {&d1p, packed_size(pi, co)},
        {&dx, bf16 ? pi * ci : 0},
        {&dt, pi * d.rm},
        {&dtp, packed_size(pi, r)},
        {&dxe, pi * d.rm},
    };
    int64_t total = kAlign;
    for (const auto& a : forward_arrays) total += round_up(a.second, kAlign);
    if (backward)
      for (const auto& a : backward_arrays) total += round_up(a.second, kAlign);
    storage.reset(new float[static_cast<size_t>(total)]);
    const uintptr_t base = reinterpret_cast<uintptr_t>(storage.get());
    float* next = storage.get() + (round_up(static_cast<int64_t>(base), kAlign * 4) - static_cast<int64_t>(base)) / 4;
    const auto carve = [&next](const std::pair<float**, int64_t>& a) {
      *a.first = next;
      next += round_up(a.second, kAlign);
    };
    for (const auto& a : forward_arrays) carve(a);
    if (backward)
      for (const auto& a : backward_arrays) carve(a);
  }
};

// dE, dF sums of one chunk of queries (one group), in the outputs' per-group layouts.
struct Partial {
  float *dem, *dfm, *des, *dfs;
};

LORS_INLINE int64_t partial_size(const Dims& d) {
  return d.rm * (d.c_in + d.c_out) + d.rs * (d.p_out + d.p_in);
}

LORS_INLINE Partial partial_at(float* base, const Dims& d) {
  float* des = base + d.rm * (d.c_in + d.c_out);
  return {base, base + d.rm * d.c_in, des, des + d.rs * d.p_out};
}

// ---------------------------------------------------------------------------------------------
// One tile

struct TileStats {
  Stats ln1, ln2;
  const float* pre1;  // the tile's pre1: the scratch's, or the saved one
};

// The tile's x in fp32: the input itself, or its copy widened by forward_tile.
template <class T>
LORS_INLINE const float* x_of(const Problem<T>& p, const Workspace& w, int64_t tile) {
  if constexpr (std::is_same<T, float>::value) {
    return p.x + tile * p.d.p_in * p.d.c_in;
  } else {
    return w.x;
  }
}

// Prefetches the inputs of tile (n, g) and, written, the outputs the pass writes for it.
template <class T>
void prefetch_tile(const Problem<T>& p, int64_t n, int64_t g, bool backward, Prefetcher& pf) {
  const Dims& d = p.d;
  const int64_t tile = n * d.groups + g, b = sizeof(T);
  pf.add(p.x + tile * d.p_in * d.c_in, d.p_in * d.c_in * b, false);
  pf.add(p.m + tile * d.c_in * d.c_out, d.c_in * d.c_out * b, false);
  if (d.rm > 0) pf.add(p.qm + tile * d.km * d.r * d.r, d.km * d.r * d.r * b, false);
  pf.add(p.s + tile * d.p_out * d.p_in, d.p_out * d.p_in * b, false);
  if (d.rs > 0) pf.add(p.qs + tile * d.ks * d.r * d.r, d.ks * d.r * d.r * b, false);
  if (!backward) {
    pf.add(p.out + tile * d.p_out * d.c_out, d.p_out * d.c_out * b, true);
    return;
  }
  pf.add(p.dout + tile * d.p_out * d.c_out, d.p_out * d.c_out * b, false);
  pf.add(p.ds + tile * d.p_out * d.p_in, d.p_out * d.p_in * b, true);
  pf.add(p.dm + tile * d.c_in * d.c_out, d.c_in * d.c_out * b, true);
  pf.add(p.dx + tile * d.p_in * d.c_in, d.p_in * d.c_in * b, true);
}

// The forward of tile (n, g) up to pre2 (in w.p2) and its statistics; pre1 in w.p1 (or where the
// problem saves it, or read from where it was saved), h packed in w.hp (and row-major in w.h when keep_h).
template <class T>
LORS_INLINE TileStats forward_tile(const Problem<T>& p, const Factors& f, const Workspace& w, int64_t n, int64_t g,
                                   bool keep_h, Prefetcher& pf) {
  const Dims& d = p.d;
  const int64_t pi = d.p_in, ci = d.c_in, co = d.c_out, po = d.p_out, r = d.r, tile = n * d.groups + g;
  TileStats st;

  // Channel mixing: pre1 = x M + T F^M_all (x E^M_all and T are needed by the backward either way).
  if constexpr (!std::is_same<T, float>::value) widen_into(p.x + tile * pi * ci, pi * ci, w.x);
  const float* x = x_of(p, w, tile);
  const bool saved = p.pre1_in != nullptr;
  float* p1 = p.pre1_out != nullptr ? p.pre1_out + tile * pi * co : w.p1;
  if (!saved) {
    pack_b(p.m + tile * ci * co, co, ci, co, w.mp);
    gemm(pi, co, ci, rows_of(x, ci), w.mp, p1, co, pf);
  }
  if (d.rm > 0) {
    gemm(pi, d.rm, ci, rows_of(x, ci), f.em_p.data() + g * f.em_p_size, w.xe, d.rm, pf);  // x E^M_all
    for (int64_t k = 0; k < d.km; ++k) {
      pack_b(p.qm + (tile * d.km + k) * r * r, r, r, r, w.qp);
      gemm(pi, r, r, rows_of(w.xe + k * r, d.rm), w.qp, w.t + k * r, d.rm, pf);  // T_k = (x E_k) Q_k
    }
    if (!saved) gemm(pi, co, d.rm, rows_of(w.t, d.rm), f.fm_p.data() + g * f.fm_p_size, p1, co, pf, true);
  }
  st.pre1 = saved ? p.pre1_in + tile * pi * co : p1;
  st.ln1 = layer_norm_stats(st.pre1, pi * co, p.eps);
  layer_norm_relu_packed(st.pre1, pi, co, st.ln1, w.hp, keep_h ? w.h : nullptr);

  // Spatial mixing: pre2 = S_eff h.
  widen_into(p.s + tile * po * pi, po * pi, w.se);
  if (d.rs > 0) {
    for (int64_t k = 0; k < d.ks; ++k) {
      pack_b(p.qs + (tile * d.ks + k) * r * r, r, r, r, w.qp);
      gemm(po, r, r, rows_of(f.es.data() + (g * d.ks + k) * po * r, r), w.qp, w.eq + k * r, d.rs, pf);  // E_k Q_k
    }
    gemm(po, pi, d.rs, rows_of(w.eq, d.rs), f.fs_p.data() + g * f.fs_p_size, w.se, pi, pf, true);
  }
  gemm(po, co, pi, rows_of(w.se, pi), w.hp, w.p2, co, pf);
  st.ln2 = layer_norm_stats(w.p2, po * co, p.eps);
  return st;
}

template <class T>
LORS_INLINE void forward_tiles_impl(const Problem<T>& p, const Factors& f, const Workspace& w, int64_t begin,
                                    int64_t end) {
  const Dims& d = p.d;
  for (int64_t tile = begin; tile < end; ++tile) {
    Prefetcher pf;
    if (tile + 1 < d.bn * d.groups) prefetch_tile(p, (tile + 1) / d.groups, (tile + 1) % d.groups, false, pf);
    const TileStats st = forward_tile(p, f, w, tile / d.groups, tile % d.groups, false, pf);
    layer_norm_relu_store(w.p2, d.p_out * d.c_out, st.ln2, p.out + tile * d.p_out * d.c_out);
  }
}

// Every gradient of tile (n, g): dx, dM, dS, dQ written, dE and dF added to the chunk's partial sums.
template <class T>
LORS_INLINE void backward_tile(const Problem<T>& p, const Factors& f, const Workspace& w, int64_t n, int64_t g,
                               const Partial& part, Prefetcher& pf) {
  const Dims& d = p.d;
  const int64_t pi = d.p_in, ci = d.c_in, co = d.c_out, po = d.p_out, r = d.r, tile = n * d.groups + g;
  const TileStats st = forward_tile(p, f, w, n, g, true, pf);
  const float* x = x_of(p, w, tile);

  // Spatial mixing backward: pre2 = S_eff h.
  float* d2 = w.p2;
  layer_norm_relu_backward(w.p2, p.dout + tile * po * co, po, co, st.ln2, d2, w.d2p);
  pack_bt(w.h, co, co, pi, w.htp);
  gemm(po, pi, co, rows_of(d2, co), w.htp, w.dsm, pi, pf);  // dS_eff = d pre2 h^T
  store_tile(w.dsm, po * pi, p.ds + tile * po * pi);
  gemm(pi, co, po, transpose_of(w.se, pi), w.d2p, w.dh, co, pf);  // dh = S_eff^T d pre2
  if (d.rs > 0) {
    pack_b(w.dsm, pi, po, pi, w.dsp);
    gemm(d.rs, pi, po, transpose_of(w.eq, d.rs), w.dsp, part.dfs, pi, pf, true);  // dF^S_all += (E Q)_all^T dS
    gemm(po, d.rs, pi, rows_of(w.dsm, pi), f.fs_tp.data() + g * f.fs_tp_size, w.u, d.rs, pf);  // U = dS F^S_all^T
    for (int64_t k = 0; k < d.ks; ++k) {
      const T* q = p.qs + (tile * d.ks + k) * r * r;
      pack_bt(q, r, r, r, w.qp);
      gemm(po, r, r, rows_of(w.u + k * r, d.rs), w.qp, part.des + k * po * r, r, pf, true);  // dE_k += U_k Q_k^T
      pack_b(w.u + k * r, d.rs, po, r, w.up);
      gemm(r, r, po, transpose_of(f.es.data() + (g * d.ks + k) * po * r, r), w.up, p.dqs + (tile * d.ks + k) * r * r,
           r, pf);  // dQ_k = E_k^T U_k
    }
  }

  // Channel mixing backward: pre1 = x M + T F^M_all.
  float* d1 = w.dh;
  layer_norm_relu_backward(st.pre1, w.dh, pi, co, st.ln1, d1, w.d1p);
  gemm(ci, co, pi, transpose_of(x, ci), w.d1p, p.dm + tile * ci * co, co, pf);  // dM = x^T d pre1
  pack_bt(p.m + tile * ci * co, co, co, ci, w.mp);                            // M^T
  float* dx = w.dx;
  if constexpr (std::is_same<T, float>::value) dx = p.dx + tile * pi * ci;  // fp32: accumulate in place
  gemm(pi, ci, co, rows_of(d1, co), w.mp, dx, ci, pf);  // dx = d pre1 M^T
  if (d.rm > 0) {
    gemm(d.rm, co, pi, transpose_of(w.t, d.rm), w.d1p, part.dfm, co, pf, true);               // dF^M_all += T^T d pre1
    gemm(pi, d.rm, co, rows_of(d1, co), f.fm_tp.data() + g * f.fm_tp_size, w.dt, d.rm, pf);  // dT = d pre1 F^M_all^T
    for (int64_t k = 0; k < d.km; ++k) {
      pack_b(w.dt + k * r, d.rm, pi, r, w.dtp);
      gemm(r, r, pi, transpose_of(w.xe + k * r, d.rm), w.dtp, p.dqm + (tile * d.km + k) * r * r,
           r, pf);  // dQ_k = (x E_k)^T dT_k
      pack_bt(p.qm + (tile * d.km + k) * r * r, r, r, r, w.qp);
      gemm(pi, r, r, rows_of(w.dt + k * r, d.rm), w.qp, w.dxe + k * r, d.rm, pf);  // d(x E_k) = dT_k Q_k^T
      pack_b(w.dxe + k * r, d.rm, pi, r, w.dtp);
      gemm(ci, r, pi, transpose_of(x, ci), w.dtp, part.dem + k * ci * r, r, pf, true);  // dE_k += x^T d(x E_k)
    }
    gemm(pi, ci, d.rm, rows_of(w.dxe, d.rm), f.em_tp.data() + g * f.em_tp_size, dx, ci, pf, true);  // dx += d(xE) E^T
  }
  if constexpr (!std::is_same<T, float>::value) store_tile(w.dx, pi * ci, p.dx + tile * pi * ci);
}

template <class T>
LORS_INLINE void backward_chunk_impl(const Problem<T>& p, const Factors& f, const Workspace& w, int64_t n_begin,
                                     int64_t n_end, int64_t g, float* partial) {
  std::fill(partial, partial + partial_size(p.d), 0.f);
  const Partial part = partial_at(partial, p.d);
  for (int64_t n = n_begin; n < n_end; ++n) {
    Prefetcher pf;
    if (n + 1 < n_end) prefetch_tile(p, n + 1, g, true, pf);
    backward_tile(p, f, w, n, g, part, pf);
  }
}

// The multiversioned entry points, one per dtype (templates cannot be cloned).
LORS_MULTIVERSION_AVX512 void forward_tiles(const Problem<float>& p, const Factors& f, const Workspace& w,
                                            int64_t begin, int64_t end) {
  forward_tiles_impl(p, f, w, begin, end);
}

LORS_MULTIVERSION_AVX512 void forward_tiles(const Problem<uint16_t>& p, const Factors& f, const Workspace& w,
                                            int64_t begin, int64_t end) {
  forward_tiles_impl(p, f, w, begin, end);
}

LORS_MULTIVERSION_AVX512 void backward_chunk(const Problem<float>& p, const Factors& f, const Workspace& w,
                                             int64_t n_begin, int64_t n_end, int64_t g, float* partial) {
  backward_chunk_impl(p, f, w, n_begin, n_end, g, partial);
}

LORS_MULTIVERSION_AVX512 void backward_chunk(const Problem<uint16_t>& p, const Factors& f, const Workspace& w,
                                             int64_t n_begin, int64_t n_end, int64_t g, float* partial) {
  backward_chunk_impl(p, f, w, n_begin, n_end, g, partial);
}

int threads_for(int64_t items, int num_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
}

template <class T>
void forward(const Problem<T>& p, int num_threads) {
  const int64_t tiles = p.d.bn * p.d.groups;
  if (tiles == 0 || p.d.p_out * p.d.c_out == 0) return;
  const Factors f = build_factors(p, false);
  const int threads = threads_for(tiles, num_threads);
  (void)threads;  // unused without OpenMP
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const Workspace w(p.d, false, !std::is_same<T, float>::value);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) forward_tiles(p, f, w, tile, tile + 1);
  }
}

template <class T>
void backward(const Problem<T>& p, T* dem, T* dfm, T* des, T* dfs, int num_threads) {
  const Dims& d = p.d;
  // Queries per chunk depend on BN alone: the chunks, and so every sum, are the same on any thread count.
  const int64_t chunk = std::max<int64_t>(1, (d.bn + kMaxChunksPerGroup - 1) / kMaxChunksPerGroup);
  const int64_t chunks = (d.bn + chunk - 1) / chunk;
  const int64_t psize = partial_size(d);
  std::unique_ptr<float[]> partials(new float[static_cast<size_t>(std::max<int64_t>(1, d.groups * chunks * psize))]);
  const Factors f = build_factors(p, true);
  const int threads = threads_for(d.groups * chunks, num_threads);
  (void)threads;
  // Where each section of a group's partial sums goes: (offset in the partial, size, output).
  const int64_t sections[4][2] = {{0, d.rm * d.c_in},
                                  {d.rm * d.c_in, d.rm * d.c_out},
                                  {d.rm * (d.c_in + d.c_out), d.rs * d.p_out},
                                  {d.rm * (d.c_in + d.c_out) + d.rs * d.p_out, d.rs * d.p_in}};
  T* const outputs[4] = {dem, dfm, des, dfs};

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const Workspace w(d, true, !std::is_same<T, float>::value);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < d.groups * chunks; ++c) {
      const int64_t g = c / chunks, n0 = (c % chunks) * chunk;
      backward_chunk(p, f, w, n0, std::min(d.bn, n0 + chunk), g, partials.get() + c * psize);
    }
    // (implicit barrier: every partial is complete) Each element sums its chunks in chunk order; a block
    // of elements at a time, so that the partials are read front to back.
    for (int s = 0; s < 4; ++s) {
      const int64_t offset = sections[s][0], size = sections[s][1], blocks = (size + kSumBlock - 1) / kSumBlock;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < d.groups * blocks; ++b) {
        const int64_t g = b / blocks, i0 = (b % blocks) * kSumBlock, len = std::min(kSumBlock, size - i0);
        float sum[kSumBlock] = {};
        for (int64_t c = 0; c < chunks; ++c) {
          const float* part = partials.get() + (g * chunks + c) * psize + offset + i0;
          for (int64_t i = 0; i < len; ++i) sum[i] += part[i];
        }
        for (int64_t i = 0; i < len; ++i) store(sum[i], outputs[s] + g * size + i0 + i);
      }
    }
  }
}

template <class T>
Problem<T> problem(const T* x, const T* m, const T* s, const T* em, const T* qm, const T* fm, const T* es,
                   const T* qs, const T* fs, const AdaptiveMixingSizes& sizes, float eps) {
  Problem<T> p{};
  p.x = x, p.m = m, p.s = s, p.em = em, p.qm = qm, p.fm = fm, p.es = es, p.qs = qs, p.fs = fs;
  p.d = dims_of(sizes);
  p.eps = eps;
  return p;
}

template <class T>
void backward_entry(const T* dout, const T* x, const T* m, const T* s, const T* em, const T* qm, const T* fm,
                    const T* es, const T* qs, const T* fs, const float* pre1, T* dx, T* dm, T* ds, T* dem, T* dqm,
                    T* dfm, T* des, T* dqs, T* dfs, const AdaptiveMixingSizes& sizes, float eps, int num_threads) {
  Problem<T> p = problem(x, m, s, em, qm, fm, es, qs, fs, sizes, eps);
  p.pre1_in = pre1;
  p.dout = dout, p.dx = dx, p.dm = dm, p.ds = ds, p.dqm = dqm, p.dqs = dqs;
  backward(p, dem, dfm, des, dfs, num_threads);
}

}  // namespace

void adaptive_mixing_forward_f32(const float* x, const float* m, const float* s, const float* em, const float* qm,
                                 const float* fm, const float* es, const float* qs, const float* fs, float* out,
                                 float* pre1, const AdaptiveMixingSizes& sizes, float eps, int num_threads) {
  Problem<float> p = problem(x, m, s, em, qm, fm, es, qs, fs, sizes, eps);
  p.out = out, p.pre1_out = pre1;
  forward(p, num_threads);
}

void adaptive_mixing_forward_bf16(const uint16_t* x, const uint16_t* m, const uint16_t* s, const uint16_t* em,
                                  const uint16_t* qm, const uint16_t* fm, const uint16_t* es, const uint16_t* qs,
                                  const uint16_t* fs, uint16_t* out, float* pre1, const AdaptiveMixingSizes& sizes,
                                  float eps, int num_threads) {
  Problem<uint16_t> p = problem(x, m, s, em, qm, fm, es, qs, fs, sizes, eps);
  p.out = out, p.pre1_out = pre1;
  forward(p, num_threads);
}

void adaptive_mixing_backward_f32(const float* dout, const float* x, const float* m, const float* s,
                                  const float* em, const float* qm, const float* fm, const float* es,
                                  const float* qs, const float* fs, const float* pre1, float* dx, float* dm,
                                  float* ds, float* dem, float* dqm, float* dfm, float* des, float* dqs, float* dfs,
                                  const AdaptiveMixingSizes& sizes, float eps, int num_threads) {
  backward_entry(dout, x, m, s, em, qm, fm, es, qs, fs, pre1, dx, dm, ds, dem, dqm, dfm, des, dqs, dfs, sizes, eps,
                 num_threads);
}

void adaptive_mixing_backward_bf16(const uint16_t* dout, const uint16_t* x, const uint16_t* m, const uint16_t* s,
                                   const uint16_t* em, const uint16_t* qm, const uint16_t* fm, const uint16_t* es,
                                   const uint16_t* qs, const uint16_t* fs, const float* pre1, uint16_t* dx,
                                   uint16_t* dm, uint16_t* ds, uint16_t* dem, uint16_t* dqm, uint16_t* dfm,
                                   uint16_t* des, uint16_t* dqs, uint16_t* dfs, const AdaptiveMixingSizes& sizes,
                                   float eps, int num_threads) {
  backward_entry(dout, x, m, s, em, qm, fm, es, qs, fs, pre1, dx, dm, ds, dem, dqm, dfm, des, dqs, dfs, sizes, eps,
                 num_threads);
}

}  // namespace cpu
}  // namespace lors_kernels
