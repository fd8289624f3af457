// Python bindings of lors_kernels._C: the one file that sees torch. Checks inputs, makes them dense,
// dispatches on dtype and calls the raw-pointer kernels of csrc/cpu (and csrc/cuda when built).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cpu/adaptive_mixing.h"
#include "cpu/lors_linear.h"

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

// y [M, N] = x2 @ weight^T + scaling * (x2 @ down^T) @ up^T + bias
at::Tensor lors_linear_forward_cpu(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& down,
                                   const at::Tensor& up, const std::optional<at::Tensor>& bias,
                                   double scaling) {
  const char* op = "lors_linear_forward_cpu";
  std::vector<std::pair<const char*, const at::Tensor*>> named{
      {"x2", &x2}, {"weight", &weight}, {"down", &down}, {"up", &up}};
  if (bias.has_value()) named.emplace_back("bias", &*bias);
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op, ": ", name,
                     " has dtype ", t->scalar_type(), "; expected Float or BFloat16");
    TORCH_CHECK_TYPE(t->scalar_type() == x2.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but x2 has ", x2.scalar_type(), "; all tensors must share one dtype");
  }
  TORCH_CHECK_VALUE(x2.dim() == 2, op, ": x2 must be 2-D [M, K], got ", shape_of(x2));
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got ", shape_of(weight));
  TORCH_CHECK_VALUE(down.dim() == 2, op, ": down must be 2-D [R, K], got ", shape_of(down));
  TORCH_CHECK_VALUE(up.dim() == 2, op, ": up must be 2-D [N, R], got ", shape_of(up));
  const int64_t m = x2.size(0), k = x2.size(1), n = weight.size(0), r = down.size(0);
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

  std::vector<std::pair<const char*, const at::Tensor*>> named{{"x", &x}, {"M", &m}, {"S", &s}};
  if (dout != nullptr) named.emplace_back("dout", dout);
  for (const Part& part : parts) {
    const int count = part.given[0]->has_value() + part.given[1]->has_value() + part.given[2]->has_value();
    TORCH_CHECK_VALUE(count == 0 || count == 3, op, ": the ", part.label, " part needs E, Q and F together, got ",
                      count, " of them");
    for (int i = 0; i < 3 && count == 3; ++i) named.emplace_back(part.names[i], &**part.given[i]);
  }
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, op, ": ", name,
                     " has dtype ", t->scalar_type(), "; expected Float or BFloat16");
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                     " but x has ", x.scalar_type(), "; all tensors must share one dtype");
  }
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

// out [BN, G, P_out, C_out] = relu(LN(S_eff @ relu(LN(x @ M_eff)))), M_eff and S_eff with their private parts.
at::Tensor adaptive_mixing_forward_cpu(const at::Tensor& x, const at::Tensor& m, const at::Tensor& s,
                                       const std::optional<at::Tensor>& em, const std::optional<at::Tensor>& qm,
                                       const std::optional<at::Tensor>& fm, const std::optional<at::Tensor>& es,
                                       const std::optional<at::Tensor>& qs, const std::optional<at::Tensor>& fs,
                                       double eps) {
  const MixingInputs in = mixing_inputs("adaptive_mixing_forward_cpu", nullptr, x, m, s, em, qm, fm, es, qs, fs);
  const auto& z = in.sizes;
  at::Tensor out = at::empty({z.bn, z.groups, z.p_out, z.c_out}, in.x.options());
  const int threads = at::get_num_threads();

  // Released: the kernel touches no Python object and may run for milliseconds.
  pybind11::gil_scoped_release no_gil;
  const auto run = [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel(data_of<T>(in.x), data_of<T>(in.m), data_of<T>(in.s), data_of<T>(in.em), data_of<T>(in.qm),
           data_of<T>(in.fm), data_of<T>(in.es), data_of<T>(in.qs), data_of<T>(in.fs), mutable_data_of<T>(out), z,
           static_cast<float>(eps), threads);
  };
  if (x.scalar_type() == at::kFloat) {
    run(lors_kernels::cpu::adaptive_mixing_forward_f32, float{});
  } else {
    run(lors_kernels::cpu::adaptive_mixing_forward_bf16, uint16_t{});  // bf16 as its raw bit pattern
  }
  return out;
}

// [dx, dM, dS, dE^M, dQ^M, dF^M, dE^S, dQ^S, dF^S]; None for the gradients of an absent private part.
std::vector<at::Tensor> adaptive_mixing_backward_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& m, const at::Tensor& s,
    const std::optional<at::Tensor>& em, const std::optional<at::Tensor>& qm, const std::optional<at::Tensor>& fm,
    const std::optional<at::Tensor>& es, const std::optional<at::Tensor>& qs, const std::optional<at::Tensor>& fs,
    double eps) {
  const MixingInputs in = mixing_inputs("adaptive_mixing_backward_cpu", &dout, x, m, s, em, qm, fm, es, qs, fs);
  const at::Tensor dout_c = dout.contiguous();
  const auto like = [](const at::Tensor& t) { return t.defined() ? at::empty(t.sizes(), t.options()) : at::Tensor(); };
  std::vector<at::Tensor> grads{like(in.x),  like(in.m),  like(in.s),  like(in.em), like(in.qm),
                                like(in.fm), like(in.es), like(in.qs), like(in.fs)};
  const int threads = at::get_num_threads();

  pybind11::gil_scoped_release no_gil;
  const auto run = [&](auto kernel, auto tag) {
    using T = decltype(tag);
    kernel(data_of<T>(dout_c), data_of<T>(in.x), data_of<T>(in.m), data_of<T>(in.s), data_of<T>(in.em),
           data_of<T>(in.qm), data_of<T>(in.fm), data_of<T>(in.es), data_of<T>(in.qs), data_of<T>(in.fs),
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
  m.def("adaptive_mixing_forward_cpu", &adaptive_mixing_forward_cpu, pybind11::arg("x"), pybind11::arg("M"),
        pybind11::arg("S"), pybind11::arg("em"), pybind11::arg("qm"), pybind11::arg("fm"), pybind11::arg("es"),
        pybind11::arg("qs"), pybind11::arg("fs"), pybind11::arg("eps"),
        "Adaptive mixing forward on CPU: x [BN, G, P_in, C_in], M [BN, G, C_in, C_out], S [BN, G, P_out, P_in], "
        "optional private parts (E, Q, F) or None -> out [BN, G, P_out, C_out]; float32 or bfloat16. One "
        "(query, group) tile at a time, in cache.");
  m.def("adaptive_mixing_backward_cpu", &adaptive_mixing_backward_cpu, pybind11::arg("dout"), pybind11::arg("x"),
        pybind11::arg("M"), pybind11::arg("S"), pybind11::arg("em"), pybind11::arg("qm"), pybind11::arg("fm"),
        pybind11::arg("es"), pybind11::arg("qs"), pybind11::arg("fs"), pybind11::arg("eps"),
        "Adaptive mixing backward on CPU (recomputes the forward per tile): [dx, dM, dS, dE^M, dQ^M, dF^M, dE^S, "
        "dQ^S, dF^S], None for an absent private part; dE and dF bitwise independent of the thread count.");
}
