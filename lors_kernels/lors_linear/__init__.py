"""Static LORS (LORS^T): a shared weight plus a private low-rank residual per layer."""

from .module import LorsLinear, SharedWeight, make_lors_stack, shared_stacks
from .op import lors_linear

__all__ = ["LorsLinear", "SharedWeight", "lors_linear", "make_lors_stack", "shared_stacks"]
