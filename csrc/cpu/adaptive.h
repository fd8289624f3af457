// Adaptive mixing (AdaMixer, and LORS^A's private low-rank parts) on the CPU: raw-pointer kernels, no
// torch headers (csrc/bindings/adaptive.cpp wraps them). Per query n and group g:
//
//   M_eff = M + sum_k E^M_k Q^M_k F^M_k        S_eff = S + sum_k E^S_k Q^S_k F^S_k
//   h     = relu(LN(x @ M_eff))                out   = relu(LN(S_eff @ h))
//
// LN is a LayerNorm over the whole [P, C] tile, without affine. Dense row-major arrays:
//   x [BN, G, P_in, C_in], M [BN, G, C_in, C_out], S [BN, G, P_out, P_in], out [BN, G, P_out, C_out];
//   channel private E^M [G*K_c, C_in, r], Q^M [BN, G*K_c, r, r], F^M [G*K_c, r, C_out];
//   spatial private E^S [G*K_s, P_out, r], Q^S [BN, G*K_s, r, r], F^S [G*K_s, r, P_in];
// index j = g*K + k. A part with K = 0 is absent (its pointers may be null). The gradients have their
// inputs' shapes. bf16 arrays are raw uint16 bit patterns: widened on load, computed in fp32, rounded
// to nearest even on store. num_threads: the most OpenMP threads to use; results (dE and dF, sums
// over every query, included) are bitwise independent of it.
//
// pre1 = x @ M_eff [BN, G, P_in, C_out], fp32, may be null. A training forward can save it there, and
// the backward then reads it instead of recomputing it (same values, bitwise).
#pragma once

#include <cstdint>

namespace lors_kernels {
namespace cpu {

struct AdaptiveMixingSizes {
  int64_t bn, groups, p_in, c_in, c_out, p_out;
  int64_t rank;       // r, shared by both private parts
  int64_t k_channel;  // K of the channel private part (0: absent)
  int64_t k_spatial;  // K of the spatial private part (0: absent)
};

void adaptive_mixing_forward_f32(const float* x, const float* m, const float* s, const float* em, const float* qm,
                                 const float* fm, const float* es, const float* qs, const float* fs, float* out,
                                 float* pre1, const AdaptiveMixingSizes& sizes, float eps, int num_threads);

void adaptive_mixing_forward_bf16(const uint16_t* x, const uint16_t* m, const uint16_t* s, const uint16_t* em,
                                  const uint16_t* qm, const uint16_t* fm, const uint16_t* es, const uint16_t* qs,
                                  const uint16_t* fs, uint16_t* out, float* pre1, const AdaptiveMixingSizes& sizes,
                                  float eps, int num_threads);

// Every gradient from d out: dx, dM, dS, and for each present private part dE, dQ, dF.
void adaptive_mixing_backward_f32(const float* dout, const float* x, const float* m, const float* s,
                                  const float* em, const float* qm, const float* fm, const float* es,
                                  const float* qs, const float* fs, const float* pre1, float* dx, float* dm,
                                  float* ds, float* dem, float* dqm, float* dfm, float* des, float* dqs, float* dfs,
                                  const AdaptiveMixingSizes& sizes, float eps, int num_threads);

void adaptive_mixing_backward_bf16(const uint16_t* dout, const uint16_t* x, const uint16_t* m, const uint16_t* s,
                                   const uint16_t* em, const uint16_t* qm, const uint16_t* fm, const uint16_t* es,
                                   const uint16_t* qs, const uint16_t* fs, const float* pre1, uint16_t* dx,
                                   uint16_t* dm, uint16_t* ds, uint16_t* dem, uint16_t* dqm, uint16_t* dfm,
                                   uint16_t* des, uint16_t* dqs, uint16_t* dfs, const AdaptiveMixingSizes& sizes,
                                   float eps, int num_threads);

}  // namespace cpu
}  // namespace lors_kernels
