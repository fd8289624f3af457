"""Adaptive mixing (AdaMixer) and adaptive LORS (LORS^A): per-query generated weights, fused mixing."""

from .module import AdaptiveMixing, LorsAdaptiveMixing
from .op import adaptive_mixing, generate_mixing_weights

__all__ = ["AdaptiveMixing", "LorsAdaptiveMixing", "adaptive_mixing", "generate_mixing_weights"]
