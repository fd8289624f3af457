"""lors_kernels: fused kernels for LORS networks (see DESIGN.md §2 for the API)."""

from .adaptive import AdaptiveMixing, LorsAdaptiveMixing, adaptive_mixing, generate_mixing_weights
from .backend import set_backend
from .hrca import HighResCrossAttention, select_topk_pixels, select_windows, sparse_cross_attention
from .lors_linear import LorsLinear, SharedWeight, lors_linear, make_lors_stack

__version__ = "0.1.0"

__all__ = ["AdaptiveMixing", "HighResCrossAttention", "LorsAdaptiveMixing", "LorsLinear", "SharedWeight",
           "adaptive_mixing", "generate_mixing_weights", "lors_linear", "make_lors_stack", "select_topk_pixels",
           "select_windows", "set_backend", "sparse_cross_attention"]
