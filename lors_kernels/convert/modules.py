"""Submodules by their dotted names: glob patterns over the names, a stack's name from its layers',
and putting a new module wherever an old one is held."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["replace_modules"]


def _glob(name: str, pattern: str) -> bool:
    """Glob over dotted module names: ``*`` (and ``?``, ``[..]``) within one name component, ``**`` any
    number of components. ``blocks.*.mlp.fc1`` matches ``blocks.3.mlp.fc1``, not ``blocks.3.x.mlp.fc1``."""

    def match(parts, pats):
        if not pats:
            return not parts
        if pats[0] == "**":
            return any(match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatchcase(parts[0], pats[0]) and match(parts[1:], pats[1:])

    return match(name.split(".") if name else [], pattern.split("."))


def _stack_name(names: Sequence[str]) -> str:
    """``blocks.*.mlp.fc1`` for ``blocks.0.mlp.fc1, blocks.1.mlp.fc1``: the components where names differ
    become ``*`` (names of different depths are joined instead)."""
    split = [n.split(".") for n in names]
    if len({len(s) for s in split}) != 1:
        return ", ".join(names)
    return ".".join(parts[0] if len(set(parts)) == 1 else "*" for parts in zip(*split))


def replace_modules(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Put ``new[id(old)]`` wherever ``model`` holds the submodule ``old``, in place, under every name it
    has (a layer also reachable as an alias is replaced there too). ``new`` is keyed by the old
    modules' ``id()``; submodules not in it stay as they are."""
    for name, old in list(model.named_modules(remove_duplicate=False)):
        if name and id(old) in new:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new[id(old)])
