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
