"""Dense models to LORS and back to checkpoints: conversion (``lorsify``), distillation (``distill``),
parameter accounting (``count_parameters``), the structure record (``lors_structure``,
``restore_lors``) and the way back (``to_dense``)."""

from .accounting import ParameterCount, StackCount, SupportsLorsStacks, count_parameters
from .conversion import StackReport, lorsify, rank_for_ratio
from .distillation import distill
from .modules import replace_modules
from .structure import lors_structure, restore_lors, to_dense

__all__ = [
    "ParameterCount",
    "StackCount",
    "StackReport",
    "SupportsLorsStacks",
    "count_parameters",
    "distill",
    "lors_structure",
    "lorsify",
    "rank_for_ratio",
    "replace_modules",
    "restore_lors",
    "to_dense",
]
