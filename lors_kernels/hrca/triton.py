"""Triton kernels for HRCA: attention over index sets, and fused bilinear top-k selection.

Attention (flash-attention's online softmax, over a list of key rows instead of a range):
- every program walks the index list in blocks of BLOCK_S, loads those K/V rows straight from
  [B, H, L, D] (no gathered K_S/V_S), keeps a running max and sum, and saves only the log-sum-exp;
- a shared index set serves a whole tile of BLOCK_N queries per loaded block (tensor-core dots);
  a per-query set gives each program one query (its rows differ from every other query's);
- padding (-1) and out-of-range tail slots get logit -inf; a row with no valid slot stores 0 and
  lse = +inf, so the backward's exp(logit - lse) is 0 there, never NaN.
Backward (dO, O, lse -> dq, dk, dv; delta = rowsum(dO * O)):
- `attention_query_kernel`: per query tile, dq; for per-query sets also each (query, slot)'s dk/dv;
- `attention_slot_kernel` (shared sets): per slot block, dk/dv summed over every query in registers;
- slot gradients reach dk/dv [B, H, L, D] either by fp32 atomics at their index, or (deterministic
  mode) stored per slot and summed by the caller with index_add_, whose CUDA kernel is deterministic
  under torch.use_deterministic_algorithms.
Logits are scaled by scale * log2(e) so the softmax runs on exp2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import triton_utils
from ..triton_utils import block, dot_dtype, precision

LOG2E = math.log2(math.e)


@triton.jit
def _rows(ptr, index, valid, offs_d, stride_l, D):
    """K or V rows at `index` ([BLOCK_S] int64): [BLOCK_S, BLOCK_D], zero where invalid."""
    mask = valid[:, None] & (offs_d[None, :] < D)
    return tl.load(ptr + index[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _index_block(index_ptr, start, S, L, BLOCK_S: tl.constexpr):
    """Slots start..start+BLOCK_S: (offsets, rows, valid). Rows outside [0, L) count as padding, so
    no launch reads or writes outside k/v (the op reports them as errors before launching)."""
    offs_s = start + tl.arange(0, BLOCK_S)
    index = tl.load(index_ptr + offs_s, mask=offs_s < S, other=-1).to(tl.int64)
    return offs_s, index, (index >= 0) & (index < L)


@triton.jit
def _logits(q, k, valid, scale_log2, PER_QUERY: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """q [BLOCK_N, BLOCK_D] . k [BLOCK_S, BLOCK_D]^T * scale * log2(e), -inf at invalid slots.
    A per-query program has BLOCK_N = 1: a reduction instead of a dot (dots need 16 rows)."""
    if PER_QUERY:
        qk = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :]
    else:
        qk = tl.dot(q.to(DT), tl.trans(k.to(DT)), input_precision=PRECISION)
    return tl.where(valid[None, :], qk * scale_log2, float("-inf"))


@triton.jit
def _times(p, rows, PER_QUERY: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr):
    """p [BLOCK_N, BLOCK_S] @ rows [BLOCK_S, BLOCK_D] in fp32."""
    if PER_QUERY:
        return tl.sum(tl.trans(p) * rows.to(tl.float32), axis=0)[None, :]
    return tl.dot(p.to(DT), rows.to(DT), input_precision=PRECISION)


@triton.jit
def _tile_and_head(tiles, H):
    """(tile, b * H + h, b, h) of this program: the grid is [B * H * tiles] with the tiles of one head
    adjacent (they read the same K/V rows), as one axis because axis 1 holds at most 65535 programs."""
    pid = tl.program_id(0).to(tl.int64)  # 64-bit: B * H * L * D can pass 2^31
    bh = pid // tiles
    return pid % tiles, bh, bh // H, bh % H


@triton.jit
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, index_ptr, out_ptr, lse_ptr,
    tiles, H, N, S, L, D, scale_log2,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, si_b, si_n, so_b, so_h, so_n,
    PER_QUERY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, bh, b, h = _tile_and_head(tiles, H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0)
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    index_ptr += b * si_b + pid_n * si_n  # si_n = 0 for a shared set

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, S, BLOCK_S):
        _, index, valid = _index_block(index_ptr, start, S, L, BLOCK_S)
        k = _rows(k_ptr, index, valid, offs_d, sk_l, D)
        logits = _logits(q, k, valid, scale_log2, PER_QUERY, DT, PRECISION)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
        p = tl.exp2(logits - m_ref[:, None])
        alpha = tl.exp2(m - m_ref)
        l = l * alpha + tl.sum(p, axis=1)
        v = _rows(v_ptr, index, valid, offs_d, sv_l, D)
        acc = acc * alpha[:, None] + _times(p, v, PER_QUERY, DT, PRECISION)
        m = m_new

    has_any = l > 0
    out = acc / tl.where(has_any, l, 1.0)[:, None]
    tl.store(out_ptr + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)
    lse = tl.where(has_any, (m + tl.log2(tl.where(has_any, l, 1.0))) / 1.4426950408889634, float("inf"))
    tl.store(lse_ptr + bh * N + offs_n, lse, mask=offs_n < N)


@triton.jit
def _slot_grads_out(dk, dv, index, valid, offs_s, offs_d, D, dk_ptr, dv_ptr, s_l, ATOMIC: tl.constexpr):
    """Send one block of slot gradients [BLOCK_S, BLOCK_D] on: atomically added at their index into
    dk/dv (fp32, row stride s_l), or stored per slot (rows offs_s of a slot buffer) for a
    deterministic sum by the caller."""
    if ATOMIC:
        mask = valid[:, None] & (offs_d[None, :] < D)
        at = index[:, None] * s_l + offs_d[None, :]
        # relaxed: nothing reads these sums before the kernel ends
        tl.atomic_add(dk_ptr + at, dk, mask=mask, sem="relaxed")
        tl.atomic_add(dv_ptr + at, dv, mask=mask, sem="relaxed")
    else:
        mask = (offs_s[:, None] >= 0) & (offs_d[None, :] < D)
        at = offs_s[:, None] * s_l + offs_d[None, :]
        tl.store(dk_ptr + at, tl.where(valid[:, None], dk, 0.0), mask=mask)
        tl.store(dv_ptr + at, tl.where(valid[:, None], dv, 0.0), mask=mask)


@triton.jit
def attention_query_kernel(
    q_ptr, k_ptr, v_ptr, index_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    tiles, H, N, S, L, D, n0, scale_log2, scale,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, si_b, si_n, sd_b, sd_h, sd_n, sdq_b, sdq_h, sdq_n,
    sg_b, sg_h, sg_n, sg_l,
    PER_QUERY: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq for a tile of queries (from n0 on). Per-query sets: also each slot's dk/dv, atomically into
    dk/dv [B, H, L, D] (strides sg_b, sg_h, sg_l) or stored into a per-slot buffer [B, H, chunk, S, D]
    (strides sg_b, sg_h, sg_n, sg_l)."""
    pid_n, bh, b, h = _tile_and_head(tiles, H)
    offs_n = n0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0)
    dout = tl.load(dout_ptr + b * sd_b + h * sd_h + offs_n[:, None] * sd_n + offs_d[None, :], mask=q_mask, other=0.0)
    lse_log2 = tl.load(lse_ptr + bh * N + offs_n, mask=offs_n < N, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * N + offs_n, mask=offs_n < N, other=0.0)
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    index_ptr += b * si_b + (n0 + pid_n) * si_n
    dk_ptr += b * sg_b + h * sg_h + pid_n * sg_n  # sg_n = 0 when adding into dk/dv [B, H, L, D]
    dv_ptr += b * sg_b + h * sg_h + pid_n * sg_n

    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, S, BLOCK_S):
        offs_s, index, valid = _index_block(index_ptr, start, S, L, BLOCK_S)
        k = _rows(k_ptr, index, valid, offs_d, sk_l, D)
        v = _rows(v_ptr, index, valid, offs_d, sv_l, D)
        p = tl.exp2(_logits(q, k, valid, scale_log2, PER_QUERY, DT, PRECISION) - lse_log2[:, None])
        if PER_QUERY:
            dp = tl.sum(dout.to(tl.float32) * v.to(tl.float32), axis=1)[None, :]
        else:
            dp = tl.dot(dout.to(DT), tl.trans(v.to(DT)), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _times(ds, k, PER_QUERY, DT, PRECISION)
        if PER_QUERY:  # this program is the only one with these (query, slot) pairs
            dv_rows = tl.trans(p) * dout.to(tl.float32)
            dk_rows = tl.trans(ds) * q.to(tl.float32) * scale
            _slot_grads_out(dk_rows, dv_rows, index, valid, tl.where(offs_s < S, offs_s, -1), offs_d, D,
                            dk_ptr, dv_ptr, sg_l, ATOMIC)
    tl.store(dq_ptr + b * sdq_b + h * sdq_h + offs_n[:, None] * sdq_n + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def attention_slot_kernel(
    q_ptr, k_ptr, v_ptr, index_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    tiles, H, N, S, L, D, scale_log2, scale,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, si_b, sd_b, sd_h, sd_n, sg_b, sg_h, sg_l,
    ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    DT: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk, dv of one block of a shared index set, summed over every query of the (batch, head)."""
    pid_s, bh, b, h = _tile_and_head(tiles, H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s, index, valid = _index_block(index_ptr + b * si_b, pid_s * BLOCK_S, S, L, BLOCK_S)
    k = _rows(k_ptr + b * sk_b + h * sk_h, index, valid, offs_d, sk_l, D).to(DT)
    v = _rows(v_ptr + b * sv_b + h * sv_h, index, valid, offs_d, sv_l, D).to(DT)
    q_ptr += b * sq_b + h * sq_h
    dout_ptr += b * sd_b + h * sd_h

    dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        q_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
        q = tl.load(q_ptr + offs_n[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0).to(DT)
        dout = tl.load(dout_ptr + offs_n[:, None] * sd_n + offs_d[None, :], mask=q_mask, other=0.0).to(DT)
        lse_log2 = tl.load(lse_ptr + bh * N + offs_n, mask=offs_n < N, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + bh * N + offs_n, mask=offs_n < N, other=0.0)
        p = tl.exp2(_logits(q, k, valid, scale_log2, False, DT, PRECISION) - lse_log2[:, None])
        dv += tl.dot(tl.trans(p.to(DT)), dout, input_precision=PRECISION)
        dp = tl.dot(dout, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(DT)), q, input_precision=PRECISION)
    base = b * sg_b + h * sg_h
    _slot_grads_out(dk * scale, dv, index, valid, tl.where(offs_s < S, offs_s, -1), offs_d, D,
                    dk_ptr + base, dv_ptr + base, sg_l, ATOMIC)


# ------------------------------------------------------------------------------------------- launchers


def _config(per_query: bool, n: int, d: int, dtype: torch.dtype, programs_per_query_tile: int, sms: int):
    """(BLOCK_N, BLOCK_S, BLOCK_D, num_warps). Per-query programs hold a [BLOCK_S, BLOCK_D] tile per
    operand and reduce it: keep it to 8K elements. Shared sets: query tiles as tall as still give about
    two programs per SM (a taller tile reuses each loaded K/V block more, but a few
    hundred queries over B * H heads make few programs); dot tiles halve for rows over 256 bytes
    (D = 128 in fp32, 256 in 16-bit) to stay within sm_80's 163 KB of shared memory."""
    block_d = block(d)
    if per_query:
        return 1, max(16, min(128, 8192 // block_d)), block_d, 4
    tile = 64 if block_d * dtype.itemsize <= 256 else 32
    block_n = tile
    while block_n > 16 and triton.cdiv(n, block_n) * programs_per_query_tile < 2 * sms:
        block_n //= 2
    return block_n, tile, block_d, 4 if block_d <= 64 else 8


def _strides(t: torch.Tensor, dims: int = 3):
    return list(t.stride()[:dims])


def _index_strides(index: torch.Tensor):
    return [index.stride(0), index.stride(1) if index.dim() == 3 else 0]


def attention_forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, H, N, D] in q's dtype, lse [B, H, N] fp32, natural log). Last dims contiguous."""
    b, h, n, d = q.shape
    per_query = index.dim() == 3
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    if q.numel() == 0 or index.shape[-1] == 0:  # nothing to launch: every row is empty or fully padded
        return out.zero_(), lse.fill_(float("inf"))
    block_n, block_s, block_d, warps = _config(per_query, n, d, q.dtype, b * h, triton_utils.sm_count(q.device))
    tiles = triton.cdiv(n, block_n)
    args = [q, k, v, index, out, lse, tiles, h, n, index.shape[-1], k.shape[2], d, scale * LOG2E,
            *_strides(q), *_strides(k), *_strides(v), *_index_strides(index), *_strides(out)]
    constexprs = dict(PER_QUERY=per_query, BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_D=block_d,
                      DT=dot_dtype(q), PRECISION=precision())
    triton_utils.launch(attention_forward_kernel, (tiles * b * h,), args, constexprs, warps, num_stages=2)
    return out, lse


# Deterministic per-query backward: per-slot gradients of this many (query, slot, channel) values at a time.
SLOT_BUFFER_ELEMENTS = 1 << 25


def _scatter_rows(grad, slots, index):
    """grad [B, H, L, D] (fp32) += slots [B, H, *, S, D] at rows index ([B, S] or [B, *, S]), with
    index_add_ (deterministic on CUDA under torch.use_deterministic_algorithms). Padding slots hold
    zeros and go to row 0."""
    b, h, length, d = grad.shape
    rows = index.long().clamp_min(0)
    rows = rows.reshape(b, 1, -1) + length * torch.arange(b * h, device=grad.device).reshape(b, h, 1)
    grad.view(-1, d).index_add_(0, rows.reshape(-1), slots.reshape(-1, d))


def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, out: Tensor, lse: Tensor,
                       scale: float, deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    b, h, n, d = q.shape
    length, s = k.shape[2], index.shape[-1]
    if q.numel() == 0 or s == 0:  # nothing attended to: no gradient anywhere
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    per_query = index.dim() == 3
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    # fp32 accumulators; fp32 inputs accumulate into the gradients themselves
    dk = torch.zeros((b, h, length, d), device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    block_n, block_s, block_d, warps = _config(per_query, n, d, q.dtype, b * h, triton_utils.sm_count(q.device))
    constexprs = dict(BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_D=block_d, DT=dot_dtype(q), PRECISION=precision())
    common = [h, n, s, length, d]
    strides = [*_strides(q), *_strides(k), *_strides(v)]
    if per_query:
        chunk = n if not deterministic else max(1, min(n, SLOT_BUFFER_ELEMENTS // max(1, b * h * s * d)))
        if deterministic:
            target = [torch.empty((b, h, chunk, s, d), device=q.device, dtype=torch.float32) for _ in range(2)]
            grad_strides = list(target[0].stride()[:4])
        else:
            target, grad_strides = (dk, dv), [dk.stride(0), dk.stride(1), 0, dk.stride(2)]
        for n0 in range(0, n, chunk):
            rows = min(chunk, n - n0)
            args = [q, k, v, index, dout, lse, delta, dq, *target, rows, *common, n0, scale * LOG2E, scale,
                    *strides, *_index_strides(index), *_strides(dout), *_strides(dq), *grad_strides]
            triton_utils.launch(attention_query_kernel, (rows * b * h,), args,
                                dict(PER_QUERY=True, ATOMIC=not deterministic, **constexprs), warps)
            if deterministic:
                _scatter_rows(dk, target[0][:, :, :rows], index[:, n0:n0 + rows])
                _scatter_rows(dv, target[1][:, :, :rows], index[:, n0:n0 + rows])
    else:
        tiles = triton.cdiv(n, block_n)
        args = [q, k, v, index, dout, lse, delta, dq, dk, dv, tiles, *common, 0, scale * LOG2E, scale,
                *strides, *_index_strides(index), *_strides(dout), *_strides(dq), 0, 0, 0, 0]
        triton_utils.launch(attention_query_kernel, (tiles * b * h,), args,
                            dict(PER_QUERY=False, ATOMIC=True, **constexprs), warps, num_stages=2)
        target = (dk, dv) if not deterministic else [
            torch.empty((b, h, s, d), device=q.device, dtype=torch.float32) for _ in range(2)]
        tiles = triton.cdiv(s, block_s)
        args = [q, k, v, index, dout, lse, delta, *target, tiles, *common, scale * LOG2E, scale,
                *strides, index.stride(0), *_strides(dout), *_strides(target[0])]
        # S / BLOCK_S * B * H programs fill the GPU already: query tiles as tall as the slot blocks
        triton_utils.launch(attention_slot_kernel, (tiles * b * h,), args,
                            dict(constexprs, ATOMIC=not deterministic, BLOCK_N=block_s), warps)
        if deterministic:
            _scatter_rows(dk, target[0], index)
            _scatter_rows(dv, target[1], index)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------- selection


@triton.jit
def _source(pos, scale, in_size):
    """F.interpolate(bilinear, align_corners=False) along one axis: (i0, i1, w1) for output positions."""
    src = tl.maximum((pos.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    return i0, tl.minimum(i0 + 1, in_size - 1), src - i0.to(tl.float32)


@triton.jit
def _lerp(a, b, w):
    """a + w (b - a): where both taps are equal (clamped borders, flat regions) the value is exactly
    theirs, so equal pixels tie and the lower index wins. A tap of weight 0 is left out and an infinite
    a kept, where the formula would make NaN of both (reference._lerp)."""
    return tl.where((w == 0) | (a == b), a, tl.where(tl.abs(a) == float("inf"), a + b, a + w * (b - a)))


@triton.jit
def _merge_best(best, key, K_POW2: tl.constexpr, BLOCK: tl.constexpr):
    """The K_POW2 largest of the running best keys (sorted descending) and a block's keys, sorted
    descending. The elementwise max of a descending and an ascending list holds the K_POW2 largest of
    both and is bitonic: one bitonic merge sorts it, instead of a full sort of 2 * K_POW2 keys."""
    if BLOCK > K_POW2:
        ascending = tl.flip(tl.topk(key, K_POW2), 0)
    else:
        ascending = tl.sort(key)
    return tl.bitonic_merge(tl.maximum(best, ascending), descending=True)


@triton.jit
def topk_pixels_kernel(
    scores_ptr, out_ptr, LH, LW, HH, HW, scale_y, scale_x, K, s_row, so_row,
    K_POW2: tl.constexpr, BLOCK: tl.constexpr,
):
    """The K best pixels of one bilinearly upsampled score map (one program per map), never stored.

    Each value and its pixel index are packed into one int64 key (order-preserving float bits high,
    2^31 - 1 - index low), so one sort orders by value and, on ties, puts the lower index first.
    A running best list of K_POW2 keys is merged with each block's best K_POW2."""
    row = tl.program_id(0)
    scores_ptr += row.to(tl.int64) * s_row
    lowest: tl.constexpr = -(2**63)
    best = tl.full([K_POW2], lowest, tl.int64)
    n_pixels = HH * HW
    for start in range(0, n_pixels, BLOCK):
        pix = start + tl.arange(0, BLOCK)
        inside = pix < n_pixels
        y0, y1, wy = _source(pix // HW, scale_y, LH)
        x0, x1, wx = _source(pix % HW, scale_x, LW)
        s00 = tl.load(scores_ptr + y0 * LW + x0, mask=inside, other=0.0)
        s01 = tl.load(scores_ptr + y0 * LW + x1, mask=inside, other=0.0)
        s10 = tl.load(scores_ptr + y1 * LW + x0, mask=inside, other=0.0)
        s11 = tl.load(scores_ptr + y1 * LW + x1, mask=inside, other=0.0)
        value = _lerp(_lerp(s00, s01, wx), _lerp(s10, s11, wx), wy)
        bits = (value + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes +0.0, which it equals
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed-int order
        ordered = tl.where(value != value, 0x7FFFFFFF, ordered)  # every NaN above +inf, as torch.topk
        key = tl.where(inside, (ordered.to(tl.int64) << 32) + (2147483647 - pix).to(tl.int64), lowest)
        if tl.max(key, axis=0) > tl.min(best, axis=0):  # most blocks of a smooth map change nothing
            best = _merge_best(best, key, K_POW2, BLOCK)
    offs = tl.arange(0, K_POW2)
    low = best - ((best >> 32) << 32)
    tl.store(out_ptr + row.to(tl.int64) * so_row + offs, 2147483647 - low, mask=offs < K)


def topk_pixels(scores: Tensor, low_hw: tuple[int, int] | Sequence[int], high_hw: tuple[int, int] | Sequence[int],
                k: int) -> Tensor:
    """scores [R, n_low] fp32 (one map per row) -> int64 [R, k] pixel indices, unsorted."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    rows = scores.shape[0]
    out = torch.empty((rows, k), device=scores.device, dtype=torch.int64)
    k_pow2 = block(k)  # sorts want a few elements at least
    block_pixels = max(k_pow2, min(1024, triton.next_power_of_2(hh * hw)))
    args = [scores, out, lh, lw, hh, hw, lh / hh, lw / hw, k, scores.stride(0), out.stride(0)]
    triton_utils.launch(topk_pixels_kernel, (rows,), args, dict(K_POW2=k_pow2, BLOCK=block_pixels),
                        num_warps=8 if k_pow2 >= 1024 else 4)
    return out
