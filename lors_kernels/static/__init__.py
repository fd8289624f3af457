"""Static LORS (LORS^T): a shared weight plus a private low-rank residual per layer."""

import sys

from . import module
from .module import LorsLinear, make_lors_stack, shared_stacks, stack_linear
from .op import lors_linear
from .shared_weight import SharedWeight

# Models that earlier releases pickled whole (torch.save(model)) name these classes by the module that
# defined them then, lors_kernels.lors_linear.module: it is this one.
sys.modules.setdefault("lors_kernels.lors_linear.module", module)

__all__ = ["LorsLinear", "SharedWeight", "lors_linear", "make_lors_stack", "shared_stacks", "stack_linear"]
