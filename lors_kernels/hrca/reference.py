"""Pure-PyTorch high-resolution cross-attention (FASeg's HRCA): selection of the high-resolution
positions worth attending to, and attention restricted to them. The test oracle and the CPU path.

Selection (docs/design.md §1.3):
- window: sum the low-resolution scores [B, N, n_low] over queries, keep the k best cells, and expand
  each to its ws x ws window of the high-resolution map (ws = high / low per side).
- bilinear: upsample the scores to the high-resolution grid (F.interpolate, align_corners=False) and
  keep the k best pixels, shared per image (summed over queries) or per query. The upsampled map is
  never materialized: rows of it are built and merged a chunk at a time.
Ties go to the lower index. Bilinear selection returns its indices sorted ascending (row-major); window
selection returns them grouped by window, cells ascending, each window's pixels row-major.

Infinite and NaN scores: a pixel's value is the bilinear sum of the taps it weighs, a tap of weight 0
left out, in IEEE arithmetic: a +inf tap makes every pixel it reaches +inf (they tie, lower index
first), +inf meeting -inf makes NaN, and NaN ranks above every number (as torch.topk ranks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def window_size(low_hw: tuple[int, int] | Sequence[int], high_hw: tuple[int, int] | Sequence[int]) -> int:
    (lh, lw), (hh, hw) = low_hw, high_hw
    if hh % lh or hw % lw or hh // lh != hw // lw:
        raise ValueError(
            f"high-resolution map {tuple(high_hw)} is not an integer multiple of the low-resolution "
            f"map {tuple(low_hw)} with one ratio for both sides"
        )
    return hh // lh


def _lerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """(1 - w) a + w b as a + w (b - a), which is exactly a where both taps are equal (equal pixels then tie);
    a tap of weight 0 left out and an infinite a kept (a + w (b - a) would make NaN of both)."""
    return torch.where((w == 0) | (a == b), a, torch.where(torch.isinf(a), a + b, a + w * (b - a)))


def _topk_lowest_index(values: Tensor, k: int):
    """Top-k along the last dim, ties broken by the lower index (a stable descending sort)."""
    if torch.compiler.is_exporting():  # ONNX has no stable sort; its TopK breaks ties to the lower index
        return torch.topk(values, k, dim=-1)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
    return values.gather(-1, order), order


def select_windows(
    scores: Tensor, low_hw: tuple[int, int] | Sequence[int], high_hw: tuple[int, int] | Sequence[int], k: int
) -> Tensor:
    """scores [B, N, n_low] -> int64 pixel indices [B, k * ws * ws] into the flattened high-res map."""
    ws = window_size(low_hw, high_hw)
    lh, lw = low_hw
    total = scores.sum(1, dtype=torch.promote_types(scores.dtype, torch.float32))  # fp32 at least
    cells = _topk_lowest_index(total, k)[1].sort(dim=-1).values  # [B, k], row-major
    cy, cx = cells // lw, cells % lw
    d = torch.arange(ws, device=scores.device)
    rows = (cy[:, :, None] * ws + d)[:, :, :, None]  # [B, k, ws, 1]
    cols = (cx[:, :, None] * ws + d)[:, :, None, :]  # [B, k, 1, ws]
    return (rows * (lw * ws) + cols).reshape(scores.shape[0], cells.shape[1] * ws * ws)  # B may be 0: no -1


def _source_taps(out_size: int, in_size: int, device):
    """F.interpolate(mode="bilinear", align_corners=False) along one axis: (i0, i1, w1) per output."""
    pos = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    pos = pos.clamp_min(0)
    i0 = pos.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (pos - i0)


def select_topk_pixels(
    scores: Tensor,
    low_hw: tuple[int, int] | Sequence[int],
    high_hw: tuple[int, int] | Sequence[int],
    k: int,
    *,
    per_query: bool = False,
    rows_per_chunk: int = 64,
) -> Tensor:
    """scores [B, N, n_low] -> int64 indices [B, k] (shared: summed over queries) or [B, N, k] (per query)
    of the k largest pixels of the bilinearly upsampled map. Peak memory O(rows_per_chunk * W + k)."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    s = scores.double()
    s = s.sum(1, keepdim=True) if not per_query else s
    s = s.reshape(*s.shape[:2], lh, lw)
    y0, y1, wy = _source_taps(hh, lh, s.device)
    x0, x1, wx = _source_taps(hw, lw, s.device)
    # Upsample along x once: [B, N', lh, W_high] (1/ws of the full map), then rows chunk by chunk.
    sx = _lerp(s[..., x0], s[..., x1], wx)
    best_val = best_idx = None
    for start in range(0, hh, rows_per_chunk):
        ys = slice(start, min(start + rows_per_chunk, hh))
        rows = _lerp(sx[..., y0[ys], :], sx[..., y1[ys], :], wy[ys, None])
        rows = rows.flatten(-2)
        idx = torch.arange(ys.start * hw, ys.stop * hw, device=s.device).expand_as(rows)
        if best_val is not None:  # earlier chunks hold lower indices: they go first, so they win ties
            rows, idx = torch.cat([best_val, rows], -1), torch.cat([best_idx, idx], -1)
        best_val, order = _topk_lowest_index(rows, k)
        best_idx = idx.gather(-1, order)
    out = best_idx.sort(dim=-1).values
    return out[:, 0] if not per_query else out


def _rows(k, v, index, n, padded=True):
    """(K_S, V_S, mask): the listed rows and which slots are real. Shared: K_S [B, H, S, D], mask
    [B, 1, 1, S]; per query: K_S [B, H, N, S, D] (every query's own rows), mask [B, 1, N, S].
    padded=False says no entry is -1 (known by a caller that synced for it): no padding slot to zero."""
    b, h, length, d = k.shape
    index = index.long()
    safe = index.clamp_min(0)
    if not length:  # no keys, every entry padding: one zero row to gather from (masked below)
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
    if index.dim() == 3:
        gather = safe[:, None, :, :, None].expand(b, h, n, safe.shape[-1], d)
        ks = k[:, :, None].expand(b, h, n, *k.shape[2:]).gather(3, gather)
        vs = v[:, :, None].expand(b, h, n, *v.shape[2:]).gather(3, gather)
        mask, slots = (index >= 0)[:, None], (index >= 0)[:, None, :, :, None]
    else:
        gather = safe[:, None, :, None].expand(b, h, safe.shape[-1], d)
        ks, vs = k.gather(2, gather), v.gather(2, gather)
        mask, slots = (index >= 0)[:, None, None, :], (index >= 0)[:, None, :, None]
    if not padded:  # the caller knows there is no padding: nothing to zero
        return ks, vs, mask
    # Padding slots read row 0: zeroed, so that what row 0 holds (NaN, inf) cannot reach a result that
    # does not select it (a zero probability times NaN is NaN).
    return ks.masked_fill(~slots, 0), vs.masked_fill(~slots, 0), mask


def _gather(q, k, v, index, scale):
    """(K_S, V_S, mask, fp32+ logits [B, H, N, S] with padding at the lowest finite value)."""
    ks, vs, mask = _rows(k, v, index, q.shape[2])
    logits = (q[:, :, :, None, :] * ks).sum(-1) if ks.dim() == 5 else q @ ks.transpose(-1, -2)
    # Padding gets the lowest finite logit, then probability 0: a row with nothing valid comes out 0,
    # with finite gradients (an all -inf row would give NaN).
    dtype = torch.promote_types(logits.dtype, torch.float32)  # softmax in fp32 at least
    logits = (logits * scale).to(dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return ks, vs, mask, logits


def _weighted(probs, vs):
    """sum_s probs[..., s] * vs[..., s, :] for shared ([B, H, S, D]) or per-query ([B, H, N, S, D]) rows."""
    return (probs[..., None] * vs).sum(-2) if vs.dim() == 5 else probs @ vs


def sparse_cross_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float | None = None) -> Tensor:
    """softmax(q k_S^T * scale) v_S per head over the positions S in `index`.

    q [B, H, N, D], k/v [B, H, L, D], index [B, S] (shared by every query) or [B, N, S] (per query),
    entries -1 are padding. Duplicated indices count once per occurrence. A row with no valid index
    returns zeros. The gathered rows go through SDPA (PyTorch's fused CPU kernel): per query, each
    query is a batch of its own."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    padded = bool((index < 0).any())  # one sync here, where the eager call may sync: the SDPA mask needs it
    ks, vs, mask = _rows(k, v, index, q.shape[2], padded)
    # padding: an additive mask at half the lowest finite value (-inf would give NaN for all-padding
    # rows; the lowest itself can overflow to -inf once a logit is added)
    bias = (
        torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min / 2)
        if padded
        else None
    )
    if ks.dim() == 5:
        out = F.scaled_dot_product_attention(
            q[:, :, :, None], ks, vs, attn_mask=None if bias is None else bias[..., None, :], scale=scale
        )[:, :, :, 0]
    else:
        out = F.scaled_dot_product_attention(q, ks, vs, attn_mask=bias, scale=scale)
    return out.masked_fill(~mask.any(-1)[..., None], 0) if padded else out


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) from one gather: what the op's PyTorch path returns. lse is fp32 [B, H, N], +inf for a
    row with no valid key (the kernels' convention: exp(logit - lse) is then 0)."""
    ks, vs, mask, logits = _gather(q, k, v, index, scale)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = _weighted((torch.exp(logits - lse) * mask).to(q.dtype), vs)
    return out, lse[..., 0].float().masked_fill(~mask.any(-1), float("inf"))


def _scatter(grad_s, index, length):
    """Sum slot gradients [B, H, S, D] or [B, H, N, S, D] into rows [B, H, L, D] at their index."""
    b, h, d = grad_s.shape[0], grad_s.shape[1], grad_s.shape[-1]
    out = grad_s.new_zeros((b, h, length, d))
    if not length:  # no keys: every entry was padding
        return out
    slots = index.numel() // b if b else 0  # spelled out: with B = 0 a -1 could be anything
    rows = index.long().clamp_min(0).reshape(b, 1, slots, 1).expand(b, h, slots, d)
    return out.scatter_add_(2, rows, grad_s.reshape(b, h, slots, d))


def sparse_cross_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of sparse_cross_attention, by the softmax backward written out (the custom op's
    reference backward runs below autograd). Padding slots have probability 0, so they add nothing."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ks, vs, mask, logits = _gather(q, k, v, index, scale)
    probs = torch.softmax(logits, dim=-1) * mask
    dtype = probs.dtype
    dout = dout.to(dtype)
    per_query = index.dim() == 3
    dprobs = (dout[:, :, :, None, :] * vs).sum(-1) if per_query else dout @ vs.to(dtype).transpose(-1, -2)
    dlogits = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) * scale
    dq = _weighted(dlogits, ks.to(dtype))
    if per_query:
        dks, dvs = dlogits[..., None] * q[:, :, :, None, :].to(dtype), probs[..., None] * dout[:, :, :, None, :]
    else:
        dks, dvs = dlogits.transpose(-1, -2) @ q.to(dtype), probs.transpose(-1, -2) @ dout
    length = k.shape[2]
    return dq.to(q.dtype), _scatter(dks, index, length).to(k.dtype), _scatter(dvs, index, length).to(v.dtype)
