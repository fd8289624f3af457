"""Triton kernels for adaptive mixing: one program per (query, group) keeps every P x C tile on chip.

Forward:  pre1 = x @ M + sum_k ((x @ E^M_k) @ Q^M_k) @ F^M_k       (never a C_in x C_out private matrix)
          h    = relu(LN(pre1))                                      (h stays in registers)
          pre2 = S @ h + sum_k E^S_k @ (Q^S_k @ (F^S_k @ h))
          out  = relu(LN(pre2))
Backward recomputes pre1, h and pre2 from the inputs instead of saving them: saving h and pre2 would
cost BN*G*(P_in + P_out)*C_out*4 bytes (315 MB for B=16, N=100 at the LORS paper's shapes), while the
recompute is one more forward's worth of on-chip FLOPs. E and F are shared by every query: the
backward runs one persistent program per SM over the (query, group) tiles, each adding its tiles' E/F
gradients into its own fp32 slice of a partial-sum buffer, summed over programs afterwards. No atomics:
bitwise the same on every run (for one GPU model), and no hot spot of ~10^7 atomics on ~10^4 addresses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import triton_utils
from ..triton_utils import block, dot_dtype, precision


@triton.jit
def _tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols, DT: tl.constexpr):
    """Load a [rows, cols] block (masked to n_rows x n_cols, zero outside) in the dot dtype."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(DT)


@triton.jit
def _layer_norm_relu(pre, mask, n, eps):
    """Joint LayerNorm over the valid elements of the tile (no affine), then ReLU: (xhat, rstd, out)."""
    mean = tl.sum(tl.sum(tl.where(mask, pre, 0.0), axis=1), axis=0) / n
    diff = tl.where(mask, pre - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(diff * diff, axis=1), axis=0) / n + eps)
    xhat = diff * rstd
    return xhat, rstd, tl.maximum(xhat, 0.0)


@triton.jit
def _layer_norm_relu_backward(dout, xhat, rstd, mask, n):
    """d pre for out = relu(LN(pre)): rstd * (dy - mean(dy) - xhat * mean(dy * xhat)), dy = dout * [xhat > 0]."""
    dy = tl.where(mask & (xhat > 0), dout, 0.0)
    mean_dy = tl.sum(tl.sum(dy, axis=1), axis=0) / n
    mean_dyx = tl.sum(tl.sum(dy * xhat, axis=1), axis=0) / n
    return tl.where(mask, rstd * (dy - mean_dy - xhat * mean_dyx), 0.0)


@triton.jit
def _forward_tiles(
    x, m_ptr, s_ptr, em_ptr, qm_ptr, fm_ptr, es_ptr, qs_ptr, fs_ptr,
    g, KM, KS, R, P_IN, C_IN, C_OUT, P_OUT, eps,
    sm_i, sm_o, ss_o, ss_i,
    sem_j, sem_a, sem_r, sqm_j, sqm_r, sqm_s, sfm_j, sfm_r, sfm_b,
    ses_j, ses_a, ses_r, sqs_j, sqs_r, sqs_s, sfs_j, sfs_r, sfs_b,
    offs_pi, offs_ci, offs_co, offs_po, offs_r,
    CHANNEL_PRIVATE: tl.constexpr, SPATIAL_PRIVATE: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """The forward of one (query, group) tile (qm_ptr, qs_ptr already at this query's cores).
    Returns M, S, pre1's LN (xhat1, rstd1), h, pre2's LN (xhat2, rstd2) and out."""
    mat = _tile(m_ptr, offs_ci, offs_co, sm_i, sm_o, C_IN, C_OUT, DT)
    pre1 = tl.dot(x, mat, input_precision=PRECISION)
    if CHANNEL_PRIVATE:
        for kk in range(KM):
            j = g * KM + kk
            e = _tile(em_ptr + j * sem_j, offs_ci, offs_r, sem_a, sem_r, C_IN, R, DT)
            q = _tile(qm_ptr + j * sqm_j, offs_r, offs_r, sqm_r, sqm_s, R, R, DT)
            f = _tile(fm_ptr + j * sfm_j, offs_r, offs_co, sfm_r, sfm_b, R, C_OUT, DT)
            xe = tl.dot(x, e, input_precision=PRECISION)
            xeq = tl.dot(xe.to(DT), q, input_precision=PRECISION)
            pre1 += tl.dot(xeq.to(DT), f, input_precision=PRECISION)
    mask1 = (offs_pi[:, None] < P_IN) & (offs_co[None, :] < C_OUT)
    xhat1, rstd1, h = _layer_norm_relu(pre1, mask1, P_IN * C_OUT, eps)

    s = _tile(s_ptr, offs_po, offs_pi, ss_o, ss_i, P_OUT, P_IN, DT)
    pre2 = tl.dot(s, h.to(DT), input_precision=PRECISION)
    if SPATIAL_PRIVATE:
        for kk in range(KS):
            j = g * KS + kk
            e = _tile(es_ptr + j * ses_j, offs_po, offs_r, ses_a, ses_r, P_OUT, R, DT)
            q = _tile(qs_ptr + j * sqs_j, offs_r, offs_r, sqs_r, sqs_s, R, R, DT)
            f = _tile(fs_ptr + j * sfs_j, offs_r, offs_pi, sfs_r, sfs_b, R, P_IN, DT)
            fh = tl.dot(f, h.to(DT), input_precision=PRECISION)
            qfh = tl.dot(q, fh.to(DT), input_precision=PRECISION)
            pre2 += tl.dot(e, qfh.to(DT), input_precision=PRECISION)
    mask2 = (offs_po[:, None] < P_OUT) & (offs_co[None, :] < C_OUT)
    xhat2, rstd2, out = _layer_norm_relu(pre2, mask2, P_OUT * C_OUT, eps)
    return mat, s, xhat1, rstd1, h, xhat2, rstd2, out


@triton.jit
def _store(ptr, val, rows, cols, stride_r, stride_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate(ptr, val, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """ptr[rows, cols] += val in this program's own slice (no other program touches it: no atomics)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    at = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    tl.store(at, tl.load(at, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def _chain_backward(e, q, f, a, d, DT: tl.constexpr, PRECISION: tl.constexpr):
    """Gradients of the low-rank chain E @ Q @ F @ a given d, the gradient of its [rows, C] result:
    (dE, dQ, dF, da). E [rows, R], Q [R, R], F [R, cols], a [cols, C], all in the dot dtype."""
    fa = tl.dot(f, a, input_precision=PRECISION).to(DT)                      # [R, C]
    qfa = tl.dot(q, fa, input_precision=PRECISION).to(DT)                    # [R, C]
    dqfa = tl.dot(tl.trans(e), d, input_precision=PRECISION).to(DT)          # [R, C]
    dfa = tl.dot(tl.trans(q), dqfa, input_precision=PRECISION).to(DT)        # [R, C]
    return (tl.dot(d, tl.trans(qfa), input_precision=PRECISION),
            tl.dot(dqfa, tl.trans(fa), input_precision=PRECISION),
            tl.dot(dfa, tl.trans(a), input_precision=PRECISION),
            tl.dot(tl.trans(f), dfa, input_precision=PRECISION))


@triton.jit
def mixing_kernel(
    x_ptr, m_ptr, s_ptr, out_ptr, dx_ptr, dm_ptr, ds_ptr,
    em_ptr, qm_ptr, fm_ptr, es_ptr, qs_ptr, fs_ptr,
    dem_ptr, dqm_ptr, dfm_ptr, des_ptr, dqs_ptr, dfs_ptr,
    TILES, G, KM, KS, R, P_IN, C_IN, C_OUT, P_OUT, eps,
    sx_n, sx_g, sx_p, sx_c, sm_n, sm_g, sm_i, sm_o, ss_n, ss_g, ss_o, ss_i, so_n, so_g, so_p, so_c,
    sem_j, sem_a, sem_r, sqm_n, sqm_j, sqm_r, sqm_s, sfm_j, sfm_r, sfm_b,
    ses_j, ses_a, ses_r, sqs_n, sqs_j, sqs_r, sqs_s, sfs_j, sfs_r, sfs_b,
    CHANNEL_PRIVATE: tl.constexpr, SPATIAL_PRIVATE: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_PI: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_PO: tl.constexpr,
    BLOCK_R: tl.constexpr, BACKWARD: tl.constexpr,
):
    """(Query, group) tiles, from this program's on in steps of the grid: one each in the forward, which
    writes out to out_ptr. BACKWARD: reads d out from out_ptr and writes the gradients; dx, dM, dS, dQ
    are each tile's alone and share their inputs' strides (the launcher passes contiguous inputs); dE,
    dF are sums over queries, added into this program's slice of contiguous fp32 partial sums
    [programs, G*K, *, r] and [programs, G*K, r, *]."""
    pid = tl.program_id(0)
    offs_pi = tl.arange(0, BLOCK_PI)
    offs_ci = tl.arange(0, BLOCK_CI)
    offs_co = tl.arange(0, BLOCK_CO)
    offs_po = tl.arange(0, BLOCK_PO)
    offs_r = tl.arange(0, BLOCK_R)
    # This program's partial sums of dE^M, dF^M, dE^S, dF^S.
    dem_ptr += pid.to(tl.int64) * (G * KM * C_IN * R)
    dfm_ptr += pid.to(tl.int64) * (G * KM * R * C_OUT)
    des_ptr += pid.to(tl.int64) * (G * KS * P_OUT * R)
    dfs_ptr += pid.to(tl.int64) * (G * KS * R * P_IN)
    for tile in range(pid, TILES, tl.num_programs(0)):
        n = (tile // G).to(tl.int64)
        g = tile % G
        x = _tile(x_ptr + n * sx_n + g * sx_g, offs_pi, offs_ci, sx_p, sx_c, P_IN, C_IN, DT)
        mat, s, xhat1, rstd1, h, xhat2, rstd2, out = _forward_tiles(
            x, m_ptr + n * sm_n + g * sm_g, s_ptr + n * ss_n + g * ss_g,
            em_ptr, qm_ptr + n * sqm_n, fm_ptr, es_ptr, qs_ptr + n * sqs_n, fs_ptr,
            g, KM, KS, R, P_IN, C_IN, C_OUT, P_OUT, eps,
            sm_i, sm_o, ss_o, ss_i,
            sem_j, sem_a, sem_r, sqm_j, sqm_r, sqm_s, sfm_j, sfm_r, sfm_b,
            ses_j, ses_a, ses_r, sqs_j, sqs_r, sqs_s, sfs_j, sfs_r, sfs_b,
            offs_pi, offs_ci, offs_co, offs_po, offs_r,
            CHANNEL_PRIVATE, SPATIAL_PRIVATE, DT, PRECISION,
        )
        mask2 = (offs_po[:, None] < P_OUT) & (offs_co[None, :] < C_OUT)
        out_ptrs = out_ptr + n * so_n + g * so_g + offs_po[:, None] * so_p + offs_co[None, :] * so_c
        if not BACKWARD:
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask2)
        else:
            dout = tl.load(out_ptrs, mask=mask2, other=0.0).to(tl.float32)
            dpre2 = _layer_norm_relu_backward(dout, xhat2, rstd2, mask2, P_OUT * C_OUT)
            dpre2_dt = dpre2.to(DT)
            h_dt = h.to(DT)

            # Spatial mixing: pre2 = S h + sum_k E_k Q_k F_k h.
            _store(ds_ptr + n * ss_n + g * ss_g, tl.dot(dpre2_dt, tl.trans(h_dt), input_precision=PRECISION),
                   offs_po, offs_pi, ss_o, ss_i, P_OUT, P_IN)
            dh = tl.dot(tl.trans(s), dpre2_dt, input_precision=PRECISION)
            if SPATIAL_PRIVATE:
                for kk in range(KS):
                    j = g * KS + kk
                    e = _tile(es_ptr + j * ses_j, offs_po, offs_r, ses_a, ses_r, P_OUT, R, DT)
                    q = _tile(qs_ptr + n * sqs_n + j * sqs_j, offs_r, offs_r, sqs_r, sqs_s, R, R, DT)
                    f = _tile(fs_ptr + j * sfs_j, offs_r, offs_pi, sfs_r, sfs_b, R, P_IN, DT)
                    de, dq, df, dh_k = _chain_backward(e, q, f, h_dt, dpre2_dt, DT, PRECISION)
                    _accumulate(des_ptr + j * P_OUT * R, de, offs_po, offs_r, R, 1, P_OUT, R)
                    _store(dqs_ptr + n * sqs_n + j * sqs_j, dq, offs_r, offs_r, sqs_r, sqs_s, R, R)
                    _accumulate(dfs_ptr + j * R * P_IN, df, offs_r, offs_pi, P_IN, 1, R, P_IN)
                    dh += dh_k

            # Channel mixing: pre1 = x M + sum_k ((x E_k) Q_k) F_k.
            mask1 = (offs_pi[:, None] < P_IN) & (offs_co[None, :] < C_OUT)
            dpre1 = _layer_norm_relu_backward(dh, xhat1, rstd1, mask1, P_IN * C_OUT)
            dpre1_dt = dpre1.to(DT)
            _store(dm_ptr + n * sm_n + g * sm_g, tl.dot(tl.trans(x), dpre1_dt, input_precision=PRECISION),
                   offs_ci, offs_co, sm_i, sm_o, C_IN, C_OUT)
            dx = tl.dot(dpre1_dt, tl.trans(mat), input_precision=PRECISION)
            if CHANNEL_PRIVATE:
                # pre1^T = F^T Q^T E^T x^T: the spatial chain's shape, on tiles loaded and stored transposed.
                x_t, dpre1_t = tl.trans(x), tl.trans(dpre1_dt)
                dx_t = tl.zeros((BLOCK_CI, BLOCK_PI), dtype=tl.float32)
                for kk in range(KM):
                    j = g * KM + kk
                    f_t = _tile(fm_ptr + j * sfm_j, offs_co, offs_r, sfm_b, sfm_r, C_OUT, R, DT)
                    q_t = _tile(qm_ptr + n * sqm_n + j * sqm_j, offs_r, offs_r, sqm_s, sqm_r, R, R, DT)
                    e_t = _tile(em_ptr + j * sem_j, offs_r, offs_ci, sem_r, sem_a, R, C_IN, DT)
                    df_t, dq_t, de_t, dx_k = _chain_backward(f_t, q_t, e_t, x_t, dpre1_t, DT, PRECISION)
                    _accumulate(dfm_ptr + j * R * C_OUT, df_t, offs_co, offs_r, 1, C_OUT, C_OUT, R)
                    _store(dqm_ptr + n * sqm_n + j * sqm_j, dq_t, offs_r, offs_r, sqm_s, sqm_r, R, R)
                    _accumulate(dem_ptr + j * C_IN * R, de_t, offs_r, offs_ci, 1, R, R, C_IN)
                    dx_t += dx_k
                dx += tl.trans(dx_t)
            _store(dx_ptr + n * sx_n + g * sx_g, dx, offs_pi, offs_ci, sx_p, sx_c, P_IN, C_IN)


@triton.jit
def _linear_tile(a_ptr, w_ptr, bias_ptr, bias_on, out_ptr, tile, M, N, K, stride_am, stride_ak, stride_wn,
                 stride_wk, stride_bias, stride_om, stride_on, HAS_BIAS: tl.constexpr, DT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of out = a @ w^T (+ bias where bias_on)."""
    pid_m, pid_n = triton_utils.grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _tile(a_ptr, offs_m, k0 + offs_k, stride_am, stride_ak, M, K, DT)
        w = _tile(w_ptr, k0 + offs_k, offs_n, stride_wk, stride_wn, K, N, DT)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=(offs_n < N) & bias_on, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    _store(out_ptr, acc, offs_m, offs_n, stride_om, stride_on, M, N)


@triton.jit
def generate_kernel(
    q_ptr, gen_w_ptr, gen_b_ptr, mixing_ptr, core_w_ptr, core_b_ptr, cores_ptr,
    M, N_GEN, N_CORE, K,
    stride_qm, stride_qk, stride_gn, stride_gk, stride_gb, stride_mm, stride_mn, stride_cn, stride_ck, stride_cb,
    stride_om, stride_on,
    GEN_BIAS: tl.constexpr, CORE_BIAS: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Both generator GEMMs of a stage in one launch: the first programs produce M and S
    (q @ W_gen^T + b_gen), the rest the stage's private cores (q @ W_core^T + b_core)."""
    pid = tl.program_id(0)
    # One call site with the operands picked per program: two call sites would each get their own
    # pipeline buffers (192 KB of shared memory on sm_90 instead of 96 KB).
    gen = pid < tl.cdiv(M, BLOCK_M) * tl.cdiv(N_GEN, BLOCK_N)
    tile = tl.where(gen, pid, pid - tl.cdiv(M, BLOCK_M) * tl.cdiv(N_GEN, BLOCK_N))
    _linear_tile(q_ptr, tl.where(gen, gen_w_ptr, core_w_ptr), tl.where(gen, gen_b_ptr, core_b_ptr),
                 tl.where(gen, GEN_BIAS, CORE_BIAS), tl.where(gen, mixing_ptr, cores_ptr), tile, M,
                 tl.where(gen, N_GEN, N_CORE), K, stride_qm, stride_qk, tl.where(gen, stride_gn, stride_cn),
                 tl.where(gen, stride_gk, stride_ck), tl.where(gen, stride_gb, stride_cb),
                 tl.where(gen, stride_mm, stride_om), tl.where(gen, stride_mn, stride_on), GEN_BIAS or CORE_BIAS, DT,
                 PRECISION,
                 BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def generate(q: Tensor, gen_weight: Tensor, gen_bias: Tensor | None, core_weight: Tensor | None,
             core_bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """q [BN, d_q] -> (q @ gen_weight^T + gen_bias, q @ core_weight^T + core_bias or None), one launch."""
    m, k = q.shape
    mixing = torch.empty((m, gen_weight.shape[0]), device=q.device, dtype=q.dtype)
    cores = None if core_weight is None else torch.empty((m, core_weight.shape[0]), device=q.device, dtype=q.dtype)
    if m == 0:
        return mixing, cores
    core_weight_ = gen_weight if core_weight is None else core_weight  # unused pointer when absent
    cores_ = mixing if cores is None else cores
    block_m = 128 if m > 64 else 64
    block_n, block_k = 128, (64 if q.dtype.itemsize == 2 else 32)
    tiles = triton.cdiv(m, block_m) * (triton.cdiv(mixing.shape[1], block_n)
                                       + (0 if cores is None else triton.cdiv(cores.shape[1], block_n)))
    args = (q, gen_weight, q if gen_bias is None else gen_bias, mixing, core_weight_,
            q if core_bias is None else core_bias, cores_, m, mixing.shape[1], 0 if cores is None else cores.shape[1],
            k, *q.stride(), *gen_weight.stride(), 0 if gen_bias is None else gen_bias.stride(0), *mixing.stride(),
            *core_weight_.stride(), 0 if core_bias is None else core_bias.stride(0), *cores_.stride())
    constexprs = dict(GEN_BIAS=gen_bias is not None, CORE_BIAS=core_bias is not None, DT=dot_dtype(q),
                      PRECISION=precision(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8)
    triton_utils.launch(generate_kernel, (tiles,), args, constexprs, num_warps=8, num_stages=3)
    return mixing, cores


def _config(p_in, c_in, c_out, p_out, r):
    blocks = dict(BLOCK_PI=block(p_in), BLOCK_CI=block(c_in), BLOCK_CO=block(c_out), BLOCK_PO=block(p_out))
    # The largest tile holds P x C fp32 values; 8 warps once it passes 64 x 64.
    largest = max(blocks["BLOCK_PI"], blocks["BLOCK_PO"]) * blocks["BLOCK_CO"]
    warps = 8 if largest > 4096 else 4
    # Rank tiles are dot columns too. Over 8 warps Triton splits a 64-row dot's columns between two
    # warpgroups, and 16 of them become 16-bit wgmma 8 columns wide, which crashes or computes wrong
    # results on Hopper (triton-lang/triton#7830; an illegal address on an H200): 16 per warpgroup.
    blocks["BLOCK_R"] = block(r, 16 * warps // 4)
    return blocks, warps


def _private_args(private, like):
    """(E, Q, F) -> pointers and the strides the kernels take (zeros when absent)."""
    if private is None:
        return (like, like, like), (0,) * 10, 0
    e, q, f = private
    return (e, q, f), (*e.stride(), *q.stride(), *f.stride()), e.shape[0]


def _shapes(x, m, s, channel_private, spatial_private):
    bn, groups, p_in, c_in = x.shape
    c_out, p_out = m.shape[-1], s.shape[-2]
    r = next((p[0].shape[-1] for p in (channel_private, spatial_private) if p is not None), 0)
    km = channel_private[0].shape[0] // max(groups, 1) if channel_private is not None else 0  # G = 0: K = 0
    ks = spatial_private[0].shape[0] // max(groups, 1) if spatial_private is not None else 0
    return bn, groups, p_in, c_in, c_out, p_out, r, km, ks


def _launch(x, m, s, io, grads, channel_private, spatial_private, eps, backward, programs=None):
    """One mixing_kernel start over every (query, group): `io` is the output (forward) or the incoming
    gradient (backward); `grads` the nine gradient pointers (dx, dM, dS, dE^M, dQ^M, dF^M, dE^S,
    dQ^S, dF^S; dE and dF: `programs` slices of partial sums), which the forward never touches."""
    bn, groups, p_in, c_in, c_out, p_out, r, km, ks = _shapes(x, m, s, channel_private, spatial_private)
    (em, qm, fm), cm_strides, _ = _private_args(channel_private, x)
    (es, qs, fs), sp_strides, _ = _private_args(spatial_private, x)
    blocks, warps = _config(p_in, c_in, c_out, p_out, r)
    args = (x, m, s, io, *grads[:3], em, qm, fm, es, qs, fs, *grads[3:],
            bn * groups, groups, km, ks, r, p_in, c_in, c_out, p_out, float(eps),
            *x.stride(), *m.stride(), *s.stride(), *io.stride(), *cm_strides, *sp_strides)
    constexprs = dict(CHANNEL_PRIVATE=km > 0, SPATIAL_PRIVATE=ks > 0, DT=dot_dtype(x), PRECISION=precision(),
                      BACKWARD=backward, **blocks)
    triton_utils.launch(mixing_kernel, (programs or bn * groups,), args, constexprs, warps)


def mixing_forward(x: Tensor, m: Tensor, s: Tensor, channel_private: Sequence[Tensor] | None,
                   spatial_private: Sequence[Tensor] | None, eps: float) -> Tensor:
    """x [BN, G, P_in, C_in] -> out [BN, G, P_out, C_out]."""
    bn, groups, _, _, c_out, p_out, *_ = _shapes(x, m, s, channel_private, spatial_private)
    out = torch.empty((bn, groups, p_out, c_out), device=x.device, dtype=x.dtype)
    if out.numel():
        _launch(x, m, s, out, (x,) * 9, channel_private, spatial_private, eps, backward=False)
    return out


def backward_fits(dtype: torch.dtype, p_out: int, c_out: int) -> bool:
    """The backward holds ~10 P x C tiles at once. In fp32 at the LORS paper's shapes (P_out = C = 128)
    that is 240 KB of shared memory (sm_90 AOT compile), more than any GPU gives a block; up to
    128 x 64 tiles (AdaMixer's shapes) it is 88 KB. 16-bit tiles fit at both (160 KB at most)."""
    return dtype != torch.float32 or block(p_out) * block(c_out) <= 128 * 64


def mixing_backward(dout: Tensor, x: Tensor, m: Tensor, s: Tensor, channel_private: Sequence[Tensor] | None,
                    spatial_private: Sequence[Tensor] | None, eps: float
                    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None,
                               tuple[Tensor, Tensor, Tensor] | None]:
    """Returns dx, dM, dS, (dE^M, dQ^M, dF^M) or None, (dE^S, dQ^S, dF^S) or None."""
    bn, groups, *_ = _shapes(x, m, s, channel_private, spatial_private)
    assert backward_fits(x.dtype, s.shape[2], m.shape[3]), "op.py sends this case to the reference"
    # Inputs are contiguous (op.py makes them dense): gradients allocated like them share their strides.
    dx, dm, ds = torch.empty_like(x), torch.empty_like(m), torch.empty_like(s)
    # One persistent program per SM (the backward's tiles take most of an SM's shared memory), each with
    # its own zeroed fp32 slice of the E/F partial sums.
    programs = max(1, min(bn * groups, triton_utils.sm_count(x.device)))

    def private_grads(private):
        if private is None:
            return None
        e, q, f = private
        return (torch.zeros((programs, *e.shape), device=e.device, dtype=torch.float32), torch.empty_like(q),
                torch.zeros((programs, *f.shape), device=f.device, dtype=torch.float32))

    dcm, dsp = private_grads(channel_private), private_grads(spatial_private)
    if bn * groups > 0:
        grads = (dx, dm, ds, *(dcm or (x, x, x)), *(dsp or (x, x, x)))
        _launch(x, m, s, dout, grads, channel_private, spatial_private, eps, backward=True, programs=programs)
    else:
        dx.zero_(), dm.zero_(), ds.zero_()
        for grads in (dcm, dsp):
            if grads is not None:
                grads[1].zero_()

    def finish(grads, private):
        if grads is None:
            return None
        de, dq, df = grads
        return de.sum(0).to(private[0].dtype), dq, df.sum(0).to(private[2].dtype)

    return dx, dm, ds, finish(dcm, channel_private), finish(dsp, spatial_private)
