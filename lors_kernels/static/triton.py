"""Triton kernels and launchers for static LORS.

One GEMM kernel serves the forward and both backward products. It computes

    C = A @ B  (+ scaling * T @ up)  (+ bias)

with T = A @ down either accumulated in the same K loop (the shrink fused into the GEMM: one
launch, used for small M where the GEMM is bound by reading B) or read from memory (a K-extended
GEMM over [A | T] . [B ; up], used for large M where recomputing T per column tile costs more than
one extra pass over A). With STORE_T the first column of programs writes T out, which lets the
weight-gradient GEMM dW = dy^T x carry dup = dy^T (x down^T) and dbias = dy^T 1 as a side output.

All operands are strided 2-D views, so W^T, dy^T and friends are never copied. Offsets are 64-bit:
a transposed read of dy [M, N] reaches M*N elements, past 2^31 for large vocabularies.

Products with few output tiles (T = x down^T with N = R, dy (s up), ddown = G^T x with M = R, decode's
M <= 16) split their K loop over programs until the grid covers every SM twice, each split writing
its own fp32 slice, summed afterwards (deterministic); thin products get tiles as narrow as N.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import triton_utils
from ..triton_utils import block, dot_dtype, precision

# Largest rank whose T tile lives in registers next to the accumulator. Larger ranks take the
# K-extended path in the forward/dx and a separate thin GEMM for dup in the backward.
MAX_FUSED_RANK = 64
# Up to this M the shrink is fused (one launch); above it T is computed once and read back.
MAX_FUSED_M = 256


@triton.jit
def lors_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, down_ptr, up_ptr, t_ptr,
    M, N, K, R, scaling, K_SPLIT,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_cs, stride_bias,
    stride_dk, stride_dr, stride_ur, stride_un, stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr,   # C += bias[None, :]
    SHRINK: tl.constexpr,     # T = A @ down inside the K loop
    EXPAND: tl.constexpr,     # C += scaling * T @ up (T from SHRINK, else read from t_ptr)
    STORE_T: tl.constexpr,    # the first column of programs writes T to t_ptr
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 dots
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Programs [split][tile]: split s sums K from s * K_SPLIT on into its own slice of C (K_SPLIT = K: one).
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    split = tl.program_id(0) // tiles
    pid_m, pid_n = triton_utils.grouped_tile(tl.program_id(0) % tiles, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    c_ptr += split.to(tl.int64) * stride_cs

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    # Without EXPAND the shrink only feeds the side output: one column of programs does it.
    shrink_here = (pid_n == 0) | EXPAND
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_hi
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SHRINK:
            if shrink_here:
                down = tl.load(down_ptr + ks[:, None] * stride_dk + offs_r[None, :] * stride_dr,
                               mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
                t = tl.dot(a, down, t, input_precision=PRECISION)

    # The terms that are not sums over K (T @ up from a given T, the bias) go to split 0 alone.
    if EXPAND:
        # T meets up in the inputs' dtype, as in eager code: tensor-core dots, no fp32 epilogue.
        if SHRINK:
            up = tl.load(up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
            acc = tl.dot((t * scaling).to(DOT_DTYPE), up, acc, input_precision=PRECISION)
        elif split == 0:
            for r0 in range(0, R, BLOCK_R):
                rs = r0 + offs_r
                mask_rs = rs < R
                t_blk = tl.load(t_ptr + offs_m[:, None] * stride_tm + rs[None, :] * stride_tr,
                                mask=mask_m[:, None] & mask_rs[None, :], other=0.0)
                up = tl.load(up_ptr + rs[:, None] * stride_ur + offs_n[None, :] * stride_un,
                             mask=mask_rs[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
                acc = tl.dot((t_blk * scaling).to(DOT_DTYPE), up, acc, input_precision=PRECISION)
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if STORE_T:
        if pid_n == 0:
            tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                     t.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Fixed configurations (no autotuning: the interpreter cannot autotune, and AOT tests enumerate
# exactly what dispatch may pick). Keyed by (M bucket, operand width in bytes). Each must compile
# without register spills on every Triton version the package declares: 16-bit decode tiles of
# 16 x 64 spill on some (4 warps on 3.9, 8 warps on 3.6), 16 x 32 on none.
CONFIGS = {
    ("decode", 2): Config(16, 32, 128, 4, 4),
    ("decode", 4): Config(16, 64, 64, 4, 3),
    ("small", 2): Config(64, 64, 64, 4, 4),
    ("small", 4): Config(64, 64, 32, 4, 3),
    ("large", 2): Config(128, 128, 64, 8, 3),
    ("large", 4): Config(128, 64, 32, 8, 3),
}
# Tiles for products with at most 64 output columns (N = R): tall, as narrow as the columns.
THIN = {2: Config(128, 16, 64, 4, 4), 4: Config(64, 16, 32, 4, 3)}


def pick_config(m: int, n: int, dtype: torch.dtype, sms: int) -> Config:
    """By shape: 128 x 128 tiles only where they still give every SM a program (M = 256, N = 4096 makes
    64 of them on 132 SMs: 64 x 64 tiles make 256); thin products get tiles as narrow as N."""
    width = 2 if dtype.itemsize == 2 else 4
    if n <= 64 and m > 16:
        return THIN[width]._replace(BLOCK_N=block(n))
    bucket = "decode" if m <= 16 else "small" if m <= 128 else "large"
    cfg = CONFIGS[(bucket, width)]
    if bucket == "large" and triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N) < sms:
        return CONFIGS[("small", width)]
    return cfg


def k_splits(tiles: int, k: int, block_k: int, sms: int) -> int:
    """Splits of the K loop that bring a plain product's grid to two programs per SM, each split
    keeping at least four K blocks (a pipeline's worth)."""
    return max(1, min(triton.cdiv(2 * sms, tiles), k // (4 * block_k)))


def lors_matmul(a: Tensor, b: Tensor, out: Tensor, *, bias: Tensor | None = None, down: Tensor | None = None,
                up: Tensor | None = None, t: Tensor | None = None, t_out: Tensor | None = None, scaling: float = 1.0,
                split_k: int | None = None) -> Tensor:
    """out[M, N] = a @ b (+ scaling * T @ up) (+ bias); T = a @ down when `down` is given, else `t`.

    a [M, K], b [K, N], down [K, R], up [R, N], t / t_out [M, R]: any strides. `t_out` receives T.
    split_k (not with `down`): splits of the K loop; default: k_splits.
    """
    m, k = a.shape
    n = b.shape[1]
    r = down.shape[1] if down is not None else t.shape[1] if t is not None else 0
    assert down is None or r <= MAX_FUSED_RANK, "a fused T tile holds at most MAX_FUSED_RANK columns"
    if m == 0 or n == 0:
        return out
    sms = triton_utils.sm_count(a.device)
    cfg = pick_config(m, n, a.dtype if a.dtype.itemsize == 2 else b.dtype, sms)
    tiles = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)
    # A fused shrink needs all of K in one program; a given T and the bias are added by split 0.
    splittable = down is None and t_out is None
    if split_k is None:
        split_k = k_splits(tiles, k, cfg.BLOCK_K, sms) if splittable else 1
    assert split_k == 1 or splittable, "a fused shrink cannot split its K loop"
    k_split = k
    if split_k > 1:  # K shares whole blocks long; rounding up may leave fewer splits
        k_split = triton.cdiv(triton.cdiv(k, split_k), cfg.BLOCK_K) * cfg.BLOCK_K
        split_k = triton.cdiv(k, k_split)
    # Splits write fp32 slices [split, M, N], summed below.
    target = out if split_k == 1 else torch.empty((split_k, m, n), device=out.device, dtype=torch.float32)
    # tl.dot wants every dimension >= 16: ranks are padded (masked); given-T mode loops over R in blocks
    block_r = min(block(r), MAX_FUSED_RANK)
    t_any = t if t is not None else t_out

    def strides(x):
        return (0, 0) if x is None else tuple(x.stride())

    args = (
        a, b, target, target if bias is None else bias, target if down is None else down,
        target if up is None else up, target if t_any is None else t_any,
        m, n, k, r, float(scaling), k_split,
        *a.stride(), *b.stride(), *target.stride()[-2:], target.stride(0) if split_k > 1 else 0,
        0 if bias is None else bias.stride(0), *strides(down), *strides(up), *strides(t_any),
    )
    constexprs = dict(
        HAS_BIAS=bias is not None, SHRINK=down is not None, EXPAND=up is not None, STORE_T=t_out is not None,
        DOT_DTYPE=dot_dtype(a, b), PRECISION=precision(),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=block_r, GROUP_M=8,
    )
    triton_utils.launch(lors_matmul_kernel, (tiles * split_k,), args, constexprs, cfg.num_warps, cfg.num_stages)
    if split_k > 1:
        out.copy_(target.sum(0))
    return out


def _fuse_shrink(m: int, r: int) -> bool:
    return m <= MAX_FUSED_M and r <= MAX_FUSED_RANK


def lors_linear_forward(x: Tensor, weight: Tensor, down: Tensor, up: Tensor, bias: Tensor | None,
                        scaling: float) -> Tensor:
    """x [M, K] -> [M, N]."""
    m = x.shape[0]
    n, r = weight.shape[0], down.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if r == 0:
        return lors_matmul(x, weight.t(), y, bias=bias)
    if m > 16 and _fuse_shrink(m, r):
        return lors_matmul(x, weight.t(), y, bias=bias, down=down.t(), up=up.t(), scaling=scaling)
    # Large M reads T back instead of recomputing it per column tile; decode (M <= 16) too, so that its
    # K loop can split over the SMs (N / 64 column tiles alone leave most of them idle).
    t = lors_matmul(x, down.t(), torch.empty((m, r), device=x.device, dtype=torch.float32))
    return lors_matmul(x, weight.t(), y, bias=bias, t=t, up=up.t(), scaling=scaling)


def lors_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, down: Tensor, up: Tensor, scaling: float,
                         has_bias: bool, needs_x: bool
                         ) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor | None]:
    """grad [M, N], x [M, K] -> (dx or None, dweight, ddown, dup, dbias or None).

    With s folded into the thin operands (s*down, s*up: R*(K+N) elements):
      T1 = [x (s down)^T | 1]          recomputed rather than saved: one read of x, R/N of the forward
      dx = grad W + (grad s up) down   one launch, which also writes G = grad (s up)
      [dW | dup | dbias] = grad^T [x | T1]   one GEMM over M; dup and dbias come from its first column
                                       (fp32; 16-bit: a thin GEMM of their own, see below)
      ddown = G^T x                    its own thin GEMM: as a side output of the dW GEMM it doubled
                                       that kernel's registers and cost it a pipeline stage (sm_90 AOT)
    """
    m, k = x.shape
    n, r = weight.shape[0], down.shape[0]

    def empty(*shape, dtype=x.dtype):
        return torch.empty(shape, device=x.device, dtype=dtype)

    dx = empty(m, k) if needs_x else None
    dweight, ddown = empty(n, k), empty(r, k)
    if k == 0:  # no column tiles: every product over K is empty
        return dx, dweight, ddown, empty(n, r).zero_(), grad.sum(0) if has_bias else None

    # T1 = [x (s down)^T | 1]: the ones column turns the dW GEMM's side output into dbias.
    t1 = empty(m, r + has_bias, dtype=torch.float32)
    if has_bias:
        t1[:, r].fill_(1.0)
    if r:
        lors_matmul(x, (down * scaling).t(), t1[:, :r])
    g = empty(m, r, dtype=torch.float32)  # grad @ (s up)
    if r and needs_x and _fuse_shrink(m, r):
        lors_matmul(grad, weight, dx, down=(up * scaling), up=down, t_out=g)
    else:
        if r:
            lors_matmul(grad, up * scaling, g)
        if needs_x:
            lors_matmul(grad, weight, dx, t=g if r else None, up=down if r else None)

    side = empty(n, r + has_bias)  # [dup | dbias]
    # 16-bit inputs take the separate thin GEMM. The fused side output runs its dot under a runtime
    # branch, because only the first column of programs shrinks. On an H200 (Triton 3.6), every 16-bit
    # test that crashed (illegal address) or failed took that path; every one that took the separate
    # GEMM (R + bias > 64) passed. The cause is not pinned down. fp32 dots run on the FMA units.
    if 0 < r + has_bias <= MAX_FUSED_RANK and x.dtype == torch.float32:
        lors_matmul(grad.t(), x, dweight, down=t1, t_out=side)
    else:
        lors_matmul(grad.t(), x, dweight)
        lors_matmul(grad.t(), t1, side)
    lors_matmul(g.t(), x, ddown)
    dup = side[:, :r].contiguous()
    return dx, dweight, ddown, dup, side[:, r].contiguous() if has_bias else None


# ------------------------------------------------------------------------------------------ indexed
# Rows at different layers of one stack (down [L, R, K], up [L, N, R], index [M] in [-1, L)). The rows
# are sorted by layer once (`order`, `layer` = index[order], `starts` = where each layer's rows begin in
# that order); every kernel walks rows in sorted order and reads and writes them in place (order[j]), so
# no operand is permuted in memory. A tile of sorted rows holds a few consecutive layers: it reads the
# shared tile once for all its rows and each of its layers' low-rank tiles once, each layer's product
# kept to its own rows (a NaN or inf in one layer's pair never reaches another layer's rows).


@triton.jit
def _layers_of(layer, mask):
    """The first and last layer (>= 0) among a tile's sorted rows; last < first when it has none."""
    first = tl.maximum(tl.min(tl.where(mask, layer, 2147483647)), 0)
    last = tl.max(tl.where(mask, layer, -1))
    return first, last


@triton.jit
def lors_indexed_shrink_kernel(
    a_ptr, down_ptr, t_ptr, order_ptr, layer_ptr, ranks_ptr,
    M, K, R,
    stride_am, stride_ak, stride_dl, stride_dr, stride_dk, stride_tm, stride_tr,
    HAS_RANKS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # T[row] = A[row] @ down[i]^T on the columns below layer i's rank, 0 elsewhere and on rows at -1 (fp32).
    offs_j = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_j = offs_j < M
    rows = tl.load(order_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
    layer = tl.load(layer_ptr + offs_j, mask=mask_j, other=-1)
    first, last = _layers_of(layer, mask_j)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for i in range(first, last + 1):
        rank = tl.load(ranks_ptr + i) if HAS_RANKS else R
        mine = mask_j & (layer == i)
        mask_r = offs_r < rank
        if tl.program_id(1) * BLOCK_R < rank:
            part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                mask_k = ks < K
                a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                            mask=mine[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
                down = tl.load(down_ptr + i * stride_dl + offs_r[None, :] * stride_dr + ks[:, None] * stride_dk,
                               mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
                part = tl.dot(a, down, part, input_precision=PRECISION)
            t = tl.where(mine[:, None], part, t)
    tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
             mask=mask_j[:, None] & (offs_r < R)[None, :])


@triton.jit
def lors_indexed_matmul_kernel(
    a_ptr, b_ptr, c_ptr, t_ptr, up_ptr, scaling_ptr, bias_ptr, order_ptr, layer_ptr, ranks_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_tm, stride_tr,
    stride_ul, stride_ur, stride_un, stride_bl, stride_bn_bias,
    HAS_BIAS: tl.constexpr,
    BIAS_PER_LAYER: tl.constexpr,  # bias [L, N]: rows of layer i add bias[i]; else bias [N]: every row
    HAS_RANKS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # C[row] = A[row] @ B + scaling[i] * T[row] @ up[i] (+ bias) for the rows of a tile of sorted rows.
    pid_m, pid_n = triton_utils.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_j = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_j = offs_j < M
    mask_n = offs_n < N
    rows = tl.load(order_ptr + offs_j, mask=mask_j, other=0).to(tl.int64)
    layer = tl.load(layer_ptr + offs_j, mask=mask_j, other=-1)

    # The shared weight: one pass for the tile's rows, whatever their layers.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=mask_j[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    # Each layer of the tile: its up tile once, up to its own rank, onto its own rows.
    first, last = _layers_of(layer, mask_j)
    for i in range(first, last + 1):
        mine = mask_j & (layer == i)
        rank = tl.load(ranks_ptr + i) if HAS_RANKS else R
        scaling = tl.load(scaling_ptr + i).to(tl.float32)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rs = r0 + offs_r
            mask_r = rs < rank
            t = tl.load(t_ptr + rows[:, None] * stride_tm + rs[None, :] * stride_tr,
                        mask=mine[:, None] & mask_r[None, :], other=0.0)
            up = tl.load(up_ptr + i * stride_ul + rs[:, None] * stride_ur + offs_n[None, :] * stride_un,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
            part = tl.dot((t * scaling).to(DOT_DTYPE), up, part, input_precision=PRECISION)
        if HAS_BIAS:
            if BIAS_PER_LAYER:
                bias = tl.load(bias_ptr + i * stride_bl + offs_n * stride_bn_bias, mask=mask_n, other=0.0)
                part += bias.to(tl.float32)[None, :]
        acc += tl.where(mine[:, None], part, 0.0)
    if HAS_BIAS:
        if not BIAS_PER_LAYER:
            acc += tl.load(bias_ptr + offs_n * stride_bn_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mask_j[:, None] & mask_n[None, :])


@triton.jit
def lors_segment_matmul_kernel(
    a_ptr, b_ptr, c_ptr, scaling_ptr, order_ptr, starts_ptr,
    P, Q,
    stride_am, stride_ap, stride_bm, stride_bq, stride_cl, stride_cp, stride_cq,
    HAS_SCALING: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # C[i] = scaling[i] * A[rows of i]^T @ B[rows of i]: each program owns one tile of one layer's C and
    # walks that layer's rows in order (deterministic, no atomics); a layer without rows gets zeros.
    i = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    lo = tl.load(starts_ptr + i)
    hi = tl.load(starts_ptr + i + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_M):
        js = j0 + tl.arange(0, BLOCK_M)
        mask_j = js < hi
        rows = tl.load(order_ptr + js, mask=mask_j, other=0).to(tl.int64)
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_p[None, :] * stride_ap,
                    mask=mask_j[:, None] & mask_p[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptr + rows[:, None] * stride_bm + offs_q[None, :] * stride_bq,
                    mask=mask_j[:, None] & mask_q[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    if HAS_SCALING:
        acc *= tl.load(scaling_ptr + i).to(tl.float32)
    tl.store(c_ptr + i.to(tl.int64) * stride_cl + offs_p[:, None] * stride_cp + offs_q[None, :] * stride_cq,
             acc.to(c_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


class Rows(NamedTuple):
    """Rows sorted by layer: order (row of each sorted position), layer (its layer), starts [L + 1]."""

    order: Tensor
    layer: Tensor
    starts: Tensor


def sort_rows(index: Tensor, layers: int) -> Rows:
    """Stable, on the device, no host sync (CUDA graphs capture it): rows at -1 come first, in no segment."""
    order = torch.argsort(index, stable=True)
    layer = index[order]
    starts = torch.searchsorted(layer, torch.arange(layers + 1, device=index.device, dtype=layer.dtype))
    return Rows(order, layer, starts)


# Tiles of the shrink (rows, K) and of the segment sums (rows, widest P and Q tile), 4 warps each, 64 rows
# for Hopper's wgmma; the main kernel takes lors_matmul's configurations.
SHRINK_M, SHRINK_K = 64, 64
SEGMENT_M, SEGMENT_PQ = 32, 64


def _given(t: Tensor, stand_in: Tensor) -> Tensor:
    """An empty operand's storage may be no pointer at all; its kernel never reads it: pass another."""
    return t if t.numel() else stand_in


def indexed_shrink(a: Tensor, down: Tensor, rows: Rows, ranks: Tensor | None) -> Tensor:
    """T [M, R] fp32: a[m] @ down[index[m]]^T below the layer's rank, 0 elsewhere; down [L, R, K]."""
    m, k = a.shape
    r = down.shape[1]
    t = torch.empty((m, r), device=a.device, dtype=torch.float32)
    if m == 0 or r == 0:
        return t
    block_r = min(block(r), MAX_FUSED_RANK)
    args = (_given(a, t), _given(down, t), t, rows.order, rows.layer, t if ranks is None else ranks, m, k, r,
            *a.stride(), *down.stride(), *t.stride())
    constexprs = dict(HAS_RANKS=ranks is not None, DOT_DTYPE=dot_dtype(a, down), PRECISION=precision(),
                      BLOCK_M=SHRINK_M, BLOCK_K=SHRINK_K, BLOCK_R=block_r)
    grid = (triton.cdiv(m, SHRINK_M), triton.cdiv(r, block_r))
    triton_utils.launch(lors_indexed_shrink_kernel, grid, args, constexprs, 4, 3)
    return t


def indexed_matmul(a: Tensor, b: Tensor, out: Tensor, t: Tensor, up: Tensor, scaling: Tensor, rows: Rows,
                   ranks: Tensor | None, bias: Tensor | None = None) -> Tensor:
    """out[m] = a[m] @ b + scaling[i] * t[m] @ up[i] (+ bias or bias[i]), i = index[m]; a [M, K], b [K, N],
    t [M, R], up [L, R, N]: any strides."""
    m, k = a.shape
    n, r = b.shape[1], t.shape[1]
    if m == 0 or n == 0:
        return out
    cfg = pick_config(m, n, a.dtype if a.dtype.itemsize == 2 else b.dtype, triton_utils.sm_count(a.device))
    tiles = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)
    per_layer = bias is not None and bias.dim() == 2
    bias_strides = (0, 0) if bias is None else tuple(bias.stride()) if per_layer else (0, bias.stride(0))
    args = (_given(a, out), _given(b, out), out, _given(t, out), _given(up, out), _given(scaling, out),
            out if bias is None else _given(bias, out), rows.order, rows.layer,
            out if ranks is None else _given(ranks, out), m, n, k, r,
            *a.stride(), *b.stride(), *out.stride(), *t.stride(), *up.stride(), *bias_strides)
    constexprs = dict(HAS_BIAS=bias is not None, BIAS_PER_LAYER=per_layer, HAS_RANKS=ranks is not None,
                      DOT_DTYPE=dot_dtype(a, b), PRECISION=precision(), BLOCK_M=cfg.BLOCK_M,
                      BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_R=min(block(r), MAX_FUSED_RANK), GROUP_M=8)
    triton_utils.launch(lors_indexed_matmul_kernel, (tiles,), args, constexprs, cfg.num_warps, cfg.num_stages)
    return out


def segment_matmul(a: Tensor, b: Tensor, out: Tensor, rows: Rows, scaling: Tensor | None = None) -> Tensor:
    """out[i] = scaling[i] * a[rows of i]^T @ b[rows of i]; a [M, P], b [M, Q], out [L, P, Q]."""
    layers, p, q = out.shape
    if out.numel() == 0:
        return out
    if p < q:  # the wider side as the dot's rows (wgmma takes 64 of them): out[i]^T = b^T a
        segment_matmul(b, a, out.transpose(1, 2), rows, scaling)
        return out
    block_p, block_q = min(block(p), SEGMENT_PQ), min(block(q), SEGMENT_PQ)
    args = (_given(a, out), _given(b, out), out, out if scaling is None else scaling, _given(rows.order, rows.starts),
            rows.starts, p, q, *a.stride(), *b.stride(), *out.stride())
    constexprs = dict(HAS_SCALING=scaling is not None, DOT_DTYPE=dot_dtype(a, b), PRECISION=precision(),
                      BLOCK_M=SEGMENT_M, BLOCK_P=block_p, BLOCK_Q=block_q)
    grid = (layers, triton.cdiv(p, block_p), triton.cdiv(q, block_q))
    triton_utils.launch(lors_segment_matmul_kernel, grid, args, constexprs, 4, 2)
    return out


def _per_layer(scaling: Tensor, ranks: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The kernels read scaling[i] and ranks[i] at unit stride: [L] values, copied if they are a view."""
    return scaling.contiguous(), None if ranks is None else ranks.contiguous()


def lors_linear_indexed_forward(x: Tensor, weight: Tensor, down: Tensor, up: Tensor, bias: Tensor | None,
                                scaling: Tensor, index: Tensor, ranks: Tensor | None) -> Tensor:
    """x [M, K], index [M] -> [M, N]: the shrink T = x down_i^T, then one GEMM over the shared weight
    with each layer's T up_i^T added to its rows."""
    scaling, ranks = _per_layer(scaling, ranks)
    rows = sort_rows(index, down.shape[0])
    t = indexed_shrink(x, down, rows, ranks)
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    return indexed_matmul(x, weight.t(), y, t, up.transpose(1, 2), scaling, rows, ranks, bias)


def lors_linear_indexed_backward(grad: Tensor, x: Tensor, weight: Tensor, down: Tensor, up: Tensor,
                                 bias: Tensor | None, scaling: Tensor, index: Tensor, ranks: Tensor | None,
                                 needs_x: bool) -> tuple:
    """grad [M, N], x [M, K], index [M] -> (dx or None, dweight, ddown, dup, dbias or None, dscaling).

      T = x down_i^T, G = grad up_i                 two shrinks (G: up read as [L, R, N])
      dx = grad W + s_i G down_i                    the forward's kernel, down read as [L, R, K]
      dW = grad^T x                                 lors_matmul
      dup_i = s_i grad_i^T T_i, ddown_i = s_i G_i^T x_i, dbias_i = 1^T grad_i, dscaling_i = 1^T (G * T)_i
                                                    segment sums over each layer's rows
    """
    m, k = x.shape
    layers, n = up.shape[0], weight.shape[0]
    scaling, ranks = _per_layer(scaling, ranks)
    rows = sort_rows(index, layers)
    t = indexed_shrink(x, down, rows, ranks)
    g = indexed_shrink(grad, up.transpose(1, 2), rows, ranks)
    dx = None
    if needs_x:
        dx = indexed_matmul(grad, weight, torch.empty_like(x, memory_format=torch.contiguous_format), g, down,
                            scaling, rows, ranks)
    dweight = torch.empty((n, k), device=x.device, dtype=x.dtype)
    if k:
        lors_matmul(grad.t(), x, dweight)
    else:
        dweight.zero_()
    dup = segment_matmul(grad, t, torch.empty_like(up, memory_format=torch.contiguous_format), rows, scaling)
    ddown = segment_matmul(g, x, torch.empty_like(down, memory_format=torch.contiguous_format), rows, scaling)
    ones = t.new_ones(1, 1).expand(m, 1)
    products = (g * t).sum(1, keepdim=True)
    dscaling = segment_matmul(ones, products, scaling.new_empty(layers, 1, 1), rows).view(layers)
    dbias = None
    if bias is not None:
        dbias = grad.sum(0) if bias.dim() == 1 else segment_matmul(ones, grad, bias.new_empty(layers, 1, n), rows)
        dbias = dbias.view(bias.shape)
    return dx, dweight, ddown, dup, dbias, dscaling
