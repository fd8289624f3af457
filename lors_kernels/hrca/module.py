"""HighResCrossAttention: FASeg's high-resolution cross-attention layer as a drop-in module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import op
from .reference import window_size

# What init= accepts: nn.MultiheadAttention's initialization, or FASeg's (out_proj xavier_uniform_ too).
INITS = ("default", "xavier")


class HighResCrossAttention(nn.Module):
    """Object queries attend to a high-resolution map only where low-resolution attention looked.

    mode="window" (FASeg's released code): the n_low // ratio best low-resolution cells, by scores summed
    over queries, each expanded to its ws x ws window. mode="bilinear" (the thesis): the same number of
    pixels, (n_low // ratio) * ws^2, from the bilinearly upsampled scores, shared per image or
    `per_query`. Projections have nn.MultiheadAttention's names (in_proj_weight, in_proj_bias,
    out_proj), so its state_dict loads as is.

    How FASeg's high-resolution branch (MultiScaleMaskedTransformerDecoderFASeg, every fourth layer)
    maps onto this module:

    - its attention is this module; the residual, dropout and LayerNorm around it
      (CrossAttentionLayerFASeg: ``norm(tgt + dropout(attn))``) stay outside, as they do around
      nn.MultiheadAttention. Load the layer's ``multihead_attn.state_dict()`` into this module.
    - ``low_scores`` is the attention map the first low-resolution layer of the block returned
      (FASeg's ``cg_attn``, kept at layer i % 4 == 0; nn.MultiheadAttention's head-averaged weights,
      [B, N, n_low] whatever the layout).
    - ``query_pos`` is FASeg's static query embedding (``query_embed_params``), not the dynamic
      positional queries of the other layers; ``pos`` is the high-resolution positional encoding.
    - FASeg is sequence-first ([N, B, C], memory [H*W, B, C]): pass ``batch_first=False``, or transpose.
      memory is the high-resolution map flattened row-major (``fg_src.flatten(2).permute(2, 0, 1)``);
      FASeg's window partition only reorders the keys, which attention does not see.
    - ``ratio`` is FASeg's omega_rate (32). When n_low < ratio FASeg selects no window and its attention
      over no key returns zeros: so does this module (the output is out_proj's bias).
    - Ties: FASeg sorts the cell scores with an unstable sort, so which of several equal cells it keeps
      at the k-th place is unspecified (it varies with size and device); here the lower index wins,
      which is ``torch.sort(descending=True, stable=True)``. Cells no query attended to (all-zero
      scores under Mask2Former's masks) are the usual ties.

    A shared set projects K/V at the selected positions only (S rows instead of L_high) and attends
    densely over them with SDPA; per-query sets project the whole map and use the sparse kernels.
    init="default" is nn.MultiheadAttention's (xavier_uniform_ in_proj, nn.Linear's out_proj, zero
    biases); "xavier" also gives out_proj xavier_uniform_, as FASeg's layers do.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mode: str = "window",
        ratio: int = 32,
        per_query: bool = False,
        bias: bool = True,
        batch_first: bool = True,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("window", "bilinear"):
            raise ValueError(f"HighResCrossAttention: mode must be 'window' or 'bilinear', got {mode!r}")
        if per_query and mode == "window":
            raise ValueError(
                "HighResCrossAttention: window selection is shared by the queries of an image; "
                "per_query needs mode='bilinear'"
            )
        if embed_dim % num_heads:
            raise ValueError(f"HighResCrossAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if init not in INITS:
            raise ValueError(f"HighResCrossAttention: init must be one of {INITS}, got {init!r}")
        self.embed_dim, self.num_heads, self.mode, self.ratio, self.per_query = (
            embed_dim,
            num_heads,
            mode,
            ratio,
            per_query,
        )
        self.batch_first, self.init = batch_first, init
        factory = dict(device=device, dtype=dtype)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialization, or FASeg's (init="xavier": out_proj too)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.init == "xavier":
            nn.init.xavier_uniform_(self.out_proj.weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mode={self.mode!r}, ratio={self.ratio}, "
            f"per_query={self.per_query}, batch_first={self.batch_first}"
        )

    def select(
        self, low_scores: Tensor, low_hw: tuple[int, int] | Sequence[int], high_hw: tuple[int, int] | Sequence[int]
    ) -> Tensor:
        """Indices into the flattened high-resolution map: [B, S] shared, or [B, N, S] per query; S = 0
        when n_low < ratio (FASeg then selects nothing)."""
        cells = low_scores.shape[-1] // self.ratio
        if cells == 0:
            return low_scores.new_zeros(low_scores.shape[: 2 if self.per_query else 1] + (0,), dtype=torch.long)
        if self.mode == "window":
            return op.select_windows(low_scores, low_hw, high_hw, cells)
        pixels = cells * window_size(low_hw, high_hw) ** 2
        return op.select_topk_pixels(low_scores, low_hw, high_hw, pixels, per_query=self.per_query)

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, H, T, D]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        pos: Tensor | None,
        query_pos: Tensor | None,
        low_scores: Tensor,
        low_hw: tuple[int, int] | Sequence[int],
        high_hw: tuple[int, int] | Sequence[int],
    ) -> Tensor:
        """query [B, N, C], memory/pos [B, L_high, C], query_pos [B, N, C] ([N, B, C] and [L_high, B, C]
        with batch_first=False), low_scores [B, N, n_low] (head-averaged attention of the block's first
        low-resolution layer, as FASeg keeps it) -> [B, N, C] ([N, B, C])."""
        if not self.batch_first:
            query, memory, pos, query_pos = (
                None if t is None else t.transpose(0, 1) for t in (query, memory, pos, query_pos)
            )
        if memory.shape[1] != high_hw[0] * high_hw[1]:
            raise ValueError(
                f"HighResCrossAttention: memory has {memory.shape[1]} positions, high_hw {tuple(high_hw)} "
                f"makes {high_hw[0] * high_hw[1]}"
            )
        index = self.select(low_scores, low_hw, high_hw)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q = self._heads(F.linear(query if query_pos is None else query + query_pos, w_q, b_q))
        if index.shape[-1] == 0:  # no key: attention returns zeros, as nn.MultiheadAttention over none
            out = torch.zeros_like(q)
        elif index.dim() == 2:  # shared: only the S selected rows are projected
            rows = index[:, :, None].expand(-1, -1, memory.shape[-1])
            memory = memory.gather(1, rows)
            keys = memory if pos is None else memory + pos.gather(1, rows)
            k, v = self._heads(F.linear(keys, w_k, b_k)), self._heads(F.linear(memory, w_v, b_v))
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            keys = memory if pos is None else memory + pos
            k, v = self._heads(F.linear(keys, w_k, b_k)), self._heads(F.linear(memory, w_v, b_v))
            out = op.sparse_cross_attention(q, k, v, index)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return out if self.batch_first else out.transpose(0, 1)
