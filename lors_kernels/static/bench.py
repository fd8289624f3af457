"""Static LORS benchmarks (the op lors_linear): ours against dense F.linear (the floor), PEFT-style eager and
materialize-then-linear, forward and forward+backward; rows at different layers of a stack (index=) against
PEFT's mixed-adapter batch, a loop over the layers, the dense GEMM alone and the dense GEMM followed by
per-row shrink/expand products (multi-LoRA serving's layout)."""

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


def indexed_grid(device: str, quick: bool) -> list[dict]:
    """{rows, layers, in=out, R}: decode batches spread evenly over the layers (8 layers, 4 rows each first)."""
    if device == "cuda":
        shapes = [(32, 8, 4096, 16), (256, 8, 4096, 64), (4096, 8, 4096, 16)]
        shapes = shapes[:1] if quick else shapes
    else:
        shapes = [(32, 8, 1024, 16)] if quick else [(32, 8, 1024, 16), (8, 8, 1024, 16), (256, 8, 1024, 64)]
    return [{"rows": m, "layers": n, "in=out": d, "R": r} for m, n, d, r in shapes]


def indexed_providers(
    x: Tensor | None,
    weight: Tensor | None,
    down: Tensor | None,
    up: Tensor | None,
    bias: Tensor | None,
    index: Tensor | None,
    scaling: float = 1.0,
) -> dict[str, Callable[[], Tensor]]:
    import lors_kernels as lk

    def peft_mixed_batch():
        # PEFT's LoRA Linear._mixed_batch_forward: the base layer, then each adapter on its rows.
        y = F.linear(x, weight, bias)
        for i in range(down.shape[0]):
            rows = (index == i).nonzero().flatten()
            y[rows] += F.linear(F.linear(x[rows], down[i]), up[i]) * scaling
        return y

    def layer_loop():
        # Each layer's rows through their own lors_linear (what a loop over LorsLinear layers does).
        y = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
        for i in range(down.shape[0]):
            rows = (index == i).nonzero().flatten()
            y = y.index_put((rows,), lk.lors_linear(x[rows], weight, down[i], up[i], bias, scaling=scaling))
        return y

    def gathered_shrink_expand():
        # The dense GEMM, then the low-rank product per row from its gathered pair: two more launches.
        t = torch.bmm(x[:, None], down[index].transpose(1, 2))
        return torch.baddbmm(F.linear(x, weight, bias)[:, None], t, up[index].transpose(1, 2), alpha=scaling)[:, 0]

    return {
        OURS: lambda: lk.lors_linear(x, weight, down, up, bias, scaling=scaling, index=index),
        "peft mixed batch": peft_mixed_batch,
        "layer loop": layer_loop,
        "dense F.linear": lambda: F.linear(x, weight, bias),
        "gathered shrink/expand": gathered_shrink_expand,
    }


def indexed_build(device: str, dtype: torch.dtype, shape: dict, mode: str) -> dict:
    m, layers, d, r = shape["rows"], shape["layers"], shape["in=out"], shape["R"]
    rand = seeded_randn(device, dtype)
    x, weight = rand(m, d), rand(d, d, std=d**-0.5)
    down, up, bias = rand(layers, r, d, std=d**-0.5), rand(layers, d, r, std=r**-0.5), rand(d)
    index = (torch.arange(m) % layers).to(device)  # the same number of rows at every layer
    if mode == "fwd":
        return indexed_providers(x, weight, down, up, bias, index)
    leaves = [t.requires_grad_() for t in (x, weight, down, up, bias)]
    dense = [x, weight, bias]
    return forward_backward(
        indexed_providers(*leaves, index),
        leaves,
        rand(m, d),
        lambda name: dense if name == "dense F.linear" else leaves,
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
    ),
    Family(
        "static_indexed",
        indexed_grid,
        lambda device: tuple(indexed_providers(*[None] * 6)),
        indexed_build,
        targets=(
            # CPU decode, 8 layers of 4 rows, in = out = 1024, R = 16: >= 3x faster than PEFT's mixed batch,
            # >= 1.5x faster than the loop over layers, within 1.25x of the dense GEMM alone.
            Target("peft mixed batch", 1 / 3, "cpu", ("fwd",), lambda s: s["rows"] == 32),
            Target("layer loop", 1 / 1.5, "cpu", ("fwd",), lambda s: s["rows"] == 32),
            Target("dense F.linear", 1.25, "cpu", ("fwd",), lambda s: s["rows"] == 32),
            # GPU bf16, 8 layers, rank <= 64: within 1.1x of the dense GEMM alone, faster than the dense GEMM
            # followed by separate shrink/expand launches.
            Target("dense F.linear", 1.1, "cuda", ("fwd",)),
            Target("gathered shrink/expand", 1.0, "cuda", ("fwd",)),
        ),
    ),
]
