"""Parameter accounting: a model's parameters with each shared one counted once, stack by stack."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from ..static import shared_stacks
from .modules import _stack_name

__all__ = ["ParameterCount", "StackCount", "SupportsLorsStacks", "count_parameters"]


@runtime_checkable
class SupportsLorsStacks(Protocol):
    """A module that reports the LORS stacks it holds without a SharedWeight (LORS^A: the generated
    weights of LorsAdaptiveMixing and LorsWeightGenerator). ``count_parameters`` counts each reported
    stack; ``shard_lors_model`` makes each such module one FSDP unit."""

    def lors_stacks(self) -> Sequence[tuple[str, Sequence[Tensor], Sequence[Sequence[Tensor]]]]:
        """One (label, parameters every layer uses, each layer's own parameters) per stack."""


@dataclass
class StackCount:
    """One stack: parameters every layer uses (counted once) and each layer's own."""

    name: str
    shared: int
    private: list[int]

    @property
    def layers(self) -> int:
        return len(self.private)

    @property
    def total(self) -> int:
        return self.shared + sum(self.private)

    @property
    def per_layer(self) -> float:
        """The paper's 'average parameters per layer': shared / L + mean private."""
        return self.total / max(self.layers, 1)


class ParameterCount(int):
    """The number of parameters, each counted once: an int (``int()``, arithmetic, comparisons, format
    specs such as ``f"{count:,}"``; ``f"{count}"`` is the number too) that also has ``stacks``, breaking
    the stacked ones down, and ``other``, the rest. ``table()`` is that breakdown as text, and so are
    ``str()`` and ``print()``."""

    def __new__(cls, total: int, stacks: Sequence[StackCount] = ()):
        count = super().__new__(cls, total)
        count.stacks = list(stacks)
        return count

    def __getnewargs__(self):
        return int(self), self.stacks

    @property
    def total(self) -> int:
        return int(self)

    @property
    def other(self) -> int:
        return self.total - sum(s.total for s in self.stacks)

    def __repr__(self) -> str:
        return f"ParameterCount({self.total}, stacks={self.stacks!r})"

    def table(self) -> str:
        """One row per stack (layers, shared, private, average per layer), then the total."""
        rows = [f"{'stack':<40} {'layers':>6} {'shared':>12} {'private':>12} {'per layer':>12}"]
        rows += [
            f"{s.name:<40} {s.layers:>6} {s.shared:>12,} {sum(s.private):>12,} {s.per_layer:>12,.0f}"
            for s in self.stacks
        ]
        rows.append(f"total {self.total:,} parameters ({self.other:,} outside stacks)")
        return "\n".join(rows)

    __str__ = table

    def __format__(self, spec: str) -> str:  # int's: "" would fall back to str(), the table
        return format(int(self), spec)


def _numel(params: Iterable[Tensor]) -> int:
    return sum(p.numel() for p in params)


def count_parameters(module: nn.Module) -> ParameterCount:
    """Parameters of ``module`` with every shared tensor counted once, and per-stack averages.

    Stacks are the LorsLinear layers that use one SharedWeight (shared: its weight; private: each
    layer's down, up, bias) and whatever a module reports through ``lors_stacks()`` (``SupportsLorsStacks``:
    LorsAdaptiveMixing's generator and per-stage cores, LorsWeightGenerator's).
    """
    stacks = []
    for shared, layers in shared_stacks(module):
        private = [[p for n, p in layer.named_parameters() if not n.startswith("shared.")] for _, layer in layers]
        stacks.append((_stack_name([n for n, _ in layers]), [shared.weight], private))
    for name, sub in module.named_modules():
        if isinstance(sub, SupportsLorsStacks):
            stacks += [
                (f"{name}.{label}" if name else label, shared, private) for label, shared, private in sub.lors_stacks()
            ]
    counts, owner = [], {}  # owner: id(tensor) -> the stack counting it
    for i, (name, shared, private) in enumerate(stacks):
        sizes = []
        for params in (shared, *private):  # a tensor counts where it first appears (a bias shared by layers)
            clash = [stacks[owner[id(p)]][0] for p in params if owner.get(id(p), i) != i]
            if clash:  # one tensor in two stacks would be counted twice
                raise ValueError(f"count_parameters: a parameter belongs to two stacks, {clash[0]} and {name}")
            fresh = {id(p): p for p in params if id(p) not in owner}
            owner.update(dict.fromkeys(fresh, i))
            sizes.append(_numel(fresh.values()))
        counts.append(StackCount(name, sizes[0], sizes[1:]))
    return ParameterCount(_numel(module.parameters()), counts)
