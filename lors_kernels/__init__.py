"""lors_kernels: fused kernels for LORS networks (see DESIGN.md §2 for the API)."""

from .adaptive import AdaptiveMixing, LorsAdaptiveMixing, adaptive_mixing, generate_mixing_weights
from .backend import set_backend
from .lors_linear import LorsLinear, SharedWeight, lors_linear, make_lors_stack

__version__ = "0.1.0"

__all__ = ["AdaptiveMixing", "LorsAdaptiveMixing", "LorsLinear", "SharedWeight", "adaptive_mixing",
           "generate_mixing_weights", "lors_linear", "make_lors_stack", "set_backend"]
