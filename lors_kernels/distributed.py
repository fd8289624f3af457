"""Data-parallel training of LORS models.

DDP needs nothing from this package, with these caveats:

- DDP takes ``module.parameters()``, which yields a shared weight once however many layers use it;
  its gradient accumulates over every use before DDP's hook on it fires, so it is all-reduced once per
  step and equals the single-process gradient (python_tests/test_distributed.py checks both).
- ``find_unused_parameters=True`` is needed only when a step skips some layers of a stack (early exit,
  stochastic depth): the shared weight still gets a gradient, the skipped layers' down/up/bias do not.
  A fixed set of skipped layers can use ``static_graph=True`` instead.
- Activation checkpointing: use ``torch.utils.checkpoint(..., use_reentrant=False)``. Reentrant
  checkpoints run each segment's backward separately, so a weight shared by several segments is marked
  ready more than once and DDP fails ("Expected to mark a variable ready only once").
- Tie weights (build the stacks, call ``lorsify``) before wrapping: DDP records the parameters at
  construction and does not see later re-tying.

FSDP2 (``torch.distributed.fsdp.fully_shard``) needs care: a unit owns the parameters of its subtree
that no inner unit owns, and a SharedWeight sits in the subtree of every layer that uses it. Wrapping
those layers, or the blocks that hold them, one by one hands the shared weight to the first unit and
leaves the others with a tensor that is already sharded (torch 2.13 fails inside ``fully_shard``).
:func:`shard_lors_model` makes each stack one unit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from torch import nn

from .convert import SupportsLorsStacks
from .static import shared_stacks

__all__ = ["shard_lors_model"]

UnitSpec = None | str | type | Callable[[str, nn.Module], bool] | Collection[str | type]


def _is_unit(units: UnitSpec, name: str, module: nn.Module) -> bool:
    """units: a module name, a class, fn(name, module) -> bool, or a collection of names and classes."""
    if units is None:
        return False
    if isinstance(units, (str, type)):
        units = [units]
    elif callable(units):
        return bool(units(name, module))
    return any(name == u if isinstance(u, str) else isinstance(module, u) for u in units)


def _is_sharded(module: nn.Module) -> bool:
    """Already a unit, or every parameter it holds taken by inner units (then wrapping it adds nothing)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(module, FSDPModule) or all(isinstance(p, DTensor) for p in module.parameters())


def shard_lors_model(model: nn.Module, *, units: UnitSpec = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Apply FSDP2 to ``model`` so that every shared weight is in one unit with all the layers using it.

    1. Each LORS^T stack (the LorsLinear layers sharing one SharedWeight, wherever they sit) becomes one
       unit, ``fully_shard([layer_0, ..., layer_L-1])``: its shared weight and private pairs are gathered
       once, before the first of its layers runs, and reduce-scattered once after the backward.
    2. Each module holding a LORS^A stack (LorsAdaptiveMixing, LorsWeightGenerator) becomes a unit.
    3. ``units`` (a module name, a class, a collection of names and classes, or ``fn(name, module) ->
       bool``; e.g. the transformer blocks) become units, innermost first; each takes the parameters
       the stacks left, and one with no parameters left (or none at all) is skipped.
    4. ``model`` itself becomes the root unit (unless it is one already, e.g. a single stack).

    ``fully_shard_kwargs`` (mesh, reshard_after_forward, mp_policy, offload_policy) go to every call.
    Call it after ``torch.distributed`` is initialized and before building the optimizer. Returns model.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for _, layers in shared_stacks(model):
        fully_shard([layer for _, layer in layers], **fully_shard_kwargs)
    picked = [
        (name, module)
        for name, module in model.named_modules()
        if module is not model and (isinstance(module, SupportsLorsStacks) or _is_unit(units, name, module))
    ]
    for _, module in sorted(picked, key=lambda item: -item[0].count(".")):
        if not _is_sharded(module):
            fully_shard(module, **fully_shard_kwargs)
    if not isinstance(model, FSDPModule):
        fully_shard(model, **fully_shard_kwargs)
    return model
