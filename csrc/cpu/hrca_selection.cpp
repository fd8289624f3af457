// HRCA selection on the CPU: the k best low-resolution cells (window mode) and the k best pixels of a
// bilinearly upsampled score map (bilinear mode), with a partial selection instead of a sort.
//
// Top-k over a stream: candidates are appended to a buffer of 2k (at least k + 1024); when it is full,
// nth_element keeps the k best and their worst becomes a threshold that later pixels must beat. Pixels
// arrive in ascending index order, so one equal to the threshold loses its tie and is dropped at once.
// The values are float64 and reproduce the PyTorch reference's arithmetic operation by operation, so
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

  // A cheap first test for the hot loop: values v with v <= bar() cannot enter (NaN until the first
  // prune, and while the k-th best is NaN: then nothing compares, and offer decides).
  double bar() const { return bar_; }

  void offer(double value, int64_t index) {
    const uint64_t key = order_key(value);
    if (full_ && key <= threshold_) return;  // equal keys: the earlier (lower) index wins
    best_.push_back({key, index, value});
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
    threshold_ = best_[k_ - 1].key;  // nth_element put the k-th best there, only better ones before it
    bar_ = best_[k_ - 1].value;
    full_ = true;
  }

  int64_t k_, capacity_;
  std::vector<Candidate> best_;
  uint64_t threshold_ = 0;
  double bar_ = std::numeric_limits<double>::quiet_NaN();
  bool full_ = false;
};

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

// The k best pixels among output rows [y_begin, y_end) of one map.
void topk_rows(const double* map, int64_t lw, int64_t hw, const Taps& ty, const Taps& tx, int64_t y_begin,
               int64_t y_end, TopK& top) {
  // Upsample along x the low rows these output rows read (a + w (b - a): exact where the taps agree).
  const int64_t low_begin = ty.i0[y_begin], low_end = ty.i1[y_end - 1] + 1;
  std::vector<double> along_x(static_cast<size_t>((low_end - low_begin) * hw));
  for (int64_t ly = low_begin; ly < low_end; ++ly) {
    const double* src = map + ly * lw;
    double* dst = along_x.data() + (ly - low_begin) * hw;
    for (int64_t x = 0; x < hw; ++x) {
      const double a = src[tx.i0[x]], b = src[tx.i1[x]];
      dst[x] = a + tx.w[x] * (b - a);
    }
  }
  std::vector<double> row(static_cast<size_t>(hw));
  for (int64_t y = y_begin; y < y_end; ++y) {
    const double* top_row = along_x.data() + (ty.i0[y] - low_begin) * hw;
    const double* bottom_row = along_x.data() + (ty.i1[y] - low_begin) * hw;
    const double w = ty.w[y];
    for (int64_t x = 0; x < hw; ++x) row[x] = top_row[x] + w * (bottom_row[x] - top_row[x]);  // vectorizes
    double bar = top.bar();
    for (int64_t x = 0; x < hw; ++x) {
      if (!(row[x] <= bar)) {  // most pixels stop here once the buffer has been pruned
        top.offer(row[x], y * hw + x);
        bar = top.bar();
      }
    }
  }
}

void sorted_indices(std::vector<Candidate>& best, int64_t* out) {
  std::sort(best.begin(), best.end(), [](const Candidate& a, const Candidate& b) { return a.index < b.index; });
  for (size_t i = 0; i < best.size(); ++i) out[i] = best[i].index;
}

}  // namespace

void select_windows(const double* cells, int64_t rows, int64_t lh, int64_t lw, int64_t ws, int64_t k,
                    int64_t* out, int num_threads) {
  (void)num_threads;  // rows of at most a few thousand cells: threads would cost more than they save
  const int64_t n_low = lh * lw, high_w = lw * ws, window = ws * ws;
  std::vector<int64_t> cells_kept(static_cast<size_t>(k));
  for (int64_t r = 0; r < rows; ++r) {
    TopK top(k);
    for (int64_t c = 0; c < n_low; ++c) top.offer(cells[r * n_low + c], c);
    sorted_indices(top.finish(), cells_kept.data());
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
  const int64_t parts = std::min<int64_t>(hh, rows >= num_threads ? 1 : (num_threads + rows - 1) / rows);
  const int64_t rows_per_part = (hh + parts - 1) / parts;
  std::vector<std::vector<Candidate>> found(static_cast<size_t>(rows * parts));
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, rows * parts)));
  (void)threads;  // unused without OpenMP

#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t task = 0; task < rows * parts; ++task) {
    const int64_t r = task / parts, y_begin = (task % parts) * rows_per_part;
    const int64_t y_end = std::min(hh, y_begin + rows_per_part);
    if (y_begin >= y_end) continue;
    TopK top(k);
    topk_rows(maps + r * lh * lw, lw, hw, ty, tx, y_begin, y_end, top);
    found[task] = std::move(top.finish());
  }

#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && parts == 1)
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<Candidate>& best = found[r * parts];
    for (int64_t p = 1; p < parts; ++p) best.insert(best.end(), found[r * parts + p].begin(), found[r * parts + p].end());
    if (static_cast<int64_t>(best.size()) > k) {
      std::nth_element(best.begin(), best.begin() + (k - 1), best.end(), better);
      best.resize(static_cast<size_t>(k));
    }
    sorted_indices(best, out + r * k);
  }
}

}  // namespace cpu
}  // namespace lors_kernels
