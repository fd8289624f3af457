// Static LORS linear for decode (static.h): split-K streaming of the shared weight with the
// low-rank term in the same launch.
//
// Block (tile, split) owns weight rows [n0, n0 + kTileRows) and columns [k0, k0 + slice) of K:
//
//   partial[tile][split][m][q] = sum over the slice of x[m, k] * source_q[k],
//   source_q = weight[n0 + q] for q < kTileRows, down[q - kTileRows] after them,
//
// so every block also computes its slice's share of t = x @ down^T. Down is read once per tile (from
// L2, it is small): the price of needing no second launch, kept to R / kTileRows of the weight's
// traffic. The last block of a tile to finish then computes, in fixed order,
//
//   t[m, :] = scaling * sum over splits of the down partials             (in shared memory)
//   y[m, n] = (sum over splits of the weight partials) + t[m, :] . up[n, :] + bias[n].
//
// A warp streams kGroupRows source rows at a time, lanes striding along K with 16-byte loads; x sits
// in shared memory as fp32, read once per group of rows. Each lane accumulates its own share of the
// kGroupRows x kRowsX dot products, and a transposing butterfly sums them over the warp.
#include "static.h"

#include <climits>

#include "numeric.cuh"

namespace lors_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 128;   // weight rows per tile
constexpr int kGroupRows = 4;    // source rows a warp streams together: each x value read serves 4
constexpr int kMaxSlice = 512;   // K columns per block at most: x's slice, kRowsX x kMaxSlice fp32, fits in 32 KiB
constexpr int kBlocksPerSm = 2;  // the split of K aims at this many blocks per multiprocessor
constexpr unsigned kAllLanes = 0xffffffffu;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
constexpr int log2_of(int v) { return v <= 1 ? 0 : 1 + log2_of(v / 2); }

struct Plan {
  int64_t tiles, splits, slice;
  int rows_x;  // M rounded up to a power of two: the kernel's kRowsX
  size_t ticket_bytes, bytes, shared_bytes;
};

Plan make_plan(int64_t m, int64_t n, int64_t k, int64_t r, Dtype dtype, int num_sms) {
  Plan p{};
  const int64_t element_bytes = dtype == Dtype::kFloat32 ? 4 : 2;
  const int64_t step = 32 * (16 / element_bytes);  // one 16-byte vector per lane and row
  p.tiles = ceil_div(n, kTileRows);
  const int64_t wanted_splits = ceil_div(static_cast<int64_t>(kBlocksPerSm) * num_sms, p.tiles);
  const int64_t slice = round_up(ceil_div(k, wanted_splits), step);
  p.slice = slice < step ? step : slice > kMaxSlice ? kMaxSlice : slice;
  p.splits = k > 0 ? ceil_div(k, p.slice) : 1;
  p.rows_x = 1;
  while (p.rows_x < m) p.rows_x *= 2;
  p.ticket_bytes = static_cast<size_t>(round_up(p.tiles * 4, 16));
  p.bytes = p.ticket_bytes + sizeof(float) * static_cast<size_t>(p.tiles * p.splits * m * (kTileRows + r));
  p.shared_bytes = sizeof(float) * static_cast<size_t>(p.rows_x) * static_cast<size_t>(p.slice > r ? p.slice : r);
  return p;
}

template <class T>
struct Args {
  const T* x;
  const T* weight;
  const T* down;
  const T* up;
  const T* bias;
  float scaling;
  T* y;
  int m, n, k, r;
  int slice, splits;
  float* partial;  // [tiles][splits][m][kTileRows + r]
  unsigned* tickets;  // [tiles]
};

// Sums each of a lane's kValues values over the warp (kValues a power of two). While a lane holds more
// than one value, a step at offset o halves them: the lanes with bit o set keep the upper half and
// send the lower half to their partner, which keeps the lower half; after that, butterfly steps add
// the last value. Fewer than 2 * kValues shuffles, where separate reductions take 5 * kValues.
template <int kValues>
struct WarpTransposeSum {
  static constexpr int kSteps = log2_of(kValues < 32 ? kValues : 32);  // halving steps
  static constexpr int kHeld = kValues >= 32 ? kValues / 32 : 1;      // totals a lane ends with

  __device__ __forceinline__ static void run(float (&v)[kValues], int lane) {
    int count = kValues;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      if (count > 1) {
        const int half = count / 2;
        const bool upper = lane & offset;
#pragma unroll
        for (int j = 0; j < kValues / 2; ++j) {
          if (j < half) {
            const float send = upper ? v[j] : v[j + half];
            const float keep = upper ? v[j + half] : v[j];
            v[j] = keep + __shfl_xor_sync(kAllLanes, send, offset);
          }
        }
        count = half;
      } else {
        v[0] += __shfl_xor_sync(kAllLanes, v[0], offset);
      }
    }
  }
  // Which value v[j] of this lane totals, and whether this lane is the first of those holding it.
  __device__ __forceinline__ static int index(int lane, int j) { return (lane >> (5 - kSteps)) * kHeld + j; }
  __device__ __forceinline__ static bool first_holder(int lane) { return lane % (32 >> kSteps) == 0; }
};

// Where column c of x's slice sits in shared memory. With 8-element vectors a lane's 8 columns are
// two float4 halves 128 floats apart, so that the warp's float4 reads of a half are consecutive
// (bank-conflict free); with 4 or 1 the layout is the plain one.
template <int kVec>
__device__ __forceinline__ int x_slot(int c) {
  if constexpr (kVec < 8) {
    return c;
  } else {
    const int block = c / (32 * kVec), in_block = c % (32 * kVec);
    const int lane = in_block / kVec, e = in_block % kVec;
    return block * 32 * kVec + (e / 4) * 128 + lane * 4 + e % 4;
  }
}

// acc[i * kRowsX + mm] += sum over c in [0, width) of rows[i][c] * xs[mm * ld_xs + x_slot(c)], this lane's
// share: vectors at c = lane * kVec + 32 * kVec * t. Null rows contribute nothing.
template <int kVec, int kRowsX, class T>
__device__ __forceinline__ void dot_rows(const T* const (&rows)[kGroupRows], const float* xs, int ld_xs, int width,
                                         int lane, float (&acc)[kGroupRows * kRowsX]) {
  for (int c = lane * kVec; c < width; c += 32 * kVec) {
    float w[kGroupRows][kVec];
#pragma unroll
    for (int i = 0; i < kGroupRows; ++i) {
      if (rows[i] != nullptr) {
        load_floats<kVec>(rows[i] + c, w[i]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) w[i][e] = 0.0f;
      }
    }
    const float* x_at = xs + x_slot<kVec>(c);
#pragma unroll
    for (int mm = 0; mm < kRowsX; ++mm) {
      float xv[kVec];
      if constexpr (kVec >= 4) {
#pragma unroll
        for (int h = 0; h < kVec / 4; ++h) {
          const float4 q = *reinterpret_cast<const float4*>(x_at + mm * ld_xs + h * 128);
          xv[4 * h] = q.x, xv[4 * h + 1] = q.y, xv[4 * h + 2] = q.z, xv[4 * h + 3] = q.w;
        }
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) xv[e] = x_at[mm * ld_xs + e];
      }
#pragma unroll
      for (int i = 0; i < kGroupRows; ++i) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[i * kRowsX + mm] = fmaf(w[i][e], xv[e], acc[i * kRowsX + mm]);
      }
    }
  }
}

template <class T, int kVec, int kRowsX>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) lors_linear_decode_kernel(const Args<T> a) {
  extern __shared__ float4 shared_storage[];  // float4: 16-byte aligned for the vector reads of x
  float* const shared = reinterpret_cast<float*>(shared_storage);
  __shared__ bool last_of_tile;
  using Sum = WarpTransposeSum<kGroupRows * kRowsX>;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int n0 = tile * kTileRows, k0 = split * a.slice;
  const int width = a.k - k0 < a.slice ? a.k - k0 : a.slice;  // 0 only when K = 0
  const int ld_partial = kTileRows + a.r;
  const float* const tile_partials = a.partial + static_cast<int64_t>(tile) * a.splits * a.m * ld_partial;
  float* const partial = a.partial + (static_cast<int64_t>(tile) * a.splits + split) * a.m * ld_partial;

  // x[:, k0 : k0 + width) in fp32; rows past M and columns past the slice's width are zero.
  float* const xs = shared;
  for (int i = tid; i < kRowsX * a.slice; i += kThreads) {
    const int mm = i / a.slice, c = i - mm * a.slice;
    xs[mm * a.slice + x_slot<kVec>(c)] =
        mm < a.m && c < width ? to_float(a.x[static_cast<int64_t>(mm) * a.k + k0 + c]) : 0.0f;
  }
  __syncthreads();

  // Source row q of the tile exists: a weight row before N, or a row of down.
  const auto exists = [&](int q) { return q < kTileRows ? int64_t{n0} + q < a.n : q - kTileRows < a.r; };
  const int groups = (kTileRows + a.r + kGroupRows - 1) / kGroupRows;
  for (int g = warp; g < groups; g += kWarps) {
    const T* rows[kGroupRows];
    bool any = false;
#pragma unroll
    for (int i = 0; i < kGroupRows; ++i) {
      const int q = g * kGroupRows + i;
      rows[i] = !exists(q)        ? nullptr
                : q < kTileRows ? a.weight + static_cast<int64_t>(n0 + q) * a.k + k0
                                : a.down + static_cast<int64_t>(q - kTileRows) * a.k + k0;
      any |= exists(q);  // not rows[i] != nullptr: with K = 0 the weight's pointer itself may be null
    }
    if (!any) continue;  // past N in the last tile
    float acc[kGroupRows * kRowsX] = {};
    dot_rows<kVec, kRowsX>(rows, xs, a.slice, width, lane, acc);
    Sum::run(acc, lane);
#pragma unroll
    for (int j = 0; j < Sum::kHeld; ++j) {
      const int index = Sum::index(lane, j), q = g * kGroupRows + index / kRowsX, mm = index % kRowsX;
      if (Sum::first_holder(lane) && mm < a.m && exists(q)) partial[mm * ld_partial + q] = acc[j];
    }
  }

  // The classic last-block pattern: partials, fence, ticket; the block that draws the last ticket
  // fences again before reading the others' partials (from L2: __ldcg never sees a stale L1 line).
  __threadfence();
  __syncthreads();
  if (tid == 0) last_of_tile = atomicAdd(&a.tickets[tile], 1u) == static_cast<unsigned>(a.splits - 1);
  __syncthreads();
  if (!last_of_tile) return;
  __threadfence();

  // t = scaling * x @ down^T, [kRowsX][r] in shared memory (x's slice is no longer needed).
  float* const t = shared;
  for (int i = tid; i < kRowsX * a.r; i += kThreads) {
    const int mm = i / a.r, rank = i - mm * a.r;
    float sum = 0.0f;
    if (mm < a.m) {
      for (int s = 0; s < a.splits; ++s) {
        sum += __ldcg(tile_partials + (static_cast<int64_t>(s) * a.m + mm) * ld_partial + kTileRows + rank);
      }
    }
    t[i] = a.scaling * sum;
  }
  __syncthreads();

  // y[m, n] = weight partials + t[m] . up[n] + bias[n]; lanes stride along the rank.
  for (int g = warp; g < kTileRows / kGroupRows; g += kWarps) {
    const int64_t first = n0 + g * kGroupRows;  // < N + kTileRows: int64 near 2^31
    if (first >= a.n) break;  // the warp's later groups lie further past N
    const T* rows[kGroupRows];
#pragma unroll
    for (int i = 0; i < kGroupRows; ++i) rows[i] = first + i < a.n ? a.up + (first + i) * a.r : nullptr;
    float acc[kGroupRows * kRowsX] = {};
    dot_rows<1, kRowsX>(rows, t, a.r, a.r, lane, acc);
    Sum::run(acc, lane);
#pragma unroll
    for (int j = 0; j < Sum::kHeld; ++j) {
      const int index = Sum::index(lane, j), i = index / kRowsX, mm = index % kRowsX;
      const int64_t n = first + i;
      if (Sum::first_holder(lane) && mm < a.m && n < a.n) {
        float sum = 0.0f;
        for (int s = 0; s < a.splits; ++s) {
          sum += __ldcg(tile_partials + (static_cast<int64_t>(s) * a.m + mm) * ld_partial + g * kGroupRows + i);
        }
        float value = sum + acc[j];
        if (a.bias != nullptr) value += to_float(a.bias[n]);
        a.y[mm * int64_t{a.n} + n] = from_float<T>(value);
      }
    }
  }
  if (tid == 0) a.tickets[tile] = 0;  // every other block of the tile has drawn its ticket
}

template <class T, int kVec, int kRowsX>
cudaError_t start(const Args<T>& a, const Plan& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.tiles), static_cast<unsigned>(p.splits));
  lors_linear_decode_kernel<T, kVec, kRowsX><<<grid, kThreads, p.shared_bytes, stream>>>(a);
  return cudaGetLastError();
}

template <class T, int kVec>
cudaError_t start_rows(const Args<T>& a, const Plan& p, cudaStream_t stream) {
  switch (p.rows_x) {
    case 1: return start<T, kVec, 1>(a, p, stream);
    case 2: return start<T, kVec, 2>(a, p, stream);
    case 4: return start<T, kVec, 4>(a, p, stream);
    case 8: return start<T, kVec, 8>(a, p, stream);
    case 16: return start<T, kVec, 16>(a, p, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
cudaError_t start_typed(const void* x, const void* weight, const void* down, const void* up, const void* bias,
                        float scaling, void* y, int64_t m, int64_t n, int64_t k, int64_t r, const Plan& p,
                        void* workspace, cudaStream_t stream) {
  const Args<T> a{static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(down),
                  static_cast<const T*>(up), static_cast<const T*>(bias), scaling, static_cast<T*>(y),
                  static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(r),
                  static_cast<int>(p.slice), static_cast<int>(p.splits),
                  reinterpret_cast<float*>(static_cast<char*>(workspace) + p.ticket_bytes),
                  static_cast<unsigned*>(workspace)};
  constexpr int kVec = 16 / sizeof(T);
  const bool vectors = aligned16(weight) && (r == 0 || aligned16(down)) && (k * sizeof(T)) % 16 == 0;
  return vectors ? start_rows<T, kVec>(a, p, stream) : start_rows<T, 1>(a, p, stream);
}

}  // namespace

DecodeWorkspace lors_linear_decode_workspace(int64_t m, int64_t n, int64_t k, int64_t r, Dtype dtype, int num_sms) {
  const Plan p = make_plan(m, n, k, r, dtype, num_sms < 1 ? 1 : num_sms);
  return {p.bytes, p.ticket_bytes};
}

cudaError_t lors_linear_decode(const void* x, const void* weight, const void* down, const void* up, const void* bias,
                               float scaling, void* y, int64_t m, int64_t n, int64_t k, int64_t r, Dtype dtype,
                               int num_sms, void* workspace, cudaStream_t stream) {
  if (m < 1 || m > kDecodeMaxRows || n < 1 || n > INT_MAX || k < 0 || k > INT_MAX || r < 0 || r > kDecodeMaxRank ||
      num_sms < 1 || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const Plan p = make_plan(m, n, k, r, dtype, num_sms);
  if (p.splits > 65535 || p.tiles > INT_MAX) return cudaErrorInvalidValue;  // gridDim.y, gridDim.x
  switch (dtype) {
    case Dtype::kFloat32:
      return start_typed<float>(x, weight, down, up, bias, scaling, y, m, n, k, r, p, workspace, stream);
    case Dtype::kFloat16:
      return start_typed<__half>(x, weight, down, up, bias, scaling, y, m, n, k, r, p, workspace, stream);
    case Dtype::kBFloat16:
      return start_typed<__nv_bfloat16>(x, weight, down, up, bias, scaling, y, m, n, k, r, p, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace lors_kernels
