"""Pure-PyTorch static LORS: the test oracle and the CPU fallback.

    y = x @ W^T + scaling * (x @ down^T) @ up^T + bias

Factored: the effective weight W + scaling * up @ down is only built when that costs fewer FLOPs
than the two thin matmuls (large M), never for small M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def materialize_is_cheaper(m: int, n: int, k: int, r: int) -> bool:
    """Building W_eff costs n*r*k (+ n*k adds); the factored path costs m*r*(k + n)."""
    return r > 0 and m * (k + n) > n * k + n * k // max(r, 1)


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear, but for inputs of more than two dims never a view: F.linear with a bias returns a view
    of its [M, out] GEMM there, and FSDP2 warns of views a module returns."""
    if x.dim() <= 2 or bias is None:
        return F.linear(x, weight, bias)
    return (x @ weight.t()).add_(bias)


def lors_linear(
    x: Tensor, weight: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None, scaling: float = 1.0
) -> Tensor:
    r = down.shape[0]
    if r == 0 and not (torch.is_grad_enabled() and (down.requires_grad or up.requires_grad)):
        return dense_linear(x, weight, bias)  # recorded, the general path gives down and up their (empty) gradients
    m = math.prod(x.shape[:-1])
    if materialize_is_cheaper(m, weight.shape[0], weight.shape[1], r):
        return dense_linear(x, torch.addmm(weight, up, down, alpha=scaling), bias)
    # As eager code at its best writes it: the GEMM, then the low-rank term and the bias added in place,
    # through a [M, out] view of y. y itself is no view (matmul folds the leading dims without one, where
    # F.linear with a bias returns a view): FSDP2 warns of views a module returns.
    y = x @ weight.t()
    rows = y.view(m, weight.shape[0]).addmm_(x.reshape(m, x.shape[-1]) @ down.t(), up.t(), alpha=scaling)
    if bias is not None:
        rows.add_(bias)
    return y


def lors_linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, down: Tensor, up: Tensor, scaling: float, has_bias: bool, needs_x: bool
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor | None]:
    """Every gradient of :func:`lors_linear` from the formulas; grad [M, N] and x [M, K].

    dx = g W + s (g up) down,  dW = g^T x,  dup = s g^T (x down^T),  ddown = s (g up)^T x,  db = sum g.
    Returns (dx or None, dweight, ddown, dup, dbias or None).
    """
    t = x @ down.t()  # [M, R]
    gu = grad @ up  # [M, R]
    dx = grad @ weight + scaling * (gu @ down) if needs_x else None
    dweight = grad.t() @ x
    dup = scaling * (grad.t() @ t)
    ddown = scaling * (gu.t() @ x)
    dbias = grad.sum(0) if has_bias else None
    return dx, dweight, ddown, dup, dbias
