// HRCA selection on the CPU: the k best low-resolution cells (window mode) and the k best pixels of a
// bilinearly upsampled score map (bilinear mode), with a partial selection instead of a sort.
//
// Top-k over a stream: candidates are appended to a buffer of 2k (at least k + 1024); when it is full,
// nth_element keeps the k best and their worst becomes the bar that later pixels must beat. A bilinear
// value is a convex combination of its four low-resolution taps, and the output pixels sharing the
// same four taps form a block (about ws x ws pixels) bounded by their largest: blocks are visited best
// bound first, and once the bar is above the next bound, no other pixel is computed. The values are float64 and reproduce the PyTorch reference's arithmetic operation by operation, so
// the same pixels are chosen: hence no FMA contraction in this file (a fused a + w * (b - a) rounds
// differently).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "hrca.h"

namespace lors_kernels {
namespace cpu {
namespace {

constexpr int64_t kMinPixelsPerThread = 1 << 16;

// A candidate: an order-preserving key of its value and its index. Better = larger key, then lower
// index: a strict total order, so the k best are unique and any split of the work finds the same ones.
struct Candidate {
  uint64_t key;
  int64_t index;
  double value;
};

inline bool better(const Candidate& a, const Candidate& b) {
  return a.key != b.key ? a.key > b.key : a.index < b.index;
}

// Unsigned keys in the order torch.sort compares doubles: -0 == +0, NaN above +inf (all NaNs equal).
inline uint64_t order_key(double v) {
  if (std::isnan(v)) return std::numeric_limits<uint64_t>::max();
  v += 0.0;  // -0 -> +0
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits >> 63) ? ~bits : bits | (uint64_t{1} << 63);
}

// The k best of a stream of candidates offered in ascending index order.
class TopK {
 public:
  explicit TopK(int64_t k) : k_(k), capacity_(std::max<int64_t>(2 * k, k + 1024)) {
    best_.reserve(static_cast<size_t>(capacity_));
  }

  // Empty again, keeping the buffer (one TopK serves every map a thread selects from).
  void reset() {
    best_.clear();
    bar_ = std::numeric_limits<double>::quiet_NaN();
    full_ = false;
  }

  // A cheap first test for the hot loop: values v < bar() cannot enter (NaN until the first prune, and
  // while the k-th best is NaN: then nothing compares, and offer decides).
  double bar() const { return bar_; }

  // Candidates may come in any order: ties are settled by the index in better().
  void offer(double value, int64_t index) {
    const Candidate c{order_key(value), index, value};
    if (full_ && !better(c, worst_)) return;
    best_.push_back(c);
    if (static_cast<int64_t>(best_.size()) == capacity_) prune();
  }

  // The k best (fewer if fewer were offered), in no particular order.
  std::vector<Candidate>& finish() {
    if (static_cast<int64_t>(best_.size()) > k_) prune();
    return best_;
  }

 private:
  void prune() {
    std::nth_element(best_.begin(), best_.begin() + (k_ - 1), best_.end(), better);
    best_.resize(static_cast<size_t>(k_));
    worst_ = best_[k_ - 1];  // nth_element put the k-th best there, only better ones before it
    bar_ = worst_.value;
    full_ = true;
  }

  int64_t k_, capacity_;
  std::vector<Candidate> best_;
  Candidate worst_{};
  double bar_ = std::numeric_limits<double>::quiet_NaN();
  bool full_ = false;
};

// (1 - w) a + w b as a + w (b - a): exactly a where the taps are equal, so equal pixels tie. A tap of
// weight 0 is left out and an infinite a kept, where a + w (b - a) would make NaN of both (the
// reference's _lerp; scores without inf or NaN take the plain formula, which gives the same values).
inline double lerp(double a, double b, double w) {
  if (w == 0 || a == b) return a;
  return std::isinf(a) ? a + b : a + w * (b - a);
}

// F.interpolate(mode="bilinear", align_corners=False) along one axis, as the reference computes it.
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<double> w;

  Taps(int64_t out_size, int64_t in_size) : i0(out_size), i1(out_size), w(out_size) {
    const double ratio = static_cast<double>(in_size) / static_cast<double>(out_size);
    for (int64_t i = 0; i < out_size; ++i) {
      const double pos = std::max((static_cast<double>(i) + 0.5) * ratio - 0.5, 0.0);
      i0[i] = std::min(static_cast<int64_t>(std::floor(pos)), in_size - 1);
      i1[i] = std::min(i0[i] + 1, in_size - 1);
      w[i] = pos - static_cast<double>(i0[i]);
    }
  }
};

// Runs of consecutive outputs [begin, end) of one axis that read the same two taps.
std::vector<std::pair<int64_t, int64_t>> tap_runs(const Taps& t, int64_t begin, int64_t end) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t i = begin; i < end; ++i) {
    if (runs.empty() || t.i0[i] != t.i0[runs.back().first] || t.i1[i] != t.i1[runs.back().first]) {
      runs.emplace_back(i, i + 1);
    } else {
      runs.back().second = i + 1;
    }
  }
  return runs;
}

// Output pixels sharing their four taps, and the largest tap (plus slack): a bound of their values.
struct Block {
  double bound;
  int32_t row_run, col_run;
};

// What a thread reuses from map to map.
struct Workspace {
  std::vector<double> along_x;
  std::vector<Block> blocks;
  std::vector<uint64_t> marks;
  TopK top;
  explicit Workspace(int64_t k) : top(k) {}
};

// The k best pixels among output rows [y_begin, y_end) of one map (lh x lw, row-major), into w.top.
void topk_rows(const double* map, int64_t lw, int64_t hw, const Taps& ty, const Taps& tx, int64_t y_begin,
               int64_t y_end, int64_t k, Workspace& w) {
  // Upsample along x the low rows these output rows read (a + w (b - a): exact where the taps agree).
  const int64_t low_begin = ty.i0[y_begin], low_end = ty.i1[y_end - 1] + 1;
  w.along_x.resize(static_cast<size_t>((low_end - low_begin) * hw));
  double magnitude = 0.0;
  bool finite = true;
  for (int64_t ly = low_begin; ly < low_end; ++ly) {
    const double* src = map + ly * lw;
    double* dst = w.along_x.data() + (ly - low_begin) * hw;
    for (int64_t x = 0; x < lw; ++x) {
      magnitude = std::max(magnitude, std::fabs(src[x]));
      finite = finite && std::isfinite(src[x]);
    }
    for (int64_t x = 0; x < hw; ++x) {
      const double a = src[tx.i0[x]], b = src[tx.i1[x]];
      dst[x] = finite ? a + tx.w[x] * (b - a) : lerp(a, b, tx.w[x]);
    }
  }
  // Bounds with slack for the two roundings of a + w (b - a) (a few ulps of the largest magnitude). With
  // an inf or NaN among the taps the slack is inf: then no block is ever skipped.
  const double slack = finite ? magnitude * 0x1p-48 : std::numeric_limits<double>::infinity();
  const auto rows = tap_runs(ty, y_begin, y_end), cols = tap_runs(tx, 0, hw);
  std::vector<Block>& blocks = w.blocks;
  blocks.clear();
  for (size_t r = 0; r < rows.size(); ++r) {
    const double* top_taps = map + ty.i0[rows[r].first] * lw;
    const double* bottom_taps = map + ty.i1[rows[r].first] * lw;
    for (size_t c = 0; c < cols.size(); ++c) {
      const int64_t x0 = tx.i0[cols[c].first], x1 = tx.i1[cols[c].first];
      const double high = std::max(std::max(top_taps[x0], top_taps[x1]), std::max(bottom_taps[x0], bottom_taps[x1]));
      blocks.push_back({high + slack, static_cast<int32_t>(r), static_cast<int32_t>(c)});
    }
  }
  // The best-bounded blocks first, about 2k pixels of them (a partial selection, not a sort): they
  // raise the bar at once, and most other blocks are then skipped whole.
  const int64_t pixels = (y_end - y_begin) * hw, n_blocks = static_cast<int64_t>(blocks.size());
  const int64_t first = std::min(n_blocks, 2 * k * n_blocks / pixels + 1);
  std::nth_element(blocks.begin(), blocks.begin() + (first - 1), blocks.end(),
                   [](const Block& a, const Block& b) { return a.bound > b.bound; });

  TopK& top = w.top;
  top.reset();
  for (const Block& block : blocks) {
    double bar = top.bar();
    if (block.bound < bar) continue;  // no pixel of this block can enter
    const auto [x_begin, x_end] = cols[block.col_run];
    for (int64_t y = rows[block.row_run].first; y < rows[block.row_run].second; ++y) {
      const double* top_row = w.along_x.data() + (ty.i0[y] - low_begin) * hw;
      const double* bottom_row = w.along_x.data() + (ty.i1[y] - low_begin) * hw;
      const double wy = ty.w[y];
      for (int64_t x = x_begin; x < x_end; ++x) {
        const double v = finite ? top_row[x] + wy * (bottom_row[x] - top_row[x]) : lerp(top_row[x], bottom_row[x], wy);
        if (!(v < bar)) {  // most pixels stop here once the bar is up
          top.offer(v, y * hw + x);
          bar = top.bar();
        }
      }
    }
  }
}

inline int lowest_set_bit(uint64_t bits) {
#if defined(__GNUC__)
  return __builtin_ctzll(bits);
#else
  int i = 0;
  for (; !(bits & 1); bits >>= 1) ++i;
  return i;
#endif
}

// The candidates' indices (distinct, in [0, n)) in ascending order: marked in a bitmap of n bits and
// read back, O(n / 64 + k) instead of a sort.
void sorted_indices(const std::vector<Candidate>& best, int64_t n, std::vector<uint64_t>& marks, int64_t* out) {
  marks.assign(static_cast<size_t>((n + 63) / 64), 0);
  for (const Candidate& c : best) marks[c.index >> 6] |= uint64_t{1} << (c.index & 63);
  for (size_t word = 0; word < marks.size(); ++word) {
    for (uint64_t bits = marks[word]; bits; bits &= bits - 1) *out++ = static_cast<int64_t>(word * 64) + lowest_set_bit(bits);
  }
}

}  // namespace

void select_windows(const double* cells, int64_t rows, int64_t lh, int64_t lw, int64_t ws, int64_t k,
                    int64_t* out) {
  const int64_t n_low = lh * lw, high_w = lw * ws, window = ws * ws;
  std::vector<int64_t> cells_kept(static_cast<size_t>(k));
  std::vector<uint64_t> marks;
  for (int64_t r = 0; r < rows; ++r) {
    TopK top(k);
    for (int64_t c = 0; c < n_low; ++c) top.offer(cells[r * n_low + c], c);
    sorted_indices(top.finish(), n_low, marks, cells_kept.data());
    int64_t* dst = out + r * k * window;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t cy = cells_kept[i] / lw, cx = cells_kept[i] % lw;
      for (int64_t dy = 0; dy < ws; ++dy)
        for (int64_t dx = 0; dx < ws; ++dx) *dst++ = (cy * ws + dy) * high_w + cx * ws + dx;
    }
  }
}

void select_topk_pixels(const double* maps, int64_t rows, int64_t lh, int64_t lw, int64_t hh, int64_t hw,
                        int64_t k, int64_t* out, int num_threads) {
  if (rows == 0 || k == 0) return;
  const Taps ty(hh, lh), tx(hw, lw);
  // Fewer maps than threads (a shared set for one image): each map's rows are split into parts whose
  // k best are merged. The k best are unique (a total order), so the split does not change them.
  // A thread gets at least kMinPixelsPerThread pixels (below that, starting it costs more than it
  // saves) and at least 32 k: every part keeps its own k best, and a part with fewer pixels skips too
  // few blocks to pay for that (Cityscapes, k = 4096: one thread 0.15-0.21 ms, two 0.27-0.28 ms).
  const int64_t pixels_per_thread = std::max<int64_t>(kMinPixelsPerThread, 32 * k);
  const int64_t useful = std::max<int64_t>(1, rows * hh * hw / pixels_per_thread);
  const int64_t team = std::min<int64_t>(num_threads, useful);
  const int64_t parts = std::min<int64_t>(hh, rows >= team ? 1 : (team + rows - 1) / rows);
  const int64_t rows_per_part = (hh + parts - 1) / parts;
  std::vector<std::vector<Candidate>> found(static_cast<size_t>(parts > 1 ? rows * parts : 0));
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(team, rows * parts)));
  (void)threads;  // unused without OpenMP

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Workspace workspace(k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < rows * parts; ++task) {
      const int64_t r = task / parts, y_begin = (task % parts) * rows_per_part;
      const int64_t y_end = std::min(hh, y_begin + rows_per_part);
      if (y_begin >= y_end) continue;
      topk_rows(maps + r * lh * lw, lw, hw, ty, tx, y_begin, y_end, k, workspace);
      if (parts == 1) {
        sorted_indices(workspace.top.finish(), hh * hw, workspace.marks, out + r * k);
      } else {
        found[task] = workspace.top.finish();
      }
    }
  }

  std::vector<uint64_t> marks;
  for (int64_t r = 0; parts > 1 && r < rows; ++r) {  // merge the parts of each map
    std::vector<Candidate>& best = found[r * parts];
    for (int64_t p = 1; p < parts; ++p) best.insert(best.end(), found[r * parts + p].begin(), found[r * parts + p].end());
    if (static_cast<int64_t>(best.size()) > k) {
      std::nth_element(best.begin(), best.begin() + (k - 1), best.end(), better);
      best.resize(static_cast<size_t>(k));
    }
    sorted_indices(best, hh * hw, marks, out + r * k);
  }
}

}  // namespace cpu
}  // namespace lors_kernels
