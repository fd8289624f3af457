"""High-resolution cross-attention (FASeg's HRCA): top-k selection and sparse cross-attention."""

from .module import HighResCrossAttention
from .op import select_topk_pixels, select_windows, sparse_cross_attention

__all__ = ["HighResCrossAttention", "select_topk_pixels", "select_windows", "sparse_cross_attention"]
