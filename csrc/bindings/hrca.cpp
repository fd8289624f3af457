// Bindings of HRCA: selection and sparse attention, calling into csrc/cpu/hrca_*.cpp (and csrc/cuda/hrca.cu
// in CUDA builds).
#include "bindings/common.h"

#include <c10/util/ParallelGuard.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/hrca.h"

#ifdef LORS_WITH_CUDA
#include "cuda/hrca.h"
#endif

namespace lors_kernels {
namespace bindings {
namespace {

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

#endif  // LORS_WITH_CUDA

}  // namespace

void register_hrca(pybind11::module_& m) {
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
#endif
}

}  // namespace bindings
}  // namespace lors_kernels
