"""lors_kernels: fused kernels for LORS networks (see DESIGN.md §2 for the API)."""

from .backend import set_backend
from .lors_linear import LorsLinear, SharedWeight, lors_linear, make_lors_stack

__version__ = "0.1.0"

__all__ = ["LorsLinear", "SharedWeight", "lors_linear", "make_lors_stack", "set_backend"]
