"""lors_kernels: fused kernels for LORS networks (the public API: docs/design.md, "Public API").

Importing the package is cheap: the API (and torch with it) loads on first use of any public name,
all at once, so that every op is registered with torch.library from then on. With torch already
imported (the usual order) it loads right away. Tools that need no torch, such as
``python -m lors_kernels.report``, therefore never import it.
"""

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {
    "AdaptiveMixing": "adaptive",
    "LorsAdaptiveMixing": "adaptive",
    "LorsWeightGenerator": "adaptive",
    "adaptive_mixing": "adaptive",
    "generate_mixing_weights": "adaptive",
    "set_backend": "backend",
    "count_parameters": "convert",
    "lorsify": "convert",
    "to_dense": "convert",
    "HighResCrossAttention": "hrca",
    "select_topk_pixels": "hrca",
    "select_windows": "hrca",
    "sparse_cross_attention": "hrca",
    "LorsLinear": "static",
    "SharedWeight": "static",
    "lors_linear": "static",
    "make_lors_stack": "static",
    "stack_linear": "static",
}
__all__ = sorted(_API)


def _load() -> None:
    for name, module in _API.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name):
    if name in _API:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


if sys.modules.get("torch") is not None:
    _load()

from . import hf  # noqa: E402  (stdlib only: registers the "lors" checkpoints with transformers when it loads)

hf.install()
