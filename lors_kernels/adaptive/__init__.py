"""Adaptive mixing (AdaMixer) and adaptive LORS (LORS^A): per-query generated weights, fused mixing."""

from .module import AdaptiveMixing, LorsAdaptiveMixing, LorsWeightGenerator
from .op import adaptive_mixing, generate_mixing_weights

__all__ = ["AdaptiveMixing", "LorsAdaptiveMixing", "LorsWeightGenerator", "adaptive_mixing", "generate_mixing_weights"]
