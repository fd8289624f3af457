"""Brute-force top-k pixel selection, and the inputs the tests of several HRCA implementations share."""

import torch
import torch.nn.functional as F
from helpers import KERNEL_DEVICE


def brute_topk(scores, low_hw, high_hw, k, per_query):
    (lh, lw), (hh, hw) = low_hw, high_hw
    s = scores.double() if per_query else scores.double().sum(1, keepdim=True)
    up = F.interpolate(s.reshape(-1, 1, lh, lw), size=(hh, hw), mode="bilinear", align_corners=False)
    up = up.reshape(*s.shape[:2], hh * hw)
    # F.interpolate's (1 - w) a + w b can miss a == b by an ulp where both taps are one cell (borders):
    # rounded to 40 bits, equal pixels tie and go by index as the selection promises
    up = torch.round(up * 2.0**40) / 2.0**40
    out = torch.sort(up, dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values
    return out if per_query else out[:, 0]


def _taps(out_size, in_size):
    """F.interpolate(bilinear, align_corners=False) along one axis, from its definition: each output's two
    source cells and their weights."""
    pos = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    i0 = pos.floor().long().clamp_max(in_size - 1)
    w1 = pos - i0
    return i0, (i0 + 1).clamp_max(in_size - 1), 1 - w1, w1


def exact_topk(scores, low_hw, high_hw, k, per_query):
    """The selection's definition with infinities and NaN: each pixel the sum of its weighted taps, taps of
    weight 0 left out, in IEEE float64 (+inf reaching a pixel makes it +inf, +inf meeting -inf NaN); NaN
    first, then descending, ties to the lower index. Exact for dyadic scores at power-of-two ratios."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    s = scores.double() if per_query else scores.double().sum(1, keepdim=True)
    s = s.reshape(*s.shape[:2], lh, lw)
    y0, y1, vy0, vy1 = _taps(hh, lh)
    x0, x1, vx0, vx1 = _taps(hw, lw)
    value = torch.zeros(*s.shape[:2], hh, hw, dtype=torch.float64)
    for ys, vy in ((y0, vy0), (y1, vy1)):
        for xs, vx in ((x0, vx0), (x1, vx1)):
            weight = vy[:, None] * vx[None, :]
            value = value + torch.where(weight > 0, weight * s[..., ys[:, None], xs[None, :]], 0.0)
    out = torch.sort(value.flatten(2), dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values
    return out if per_query else out[:, 0]


def windows64(scores, low_hw, high_hw, k):
    """FASeg's windows written out: the k best cells of the query-summed scores (stable: ties to the lower
    cell), ascending, each as its ws x ws pixels of the high-resolution map, row-major."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    ws = hh // lh
    cells = torch.sort(scores.double().sum(1), dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
    rows = [
        [
            (cy * ws + dy) * hw + cx * ws + dx
            for c in row
            for cy, cx in [divmod(c, lw)]
            for dy in range(ws)
            for dx in range(ws)
        ]
        for row in cells.tolist()
    ]
    return torch.tensor(rows, dtype=torch.int64).reshape(scores.shape[0], k * ws * ws)


def masked_attention64(q, k, v, index):
    """softmax over the listed rows only, in float64, from the rows themselves (no padding read);
    differentiable in q, k, v."""
    q, k, v = (t.double() for t in (q, k, v))
    b, h, n, _ = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            rows = index[bi] if index.dim() == 2 else index[bi, ni]
            rows = rows[rows >= 0].long()
            for hi in range(h):
                logits = (k[bi, hi, rows] @ q[bi, hi, ni]) * q.shape[-1] ** -0.5
                out[bi, hi, ni] = torch.softmax(logits, 0) @ v[bi, hi, rows]
    return out


def attention_inputs(b, h, n, length, s, d, per_query, dtype, device=KERNEL_DEVICE, seed=0):
    """q, k, v and an index with padding, a duplicate, and (per query) one row with nothing valid."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, rows, d, generator=g).to(device, dtype) for rows in (n, length, length))
    index = torch.randint(0, length, (b, n, s) if per_query else (b, s), generator=g)
    index[..., -3:] = -1
    index[..., 1] = index[..., 0]
    if per_query:
        index[0, n // 2] = -1
    return q, k, v, index.to(device)


def dyadic_scores(b, n, n_low, seed):
    """Multiples of 1/8: bilinear weights for power-of-two ratios are dyadic too, so the upsampled values
    are exact in fp32 and float64 alike, and ties are frequent."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (b, n, n_low), generator=g).float() / 8
