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
    if 0 < r + has_bias <= MAX_FUSED_RANK:
        lors_matmul(grad.t(), x, dweight, down=t1, t_out=side)
    else:
        lors_matmul(grad.t(), x, dweight)
        lors_matmul(grad.t(), t1, side)
    lors_matmul(g.t(), x, ddown)
    dup = side[:, :r].contiguous()
    return dx, dweight, ddown, dup, side[:, r].contiguous() if has_bias else None
