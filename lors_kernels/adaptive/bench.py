"""Adaptive mixing benchmarks: ours against the eager reference (materialized M/S, 4-D matmuls,
separate LayerNorm/ReLU) and, on GPUs, torch.compile of it, forward and forward+backward."""

from __future__ import annotations

import torch

from ..bench import Family, Target, forward_backward, seeded_randn
from ..report import OURS

# (G, P_in, C, P_out, r, K): the LORS paper's last stage (K = 3) and plain AdaMixer.
SHAPES = {"lors": (2, 64, 128, 128, 16, 3), "adamixer": (4, 32, 64, 128, 0, 0)}


def grid(device: str, quick: bool) -> list[dict]:
    """B=16 with N in {100, 300} on GPUs; CPUs take B=2, N=100."""
    if device == "cuda":
        sizes = [(name, 16, n) for name in SHAPES for n in ((100,) if quick else (100, 300))]
    else:
        sizes = [("adamixer", 1, 100), ("lors", 1, 50)] if quick else [(name, 2, 100) for name in SHAPES]
    return [
        {
            "shape": name,
            "B": b,
            "N": n,
            **dict(zip(("G", "P_in", "C", "P_out"), SHAPES[name][:4])),
            "K": SHAPES[name][5],
        }
        for name, b, n in sizes
    ]


def provider_names(device: str) -> tuple[str, ...]:
    # On CPU compiling each shape takes longer than the whole quick run.
    return (OURS, "eager") + (("torch.compile(eager)",) if device == "cuda" else ())


def build(device: str, dtype: torch.dtype, shape: dict, mode: str) -> dict:
    import lors_kernels as lk

    from .reference import adaptive_mixing

    groups, p_in, c, p_out, r, k = SHAPES[shape["shape"]]
    rand = seeded_randn(device, dtype)
    bn = shape["B"] * shape["N"]
    inputs = [
        rand(bn, groups, p_in, c),
        rand(bn, groups, c, c, std=c**-0.5),
        rand(bn, groups, p_out, p_in, std=p_in**-0.5),
    ]
    if k:
        inputs += [
            rand(groups * k, c, r, std=c**-0.5),
            rand(bn, groups * k, r, r, std=r**-0.5),
            rand(groups * k, r, c, std=r**-0.5),
            rand(groups * k, p_out, r, std=r**-0.5),
            rand(bn, groups * k, r, r, std=r**-0.5),
            rand(groups * k, r, p_in, std=p_in**-0.5),
        ]
    if mode == "fwd+bwd":
        inputs = [t.requires_grad_() for t in inputs]
    x, m, s = inputs[:3]
    channel, spatial = (tuple(inputs[3:6]), tuple(inputs[6:9])) if k else (None, None)

    def eager():
        return adaptive_mixing(x, m, s, channel, spatial)

    runs = {OURS: lambda: lk.adaptive_mixing(x, m, s, channel_private=channel, spatial_private=spatial), "eager": eager}
    if "torch.compile(eager)" in provider_names(device):
        runs["torch.compile(eager)"] = torch.compile(eager)
    return runs if mode == "fwd" else forward_backward(runs, inputs, rand(bn, groups, p_out, c))


FAMILIES = [
    Family(
        "adaptive",
        grid,
        provider_names,
        build,
        targets=(
            Target("eager", 0.5, "cuda", ("fwd+bwd",)),  # GPU bf16: fwd+bwd >= 2x eager
            Target("eager", 1 / 1.6, "cpu"),  # the native CPU kernels >= 1.6x eager on 2 cores
        ),
    )
]
