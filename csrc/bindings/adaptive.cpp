// Bindings of adaptive mixing: checks, dense copies and dtype dispatch around csrc/cpu/adaptive.cpp.
#include "bindings/common.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/adaptive.h"

namespace lors_kernels {
namespace bindings {
namespace {

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

void register_adaptive(pybind11::module_& m) {
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

}  // namespace bindings
}  // namespace lors_kernels
