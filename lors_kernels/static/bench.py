"""Static LORS benchmarks (the op lors_linear): ours against dense F.linear (the floor), PEFT-style eager and
materialize-then-linear, forward and forward+backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bench import Family, Target, forward_backward, seeded_randn
from ..report import OURS


def grid(device: str, quick: bool) -> list[dict]:
    """{M, in=out, R}. GPUs take the full grid; CPUs skip the multi-second shapes."""
    if device == "cuda":
        ms, dims, ranks = ((1, 4096), (1024, 4096), (8,)) if quick else ((1, 16, 256, 4096), (256, 1024, 4096), (8, 32))
    else:
        ms, dims, ranks = ((1, 16, 256), (256, 1024), (8,)) if quick else ((1, 16, 256), (256, 1024, 4096), (8, 32))
    return [{"M": m, "in=out": d, "R": r} for d in dims for m in ms for r in ranks]


def providers(
    x: Tensor | None,
    weight: Tensor | None,
    down: Tensor | None,
    up: Tensor | None,
    bias: Tensor | None,
    scaling: float = 1.0,
) -> dict[str, Callable[[], Tensor]]:
    import lors_kernels as lk

    return {
        OURS: lambda: lk.lors_linear(x, weight, down, up, bias, scaling=scaling),
        "dense F.linear": lambda: F.linear(x, weight, bias),
        "peft eager": lambda: F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, down), up),
        "materialize": lambda: F.linear(x, torch.addmm(weight, up, down, alpha=scaling), bias),
    }


def build(device: str, dtype: torch.dtype, shape: dict, mode: str) -> dict:
    m, d, r = shape["M"], shape["in=out"], shape["R"]
    rand = seeded_randn(device, dtype)
    inputs = [rand(m, d), rand(d, d, std=d**-0.5), rand(r, d, std=d**-0.5), rand(d, r, std=r**-0.5), rand(d)]
    if mode == "fwd":
        return providers(*inputs)
    leaves = [t.requires_grad_() for t in inputs]
    x, weight, _, _, bias = leaves
    dense_inputs = [x, weight, bias]  # dense F.linear has no down/up to differentiate
    return forward_backward(
        providers(*leaves), leaves, rand(m, d), lambda name: dense_inputs if name == "dense F.linear" else leaves
    )


FAMILIES = [
    Family(
        "static",
        grid,
        lambda device: tuple(providers(*[None] * 5)),
        build,
        targets=(
            # GPU bf16: >= 1.4x faster than PEFT eager; at M >= 4096 within 1.05x (fwd) / 1.10x (fwd+bwd) of
            # dense F.linear.
            Target("peft eager", 1 / 1.4, "cuda"),
            Target("dense F.linear", 1.05, "cuda", ("fwd",), lambda s: s["M"] >= 4096),
            Target("dense F.linear", 1.10, "cuda", ("fwd+bwd",), lambda s: s["M"] >= 4096),
            # CPU forward of small batches: >= 1.3x faster than PEFT eager at in=out=256, within 1.1x
            # of dense F.linear from 1024 on (where reading the weight dominates).
            Target("peft eager", 1 / 1.3, "cpu", ("fwd",), lambda s: s["M"] <= 16 and s["in=out"] <= 256),
            Target("dense F.linear", 1.1, "cpu", ("fwd",), lambda s: s["M"] <= 16 and s["in=out"] > 256),
        ),
    )
]
