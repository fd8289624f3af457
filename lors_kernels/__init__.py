"""lors_kernels: fused kernels for LORS networks (see DESIGN.md §2 for the API)."""

from .adaptive import AdaptiveMixing, LorsAdaptiveMixing, LorsWeightGenerator, adaptive_mixing, generate_mixing_weights
from .backend import set_backend
from .convert import count_parameters, lorsify
from .hrca import HighResCrossAttention, select_topk_pixels, select_windows, sparse_cross_attention
from .lors_linear import LorsLinear, SharedWeight, lors_linear, make_lors_stack

__version__ = "0.1.0"

__all__ = ["AdaptiveMixing", "HighResCrossAttention", "LorsAdaptiveMixing", "LorsLinear", "LorsWeightGenerator",
           "SharedWeight", "adaptive_mixing", "count_parameters", "generate_mixing_weights", "lors_linear", "lorsify",
           "make_lors_stack", "select_topk_pixels", "select_windows", "set_backend", "sparse_cross_attention"]
