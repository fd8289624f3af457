// Python bindings of lors_kernels._C: the one file that sees torch. Checks inputs, makes them dense,
// dispatches on dtype and calls the raw-pointer kernels of csrc/cpu (and csrc/cuda when built).
#include <c10/util/ParallelGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cpu/hrca.h"
#include "cpu/adaptive_mixing.h"
#include "cpu/lors_linear.h"

#ifdef LORS_WITH_CUDA
// c10's CUDA headers, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS and cuSPARSE headers, which
// a bare CUDA toolkit (enough for these kernels) may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>

#include "cuda/hrca.h"
#include "cuda/lors_linear.h"
#endif

namespace {

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

std::vector<std::string> built_backends() {
  std::vector<std::string> backends{"cpu"};
#ifdef LORS_WITH_CUDA
  backends.emplace_back("cuda");
#endif
  return backends;
}

// The shapes of lors_linear's operands: x2 [M, K], weight [N, K], down [R, K], up [N, R], bias [N].
void check_lors_linear_shapes(const char* op, const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                              const at::Tensor& up, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x2.dim() == 2, op, ": x2 must be 2-D [M, K], got ", shape_of(x2));
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got ", shape_of(weight));
  TORCH_CHECK_VALUE(down.dim() == 2, op, ": down must be 2-D [R, K], got ", shape_of(down));
  TORCH_CHECK_VALUE(up.dim() == 2, op, ": up must be 2-D [N, R], got ", shape_of(up));
  const int64_t k = x2.size(1), n = weight.size(0), r = down.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, op, ": weight ", shape_of(weight), " must be [N, K] with K = ", k,
                    " for x2 ", shape_of(x2));
  TORCH_CHECK_VALUE(down.size(1) == k, op, ": down ", shape_of(down), " must be [R, K] with K = ", k,
                    " for x2 ", shape_of(x2));
  TORCH_CHECK_VALUE(up.size(0) == n && up.size(1) == r, op, ": up ", shape_of(up), " must be [N, R] = [", n,
                    ", ", r, "] for weight ", shape_of(weight), " and down ", shape_of(down));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == n, op, ": bias ", shape_of(*bias), " must be [N] = [",
                      n, "] for weight ", shape_of(weight));
  }
}

using NamedTensors = std::vector<std::pair<const char*, const at::Tensor*>>;

// Every named tensor on the CPU, Float or BFloat16, and of the first one's dtype.
void check_cpu_float(const char* op, const NamedTensors& named) {
  const auto& [lead_name, lead] = named.front();
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op, ": ", name,
                     " has dtype ", t->scalar_type(), "; expected Float or BFloat16");
    TORCH_CHECK_TYPE(t->scalar_type() == lead->scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but ", lead_name, " has ", lead->scalar_type(), "; all tensors must share one dtype");
  }
}

// y [M, N] = x2 @ weight^T + scaling * (x2 @ down^T) @ up^T + bias
at::Tensor lors_linear_forward_cpu(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                                   const at::Tensor& up, const std::optional<at::Tensor>& bias,
                                   double scaling) {
  const char* op = "lors_linear_forward_cpu";
  NamedTensors named{{"x2", &x2}, {"weight", &weight}, {"down", &down}, {"up", &up}};
  if (bias.has_value()) named.emplace_back("bias", &*bias);
  check_cpu_float(op, named);
  check_lors_linear_shapes(op, x2, weight, down, up, bias);
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), r = down.size(0);

  // Dense row-major copies only where needed (weight, down, up are usually contiguous already).
  const at::Tensor xc = x2.contiguous(), wc = weight.contiguous(), dc = down.contiguous(), uc = up.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x2.options().memory_format(at::MemoryFormat::Contiguous));
  const int threads = at::get_num_threads();
  const float s = static_cast<float>(scaling);

  // Released: the kernel touches no Python object and may run for milliseconds.
  pybind11::gil_scoped_release no_gil;
  if (x2.scalar_type() == at::kFloat) {
    lors_kernels::cpu::lors_linear_forward_f32(
        xc.data_ptr<float>(), wc.data_ptr<float>(), dc.data_ptr<float>(), uc.data_ptr<float>(),
        bc.defined() ? bc.data_ptr<float>() : nullptr, s, y.data_ptr<float>(), m, n, k, r, threads);
  } else {
    // bf16 travels as its raw 16-bit pattern: the kernel widens and rounds itself.
    const auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    lors_kernels::cpu::lors_linear_forward_bf16(
        bits(xc), bits(wc), bits(dc), bits(uc), bc.defined() ? bits(bc) : nullptr, s,
        reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), m, n, k, r, threads);
  }
  return y;
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// Selection scores [B, N, lh * lw] on maps whose sides have one integer ratio; returns the ratio.
int64_t check_scores(const char* op, const at::Tensor& scores, int64_t lh, int64_t lw, int64_t hh, int64_t hw) {
  check_cpu(op, "scores", scores);
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()), op, ": scores must be floating, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(lh > 0 && lw > 0 && hh > 0 && hw > 0, op, ": map sizes must be positive, got low ", lh, "x", lw,
                    ", high ", hh, "x", hw);
  TORCH_CHECK_VALUE(scores.dim() == 3 && scores.size(2) == lh * lw, op, ": scores ", shape_of(scores),
                    " must be [B, N, ", lh * lw, "] for a ", lh, "x", lw, " low-resolution map");
  return hh % lh == 0 && hw % lw == 0 && hh / lh == hw / lw ? hh / lh : 0;
}

at::Tensor select_windows_cpu(const at::Tensor& scores, int64_t lh, int64_t lw, int64_t hh, int64_t hw, int64_t k) {
  const char* op = "select_windows_cpu";
  const int64_t ws = check_scores(op, scores, lh, lw, hh, hw);
  TORCH_CHECK_VALUE(ws > 0, op, ": the ", hh, "x", hw, " map is not an integer multiple of the ", lh, "x", lw,
                    " map with one ratio for both sides");
  TORCH_CHECK_VALUE(1 <= k && k <= lh * lw, op, ": k = ", k, " must be between 1 and the ", lh * lw, " cells");
  // Summed over queries as the reference sums (fp32 at least, by torch), then ranked in float64 (exact).
  const at::Tensor cells = scores.sum({1}, false, at::promote_types(scores.scalar_type(), at::kFloat)).to(at::kDouble).contiguous();
  at::Tensor out = at::empty({scores.size(0), k * ws * ws}, scores.options().dtype(at::kLong));
  pybind11::gil_scoped_release no_gil;
  lors_kernels::cpu::select_windows(cells.data_ptr<double>(), cells.size(0), lh, lw, ws, k, out.data_ptr<int64_t>());
  return out;
}

at::Tensor select_topk_pixels_cpu(const at::Tensor& scores, int64_t lh, int64_t lw, int64_t hh, int64_t hw, int64_t k,
                                  bool per_query) {
  const char* op = "select_topk_pixels_cpu";
  check_scores(op, scores, lh, lw, hh, hw);
  TORCH_CHECK_VALUE(1 <= k && k <= hh * hw, op, ": k = ", k, " must be between 1 and the ", hh * hw, " pixels");
  // float64 maps, summed over queries by torch exactly as the reference does: same values, same picks
  // (torch's sum does not depend on the thread count). Serially: for these few thousand outputs torch's
  // two-thread reduction measured 3x slower than one thread (0.25 vs 0.08 ms at N = 100, Cityscapes).
  at::Tensor maps;
  {
    c10::ParallelGuard serial(true);
    maps = per_query ? scores.to(at::kDouble).reshape({-1, lh * lw}) : at::sum(scores, {1}, false, at::kDouble);
    maps = maps.contiguous();
  }
  std::vector<int64_t> shape{scores.size(0)};
  if (per_query) shape.push_back(scores.size(1));
  shape.push_back(k);
  at::Tensor out = at::empty(shape, scores.options().dtype(at::kLong));
  pybind11::gil_scoped_release no_gil;
  lors_kernels::cpu::select_topk_pixels(maps.data_ptr<double>(), maps.size(0), lh, lw, hh, hw, k,
                                        out.data_ptr<int64_t>(), at::get_num_threads());
  return out;
}

// (out [B, H, N, D], lse [B, H, N] fp32) of softmax attention over the key rows listed by index.
std::tuple<at::Tensor, at::Tensor> sparse_attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v, const at::Tensor& index,
                                                                double scale) {
  const char* op = "sparse_attention_forward_cpu";
  for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}, {"index", &index}}) check_cpu(op, name, *t);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
                   ": q must be Float or BFloat16, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op,
                   ": index must be Int or Long, got ", index.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
                        k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    op, ": q ", shape_of(q), ", k ", shape_of(k), ", v ", shape_of(v),
                    " must be [B, H, N, D], [B, H, L, D], [B, H, L, D]");
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3), l = k.size(2);
  const bool per_query = index.dim() == 3;
  TORCH_CHECK_VALUE((index.dim() == 2 && index.size(0) == b) || (per_query && index.size(0) == b && index.size(1) == n),
                    op, ": index ", shape_of(index), " must be [B, S] = [", b, ", S] or [B, N, S] = [", b, ", ", n,
                    ", S]");
  const at::Tensor slots = index.to(at::kLong).contiguous();
  if (slots.numel()) {  // the kernel reads rows by these: anything else would read outside k and v
    const auto [low, high] = at::aminmax(slots);
    TORCH_CHECK_INDEX(low.item<int64_t>() >= -1 && high.item<int64_t>() < l, op,
                      ": index entries must be -1 (padding) or in [0, ", l, ")");
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty(q.sizes(), qc.options());
  at::Tensor lse = at::empty({b, h, n}, q.options().dtype(at::kFloat));
  const int64_t s = slots.size(-1);
  const float sc = static_cast<float>(scale);
  const int threads = at::get_num_threads();
  pybind11::gil_scoped_release no_gil;
  if (q.scalar_type() == at::kFloat) {
    lors_kernels::cpu::sparse_attention_forward_f32(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                                                    slots.data_ptr<int64_t>(), out.data_ptr<float>(),
                                                    lse.data_ptr<float>(), b, h, n, l, s, d, per_query, sc, threads);
  } else {
    const auto bits = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    lors_kernels::cpu::sparse_attention_forward_bf16(bits(qc), bits(kc), bits(vc), slots.data_ptr<int64_t>(),
                                                     bits(out), lse.data_ptr<float>(), b, h, n, l, s, d, per_query,
                                                     sc, threads);
  }
  return {out, lse};
}

#ifdef LORS_WITH_CUDA

lors_kernels::cuda::Dtype cuda_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return lors_kernels::cuda::Dtype::kFloat32;
    case at::kHalf: return lors_kernels::cuda::Dtype::kFloat16;
    case at::kBFloat16: return lors_kernels::cuda::Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(), "; expected Float, Half or BFloat16");
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but the first input on ",
                    first.device(), "; all tensors must be on one device");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// scores [B, N, lh * lw] -> int64 [B, k] (shared: summed over queries) or [B, N, k] (per query): the k
// best pixels of the bilinearly upsampled maps, ties to the lower index, ascending.
at::Tensor select_topk_pixels_cuda(const at::Tensor& scores, int64_t lh, int64_t lw, int64_t hh, int64_t hw,
                                   int64_t k, bool per_query) {
  const char* op = "select_topk_pixels_cuda";
  check_cuda(scores, scores, op, "scores");
  const auto dtype = cuda_dtype(scores, op, "scores");
  TORCH_CHECK_VALUE(scores.dim() == 3, op, ": scores must be 3-D [B, N, n_low], got ", shape_of(scores));
  TORCH_CHECK_VALUE(lh > 0 && lw > 0 && hh > 0 && hw > 0, op, ": map sizes must be positive, got low ", lh, "x", lw,
                    ", high ", hh, "x", hw);
  TORCH_CHECK_VALUE(lh <= lors_kernels::cuda::kTopkMaxLowCells && lw <= lors_kernels::cuda::kTopkMaxLowCells &&
                        lh * lw <= lors_kernels::cuda::kTopkMaxLowCells,
                    op, ": the low-resolution map has ", lh, "x", lw, " cells; the kernel holds at most ",
                    lors_kernels::cuda::kTopkMaxLowCells);
  TORCH_CHECK_VALUE(scores.size(2) == lh * lw, op, ": scores ", shape_of(scores), " must have n_low = ", lh, "*", lw,
                    " columns");
  const int64_t max_pixels = lors_kernels::cuda::kTopkMaxPixels;
  TORCH_CHECK_VALUE(hh <= max_pixels && hw <= max_pixels && hh * hw <= max_pixels, op,
                    ": the high-resolution map has ", hh, "x", hw, " pixels; the kernel takes at most ", max_pixels);
  TORCH_CHECK_VALUE(1 <= k && k <= hh * hw, op, ": k = ", k, " must be between 1 and the number of pixels ", hh * hw);
  const int64_t b = scores.size(0), n = scores.size(1);
  c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty(per_query ? std::vector<int64_t>{b, n, k} : std::vector<int64_t>{b, k},
                             scores.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  check_launch(lors_kernels::cuda::select_topk_pixels(sc.data_ptr(), dtype, b, n, lh, lw, hh, hw, k, per_query,
                                                      out.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

// y [M, N] = x2 @ weight^T + scaling * (x2 @ down^T) @ up^T + bias for decode batches (M <= 16).
at::Tensor lors_linear_forward_cuda(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                                    const at::Tensor& up, const std::optional<at::Tensor>& bias, double scaling) {
  const char* op = "lors_linear_forward_cuda";
  NamedTensors named{{"x2", &x2}, {"weight", &weight}, {"down", &down}, {"up", &up}};
  if (bias.has_value()) named.emplace_back("bias", &*bias);
  const auto dtype = cuda_dtype(x2, op, "x2");
  for (const auto& [name, t] : named) {
    check_cuda(*t, x2, op, name);
    TORCH_CHECK_TYPE(t->scalar_type() == x2.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but x2 has ", x2.scalar_type(), "; all tensors must share one dtype");
  }
  check_lors_linear_shapes(op, x2, weight, down, up, bias);
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), r = down.size(0);
  TORCH_CHECK_VALUE(m <= lors_kernels::cuda::kDecodeMaxRows, op, ": x2 has M = ", m,
                    " rows; the decode kernel takes at most ", lors_kernels::cuda::kDecodeMaxRows);
  TORCH_CHECK_VALUE(r <= lors_kernels::cuda::kDecodeMaxRank, op, ": rank R = ", r,
                    " is above the decode kernel's ", lors_kernels::cuda::kDecodeMaxRank);
  TORCH_CHECK_VALUE(n <= INT_MAX && k <= INT_MAX, op, ": N = ", n, " and K = ", k, " must be below 2^31");

  c10::cuda::CUDAGuard guard(x2.device());
  at::Tensor y = at::empty({m, n}, x2.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || n == 0) return y;
  const at::Tensor xc = x2.contiguous(), wc = weight.contiguous(), dc = down.contiguous(), uc = up.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x2.get_device()));
  const auto space = lors_kernels::cuda::lors_linear_decode_workspace(m, n, k, r, dtype, num_sms);
  // A fresh workspace per call (the caching allocator makes that cheap); only its tickets need zeros.
  at::Tensor workspace = at::empty({static_cast<int64_t>(space.bytes)}, x2.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cudaMemsetAsync(workspace.data_ptr(), 0, space.ticket_bytes, stream), op);
  check_launch(lors_kernels::cuda::lors_linear_decode(xc.data_ptr(), wc.data_ptr(), dc.data_ptr(), uc.data_ptr(),
                                                      bc.defined() ? bc.data_ptr() : nullptr,
                                                      static_cast<float>(scaling), y.data_ptr(), m, n, k, r, dtype,
                                                      num_sms, workspace.data_ptr(), stream),
               op);
  return y;
}

#endif  // LORS_WITH_CUDA

// The inputs of adaptive mixing, checked and made dense; K = 0 for an absent private part.
struct MixingInputs {
  at::Tensor x, m, s, em, qm, fm, es, qs, fs;
  lors_kernels::cpu::AdaptiveMixingSizes sizes;
};

MixingInputs mixing_inputs(const char* op, const at::Tensor* dout, const at::Tensor& x, const at::Tensor& m,
                           const at::Tensor& s, const std::optional<at::Tensor>& em,
                           const std::optional<at::Tensor>& qm, const std::optional<at::Tensor>& fm,
                           const std::optional<at::Tensor>& es, const std::optional<at::Tensor>& qs,
                           const std::optional<at::Tensor>& fs) {
  MixingInputs in;
  // A private part (E [G*K, rows, r], Q [BN, G*K, r, r], F [G*K, r, cols]) and where its dense copies go.
  struct Part {
    const char* label;
    const char* names[3];
    const std::optional<at::Tensor>* given[3];
    at::Tensor* dense[3];
    int64_t* k;
  };
  const Part parts[] = {
      {"channel private", {"E^M", "Q^M", "F^M"}, {&em, &qm, &fm}, {&in.em, &in.qm, &in.fm}, &in.sizes.k_channel},
      {"spatial private", {"E^S", "Q^S", "F^S"}, {&es, &qs, &fs}, {&in.es, &in.qs, &in.fs}, &in.sizes.k_spatial}};

  NamedTensors named{{"x", &x}, {"M", &m}, {"S", &s}};
  if (dout != nullptr) named.emplace_back("dout", dout);
  for (const Part& part : parts) {
    const int count = part.given[0]->has_value() + part.given[1]->has_value() + part.given[2]->has_value();
    TORCH_CHECK_VALUE(count == 0 || count == 3, op, ": the ", part.label, " part needs E, Q and F together, got ",
                      count, " of them");
    for (int i = 0; i < 3 && count == 3; ++i) named.emplace_back(part.names[i], &**part.given[i]);
  }
  check_cpu_float(op, named);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [BN, G, P_in, C_in], got ", shape_of(x));
  TORCH_CHECK_VALUE(m.dim() == 4, op, ": M must be 4-D [BN, G, C_in, C_out], got ", shape_of(m));
  TORCH_CHECK_VALUE(s.dim() == 4, op, ": S must be 4-D [BN, G, P_out, P_in], got ", shape_of(s));
  const int64_t bn = x.size(0), groups = x.size(1), p_in = x.size(2), c_in = x.size(3);
  TORCH_CHECK_VALUE(m.size(0) == bn && m.size(1) == groups && m.size(2) == c_in, op, ": M ", shape_of(m),
                    " must be [BN, G, C_in, C_out] = [", bn, ", ", groups, ", ", c_in, ", *] for x ", shape_of(x));
  TORCH_CHECK_VALUE(s.size(0) == bn && s.size(1) == groups && s.size(3) == p_in, op, ": S ", shape_of(s),
                    " must be [BN, G, P_out, P_in] = [", bn, ", ", groups, ", *, ", p_in, "] for x ", shape_of(x));
  const int64_t c_out = m.size(3), p_out = s.size(2);
  if (dout != nullptr) {
    TORCH_CHECK_VALUE(dout->dim() == 4 && dout->size(0) == bn && dout->size(1) == groups &&
                          dout->size(2) == p_out && dout->size(3) == c_out,
                      op, ": dout ", shape_of(*dout), " must be [BN, G, P_out, C_out] = [", bn, ", ", groups, ", ",
                      p_out, ", ", c_out, "]");
  }

  in.x = x.contiguous(), in.m = m.contiguous(), in.s = s.contiguous();
  in.sizes = {bn, groups, p_in, c_in, c_out, p_out, 0, 0, 0};
  const int64_t rows[] = {c_in, p_out}, cols[] = {c_out, p_in};
  int64_t rank = -1;
  for (int i = 0; i < 2; ++i) {
    const Part& part = parts[i];
    if (!part.given[0]->has_value()) continue;
    const at::Tensor &e = **part.given[0], &q = **part.given[1], &f = **part.given[2];
    const int64_t gk = e.dim() == 3 ? e.size(0) : -1, r = e.dim() == 3 ? e.size(2) : -1;
    const bool ok = e.dim() == 3 && q.dim() == 4 && f.dim() == 3 && (groups > 0 ? gk % groups == 0 : gk == 0) &&
                    e.size(1) == rows[i] && q.size(0) == bn && q.size(1) == gk && q.size(2) == r &&
                    q.size(3) == r && f.size(0) == gk && f.size(1) == r && f.size(2) == cols[i];
    TORCH_CHECK_VALUE(ok, op, ": the ", part.label, " part must be E [G*K, ", rows[i], ", r], Q [", bn,
                      ", G*K, r, r], F [G*K, r, ", cols[i], "] with G = ", groups, "; got E ", shape_of(e), ", Q ",
                      shape_of(q), ", F ", shape_of(f));
    TORCH_CHECK_VALUE(rank < 0 || rank == r, op, ": the channel and spatial private parts must share one rank, got ",
                      rank, " and ", r);
    rank = r;
    for (int j = 0; j < 3; ++j) *part.dense[j] = part.given[j]->value().contiguous();
    *part.k = groups > 0 ? gk / groups : 0;
  }
  in.sizes.rank = std::max<int64_t>(rank, 0);
  return in;
}

template <class T>
const T* data_of(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const T*>(t.data_ptr()) : nullptr;
}

template <class T>
T* mutable_data_of(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// pre1 = x @ M_eff as the kernels save and read it: float32, contiguous, [BN, G, P_in, C_out].
float* pre1_of(const char* op, const std::optional<at::Tensor>& pre1, const lors_kernels::cpu::AdaptiveMixingSizes& z) {
  if (!pre1.has_value()) return nullptr;
  const at::Tensor& t = *pre1;
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                        t.sizes() == at::IntArrayRef({z.bn, z.groups, z.p_in, z.c_out}),
                    op, ": pre1 must be a contiguous float32 CPU tensor [", z.bn, ", ", z.groups, ", ", z.p_in, ", ",
                    z.c_out, "], got ", t.scalar_type(), " ", shape_of(t));
  return t.data_ptr<float>();
}

// out [BN, G, P_out, C_out] = relu(LN(S_eff @ relu(LN(x @ M_eff)))), M_eff and S_eff with their private parts;
// x @ M_eff also written to pre1 when given (for the backward).
at::Tensor adaptive_mixing_forward_cpu(const at::Tensor& x, const at::Tensor& m, const at::Tensor& s,
                                       const std::optional<at::Tensor>& em, const std::optional<at::Tensor>& qm,
                                       const std::optional<at::Tensor>& fm, const std::optional<at::Tensor>& es,
                                       const std::optional<at::Tensor>& qs, const std::optional<at::Tensor>& fs,
                                       double eps, const std::optional<at::Tensor>& pre1) {
  const char* op = "adaptive_mixing_forward_cpu";
  const MixingInputs in = mixing_inputs(op, nullptr, x, m, s, em, qm, fm, es, qs, fs);
  const auto& z = in.sizes;
  float* const saved = pre1_of(op, pre1, z);
  at::Tensor out = at::empty({z.bn, z.groups, z.p_out, z.c_out}, in.x.options());
  const int threads = at::get_num_threads();

  // Released: the kernel touches no Python object and may run for milliseconds.
  pybind11::gil_scoped_release no_gil;
  const auto run = [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel(data_of<T>(in.x), data_of<T>(in.m), data_of<T>(in.s), data_of<T>(in.em), data_of<T>(in.qm),
           data_of<T>(in.fm), data_of<T>(in.es), data_of<T>(in.qs), data_of<T>(in.fs), mutable_data_of<T>(out), saved,
           z, static_cast<float>(eps), threads);
  };
  if (x.scalar_type() == at::kFloat) {
    run(lors_kernels::cpu::adaptive_mixing_forward_f32, float{});
  } else {
    run(lors_kernels::cpu::adaptive_mixing_forward_bf16, uint16_t{});  // bf16 as its raw bit pattern
  }
  return out;
}

// [dx, dM, dS, dE^M, dQ^M, dF^M, dE^S, dQ^S, dF^S]; None for the gradients of an absent private part.
// pre1: the forward's, if it saved it (else recomputed).
std::vector<at::Tensor> adaptive_mixing_backward_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& m, const at::Tensor& s,
    const std::optional<at::Tensor>& em, const std::optional<at::Tensor>& qm, const std::optional<at::Tensor>& fm,
    const std::optional<at::Tensor>& es, const std::optional<at::Tensor>& qs, const std::optional<at::Tensor>& fs,
    double eps, const std::optional<at::Tensor>& pre1) {
  const char* op = "adaptive_mixing_backward_cpu";
  const MixingInputs in = mixing_inputs(op, &dout, x, m, s, em, qm, fm, es, qs, fs);
  const float* const saved = pre1_of(op, pre1, in.sizes);
  const at::Tensor dout_c = dout.contiguous();
  const auto like = [](const at::Tensor& t) { return t.defined() ? at::empty(t.sizes(), t.options()) : at::Tensor(); };
  std::vector<at::Tensor> grads{like(in.x),  like(in.m),  like(in.s),  like(in.em), like(in.qm),
                                like(in.fm), like(in.es), like(in.qs), like(in.fs)};
  const int threads = at::get_num_threads();

  pybind11::gil_scoped_release no_gil;
  const auto run = [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel(data_of<T>(dout_c), data_of<T>(in.x), data_of<T>(in.m), data_of<T>(in.s), data_of<T>(in.em),
           data_of<T>(in.qm), data_of<T>(in.fm), data_of<T>(in.es), data_of<T>(in.qs), data_of<T>(in.fs), saved,
           mutable_data_of<T>(grads[0]), mutable_data_of<T>(grads[1]), mutable_data_of<T>(grads[2]),
           mutable_data_of<T>(grads[3]), mutable_data_of<T>(grads[4]), mutable_data_of<T>(grads[5]),
           mutable_data_of<T>(grads[6]), mutable_data_of<T>(grads[7]), mutable_data_of<T>(grads[8]), in.sizes,
           static_cast<float>(eps), threads);
  };
  if (x.scalar_type() == at::kFloat) {
    run(lors_kernels::cpu::adaptive_mixing_backward_f32, float{});
  } else {
    run(lors_kernels::cpu::adaptive_mixing_backward_bf16, uint16_t{});  // bf16 as its raw bit pattern
  }
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lors_kernels native kernels (C++ CPU; CUDA when built with it)";
  m.def("built_backends", &built_backends, "Backends compiled into this module: 'cpu', plus 'cuda' if built.");
  m.def("lors_linear_forward_cpu", &lors_linear_forward_cpu, pybind11::arg("x2"), pybind11::arg("weight"),
        pybind11::arg("down"), pybind11::arg("up"), pybind11::arg("bias"), pybind11::arg("scaling"),
        "Static LORS linear forward on CPU: x2 [M, K] @ weight[N, K]^T + scaling * (x2 @ down[R, K]^T) @ "
        "up[N, R]^T + bias[N] -> [M, N]; float32 or bfloat16. Built for few rows (M <= 16): one pass over "
        "the weight.");
  m.def("select_windows_cpu", &select_windows_cpu, pybind11::arg("scores"), pybind11::arg("lh"), pybind11::arg("lw"),
        pybind11::arg("hh"), pybind11::arg("hw"), pybind11::arg("k"),
        "HRCA window selection: scores [B, N, lh*lw] summed over queries, the k best cells (ties to the lower "
        "index) expanded to their ws x ws windows -> int64 [B, k*ws*ws].");
  m.def("select_topk_pixels_cpu", &select_topk_pixels_cpu, pybind11::arg("scores"), pybind11::arg("lh"),
        pybind11::arg("lw"), pybind11::arg("hh"), pybind11::arg("hw"), pybind11::arg("k"), pybind11::arg("per_query"),
        "HRCA bilinear selection: the k best pixels of the upsampled scores (float64, computed on the fly), shared "
        "(summed over queries) -> int64 [B, k] or per query -> [B, N, k], ascending.");
  m.def("sparse_attention_forward_cpu", &sparse_attention_forward_cpu, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("index"), pybind11::arg("scale"),
        "HRCA attention forward: q [B, H, N, D] over the rows of k/v [B, H, L, D] listed by index [B, S] or "
        "[B, N, S] (-1 = padding) -> (out [B, H, N, D], lse [B, H, N] fp32, +inf for rows with no valid slot).");
#ifdef LORS_WITH_CUDA
  m.def("select_topk_pixels_cuda", &select_topk_pixels_cuda, pybind11::arg("scores"), pybind11::arg("lh"),
        pybind11::arg("lw"), pybind11::arg("hh"), pybind11::arg("hw"), pybind11::arg("k"), pybind11::arg("per_query"),
        "Top-k pixels of bilinearly upsampled low-resolution scores on CUDA: scores [B, N, lh * lw] float32, "
        "float16 or bfloat16 -> int64 [B, k] (summed over queries) or [B, N, k] (per_query), ascending, ties to "
        "the lower index. One radix select per map, the upsampled values computed on the fly.");
  m.def("lors_linear_forward_cuda", &lors_linear_forward_cuda, pybind11::arg("x2"), pybind11::arg("weight"),
        pybind11::arg("down"), pybind11::arg("up"), pybind11::arg("bias"), pybind11::arg("scaling"),
        "Static LORS linear forward on CUDA for decode (M <= 16, R <= 512): x2 [M, K] @ weight[N, K]^T + scaling * "
        "(x2 @ down[R, K]^T) @ up[N, R]^T + bias[N] -> [M, N]; float32, float16 or bfloat16. One launch, split-K, "
        "deterministic.");
#endif
  m.def("adaptive_mixing_forward_cpu", &adaptive_mixing_forward_cpu, pybind11::arg("x"), pybind11::arg("M"),
        pybind11::arg("S"), pybind11::arg("em"), pybind11::arg("qm"), pybind11::arg("fm"), pybind11::arg("es"),
        pybind11::arg("qs"), pybind11::arg("fs"), pybind11::arg("eps"), pybind11::arg("pre1") = pybind11::none(),
        "Adaptive mixing forward on CPU: x [BN, G, P_in, C_in], M [BN, G, C_in, C_out], S [BN, G, P_out, P_in], "
        "optional private parts (E, Q, F) or None -> out [BN, G, P_out, C_out]; float32 or bfloat16. One "
        "(query, group) tile at a time, in cache. pre1: a float32 [BN, G, P_in, C_out] tensor to save x @ M_eff "
        "into, for the backward.");
  m.def("adaptive_mixing_backward_cpu", &adaptive_mixing_backward_cpu, pybind11::arg("dout"), pybind11::arg("x"),
        pybind11::arg("M"), pybind11::arg("S"), pybind11::arg("em"), pybind11::arg("qm"), pybind11::arg("fm"),
        pybind11::arg("es"), pybind11::arg("qs"), pybind11::arg("fs"), pybind11::arg("eps"),
        pybind11::arg("pre1") = pybind11::none(),
        "Adaptive mixing backward on CPU (recomputes the forward per tile, reading x @ M_eff from pre1 when the "
        "forward saved it): [dx, dM, dS, dE^M, dQ^M, dF^M, dE^S, dQ^S, dF^S], None for an absent private part; dE "
        "and dF bitwise independent of the thread count.");
}
