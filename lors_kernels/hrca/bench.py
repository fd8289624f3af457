"""HRCA's benchmarks. `hrca`: selection + sparse attention against top-k + gather + SDPA and dense SDPA
over the whole high-resolution map, forward and forward+backward. `hrca_selection`: bilinear top-k
alone against upsampling the whole map with F.interpolate + topk."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bench import Family, Target, forward_backward, seeded_randn
from ..report import OURS

# (low_hw, high_hw, windows kept): ADE20K at 512^2 and Cityscapes at 1024 x 2048, strides 32 and 4.
SIZES = {"ade": ((16, 16), (128, 128), 8), "cityscapes": ((32, 64), (256, 512), 64)}
HEADS, DIM = 8, 256


def _pixels(size: str) -> int:
    (lh, _), (hh, _), windows = SIZES[size]
    return windows * (hh // lh) ** 2


def attention_grid(device: str, quick: bool) -> list[dict]:
    """Selection: FASeg's windows, or bilinear top-k (k = windows * ws^2 pixels) shared or per query."""
    selections = ("window", "bilinear", "bilinear-per-query")
    if device == "cuda":
        ns = (100,) if quick else (100, 300)
        shapes = [(size, sel, 2, n) for size in SIZES for sel in selections for n in ns]
    else:
        shapes = [("ade", "window", 1, 100)] if quick else [("ade", sel, 1, 100) for sel in selections]
    return [{"size": size, "select": sel, "B": b, "N": n, "S": _pixels(size)} for size, sel, b, n in shapes]


def selection_grid(device: str, quick: bool) -> list[dict]:
    b, ns = (2, (100, 300)) if device == "cuda" else (1, (100,) if quick else (100, 300))
    sizes = ("cityscapes",) if quick else tuple(SIZES)
    return [
        {"size": size, "select": sel, "B": b, "N": n, "k": _pixels(size)}
        for size in sizes
        for sel in ("bilinear", "bilinear-per-query")
        for n in ns
    ]


def torch_topk_pixels(
    scores: Tensor,
    low_hw: tuple[int, int] | Sequence[int],
    high_hw: tuple[int, int] | Sequence[int],
    k: int,
    per_query: bool,
) -> Tensor:
    """Bilinear top-k as one writes it in PyTorch: upsample the whole map, top-k -> [B, 1 or N, k]."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    maps = scores.sum(1, keepdim=True) if not per_query else scores
    up = F.interpolate(maps.reshape(-1, 1, lh, lw).float(), size=(hh, hw), mode="bilinear", align_corners=False)
    return up.reshape(scores.shape[0], -1, hh * hw).topk(k, dim=-1).indices


def _scores(device, dtype, size, b, n):
    (lh, lw), _, _ = SIZES[size]
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, n, lh * lw, generator=g).softmax(-1).to(device=device, dtype=dtype)


def _attention_providers(scores, q, k, v, size, selection):
    """Ours (fused selection, attention reading K/V rows by index) against what one writes in PyTorch:
    top-k (of the upsampled scores for bilinear), gather K/V rows, SDPA; and SDPA over the whole map."""
    import lors_kernels as lk

    low_hw, high_hw, windows = SIZES[size]
    (lh, lw), (hh, hw) = low_hw, high_hw
    ws = hh // lh
    per_query = selection.endswith("per-query")
    b, h, n, d = q.shape

    def ours():
        if selection == "window":
            index = lk.select_windows(scores, low_hw, high_hw, windows)
        else:
            index = lk.select_topk_pixels(scores, low_hw, high_hw, windows * ws * ws, per_query=per_query)
        return lk.sparse_cross_attention(q, k, v, index)

    def topk_gather_sdpa():
        if selection == "window":
            cells = scores.sum(1).topk(windows, dim=-1).indices  # [B, k]
            offsets = torch.arange(ws, device=q.device)
            rows = (cells // lw * ws)[:, :, None, None] + offsets[:, None]
            cols = (cells % lw * ws)[:, :, None, None] + offsets
            index = (rows * hw + cols).flatten(1)
        else:
            index = torch_topk_pixels(scores, low_hw, high_hw, windows * ws * ws, per_query)  # [B, 1 or N, S]
        if not per_query:
            rows = index.reshape(b, 1, -1, 1).expand(b, h, -1, d)
            return F.scaled_dot_product_attention(q, k.gather(2, rows), v.gather(2, rows))
        rows = index[:, None, :, :, None].expand(b, h, n, -1, d)  # every query's own K/V rows
        k_s = k[:, :, None].expand(b, h, n, -1, d).gather(3, rows)
        v_s = v[:, :, None].expand(b, h, n, -1, d).gather(3, rows)
        return F.scaled_dot_product_attention(q[:, :, :, None], k_s, v_s)[:, :, :, 0]

    return {
        OURS: ours,
        "topk+gather+SDPA": topk_gather_sdpa,
        "dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
    }


def build_attention(device: str, dtype: torch.dtype, shape: dict, mode: str) -> dict:
    size, b, n = shape["size"], shape["B"], shape["N"]
    (hh, hw) = SIZES[size][1]
    rand = seeded_randn(device, dtype)
    scores = _scores(device, dtype, size, b, n)
    d = DIM // HEADS
    q, k, v = rand(b, HEADS, n, d), rand(b, HEADS, hh * hw, d), rand(b, HEADS, hh * hw, d)
    if mode == "fwd":
        return _attention_providers(scores, q, k, v, size, shape["select"])
    leaves = [t.requires_grad_() for t in (q, k, v)]
    return forward_backward(_attention_providers(scores, *leaves, size, shape["select"]), leaves, rand(b, HEADS, n, d))


def build_selection(device: str, dtype: torch.dtype, shape: dict, mode: str) -> dict:
    import lors_kernels as lk

    low_hw, high_hw, _ = SIZES[shape["size"]]
    scores = _scores(device, dtype, shape["size"], shape["B"], shape["N"])
    k, per_query = shape["k"], shape["select"].endswith("per-query")
    return {
        OURS: lambda: lk.select_topk_pixels(scores, low_hw, high_hw, k, per_query=per_query),
        # sorted ascending as ours is: the same result
        "interpolate+topk": lambda: torch_topk_pixels(scores, low_hw, high_hw, k, per_query).sort(-1).values,
    }


FAMILIES = [
    Family(
        "hrca",
        attention_grid,
        lambda device: (OURS, "topk+gather+SDPA", "dense SDPA"),
        build_attention,
        # GPU bf16: >= 3x faster than top-k + gather + SDPA at Cityscapes size.
        targets=(Target("topk+gather+SDPA", 1 / 3, "cuda", where=lambda s: s["size"] == "cityscapes"),),
    ),
    Family(
        "hrca_selection",
        selection_grid,
        lambda device: (OURS, "interpolate+topk"),
        build_selection,
        # CPU: the native selection >= 2x faster than interpolate + top-k at Cityscapes size.
        targets=(Target("interpolate+topk", 0.5, "cpu", where=lambda s: s["size"] == "cityscapes"),),
        modes=("fwd",),
    ),
]
