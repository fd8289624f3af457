"""HighResCrossAttention: FASeg's high-resolution cross-attention layer as a drop-in module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import op
from .reference import window_size


class HighResCrossAttention(nn.Module):
    """Object queries attend to a high-resolution map only where low-resolution attention looked.

    mode="window" (FASeg's released code): the n_low // ratio best low-resolution cells, by scores summed
    over queries, each expanded to its ws x ws window. mode="bilinear" (the thesis): the same number of
    pixels, (n_low // ratio) * ws^2, from the bilinearly upsampled scores, shared per image or
    `per_query`. Projections have nn.MultiheadAttention's names (in_proj_weight, in_proj_bias,
    out_proj), so its state_dict loads as is.

    A shared set projects K/V at the selected positions only (S rows instead of L_high) and attends
    densely over them with SDPA; per-query sets project the whole map and use the sparse kernels.
    """

    def __init__(self, embed_dim: int, num_heads: int, mode: str = "window", ratio: int = 32,
                 per_query: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if mode not in ("window", "bilinear"):
            raise ValueError(f"HighResCrossAttention: mode must be 'window' or 'bilinear', got {mode!r}")
        if per_query and mode == "window":
            raise ValueError("HighResCrossAttention: window selection is shared by the queries of an image; "
                             "per_query needs mode='bilinear'")
        if embed_dim % num_heads:
            raise ValueError(f"HighResCrossAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.mode, self.ratio, self.per_query = embed_dim, num_heads, mode, ratio, per_query
        factory = dict(device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialization."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mode={self.mode!r}, ratio={self.ratio}, "
                f"per_query={self.per_query}")

    def select(self, low_scores: Tensor, low_hw, high_hw) -> Tensor:
        """Indices into the flattened high-resolution map: [B, S] shared, or [B, N, S] per query."""
        cells = max(1, low_scores.shape[-1] // self.ratio)
        if self.mode == "window":
            return op.select_windows(low_scores, low_hw, high_hw, cells)
        pixels = cells * window_size(low_hw, high_hw) ** 2
        return op.select_topk_pixels(low_scores, low_hw, high_hw, pixels, per_query=self.per_query)

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, H, T, D]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, query: Tensor, memory: Tensor, pos: Tensor | None, query_pos: Tensor | None,
                low_scores: Tensor, low_hw, high_hw) -> Tensor:
        """query [B, N, C], memory/pos [B, L_high, C], query_pos [B, N, C], low_scores [B, N, n_low]
        (head-averaged attention of the last low-resolution layer) -> [B, N, C]."""
        if memory.shape[1] != high_hw[0] * high_hw[1]:
            raise ValueError(f"HighResCrossAttention: memory has {memory.shape[1]} positions, high_hw {tuple(high_hw)} "
                             f"makes {high_hw[0] * high_hw[1]}")
        index = self.select(low_scores, low_hw, high_hw)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q = self._heads(F.linear(query if query_pos is None else query + query_pos, w_q, b_q))
        if index.dim() == 2:  # shared: only the S selected rows are projected
            rows = index[:, :, None].expand(-1, -1, memory.shape[-1])
            memory = memory.gather(1, rows)
            keys = memory if pos is None else memory + pos.gather(1, rows)
            k, v = self._heads(F.linear(keys, w_k, b_k)), self._heads(F.linear(memory, w_v, b_v))
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            keys = memory if pos is None else memory + pos
            k, v = self._heads(F.linear(keys, w_k, b_k)), self._heads(F.linear(memory, w_v, b_v))
            out = op.sparse_cross_attention(q, k, v, index)
        return self.out_proj(out.transpose(1, 2).flatten(2))
