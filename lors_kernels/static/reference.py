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


# ------------------------------------------------------------------------------------------ indexed
# Rows at different layers of one stack: down [L, R, K], up [L, N, R], scaling [L], index [M]
# in [-1, L) (-1: the shared weight alone), ranks [L] in [0, R] or None (all R), bias [N] (every row) or
# [L, N] (rows of its layer). Row m of layer i = index[m], rank r = ranks[i]:
#     y_m = x_m W^T + scaling[i] * (x_m down_i[:r]^T) up_i[:, :r]^T + bias[i]


def segments(index: Tensor, layers: int) -> tuple[Tensor, list[Tensor]]:
    """(the rows sorted by layer, stably; each layer's rows in that order): rows at -1 in no segment. The
    sizes are read on the host (one sync): the reference runs one product per segment."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=layers + 1).tolist()
    return order, list(order.split(counts))[1:]


def _rank(ranks: list[int] | None, down: Tensor, layer: int) -> int:
    return down.shape[1] if ranks is None else ranks[layer]


def _unsort(order: Tensor, sorted_rows: Tensor) -> Tensor:
    """Rows given in `order` back to their places: a gather, deterministic on every device."""
    return sorted_rows[torch.argsort(order)]


def lors_linear_indexed(
    x: Tensor,
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    scaling: Tensor,
    index: Tensor,
    ranks: Tensor | None,
) -> Tensor:
    """x [..., K], index x's leading shape -> [..., N]: one GEMM with the shared weight for every row, then
    each layer's low-rank product on its own rows (sorted by layer) and the rows put back in place."""
    k, n, layers = x.shape[-1], weight.shape[0], down.shape[0]
    m = math.prod(x.shape[:-1])
    rows, index = x.reshape(m, k), index.reshape(m)
    if torch.compiler.is_exporting():
        return _masked(rows, weight, down, up, bias, scaling, index, ranks).reshape(*x.shape[:-1], n)
    ranks = None if ranks is None else ranks.tolist()
    order, segs = segments(index, layers)
    parts = [rows.new_zeros(m - sum(len(s) for s in segs), n)]  # rows at -1: no private part
    for layer, seg in enumerate(segs):
        r = _rank(ranks, down, layer)
        part = (rows[seg] @ down[layer, :r].t()) * scaling[layer] @ up[layer, :, :r].t()
        if bias is not None and bias.dim() == 2:
            part = part + bias[layer]
        parts.append(part)
    y = rows @ weight.t() + _unsort(order, torch.cat(parts))
    if bias is not None and bias.dim() == 1:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def _masked(
    x: Tensor,
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    scaling: Tensor,
    index: Tensor,
    ranks: Tensor | None,
) -> Tensor:
    """The same rows with no size read from the data, for exported programs (torch.export cannot follow
    a segment's length): every layer's shrink on every row, each row keeping its own layer's columns
    (below its rank), then one product with every layer's up. L times the low-rank FLOPs; a NaN or inf
    in one layer's up reaches the other layers' rows (0 * inf), which the segment path never lets."""
    layers, r = down.shape[:2]
    own = index[:, None] == torch.arange(layers, device=x.device)  # [M, L]
    keep = own[:, :, None]
    if ranks is not None:
        keep = keep & (torch.arange(r, device=x.device) < ranks[:, None])
    t = (x @ down.reshape(layers * r, -1).t()).view(-1, layers, r)
    t = torch.where(keep, t * scaling[:, None].to(x.dtype), 0)
    y = x @ weight.t() + t.reshape(-1, layers * r) @ up.transpose(1, 2).reshape(layers * r, -1)
    if bias is not None:
        y = y + (bias if bias.dim() == 1 else own.to(x.dtype) @ bias)
    return y


def lors_linear_indexed_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    scaling: Tensor,
    index: Tensor,
    ranks: Tensor | None,
    needs_x: bool,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Every gradient of :func:`lors_linear_indexed` from the formulas, segment by segment; grad [M, N], x
    [M, K], index [M]. With t = x down_i^T and g_up = grad up_i on the rows of layer i:
    dx = grad W + s_i g_up down_i,  dW = grad^T x,  dup_i = s_i grad^T t,  ddown_i = s_i g_up^T x,
    dscaling_i = sum(g_up * t),  dbias = sum of grad (over layer i's rows for a bias [L, N]).
    Returns (dx or None, dweight, ddown, dup, dbias or None, dscaling); layers without rows get zeros."""
    layers = down.shape[0]
    ranks = None if ranks is None else ranks.tolist()
    order, segs = segments(index, layers)
    ddown, dup = torch.zeros_like(down), torch.zeros_like(up)
    dscaling = torch.zeros_like(scaling)
    wide = torch.promote_types(x.dtype, scaling.dtype)
    dbias = None if bias is None else grad.sum(0) if bias.dim() == 1 else torch.zeros_like(bias)
    parts = [x.new_zeros(x.shape[0] - sum(len(s) for s in segs), x.shape[1])]  # dx's low-rank part by segment
    for layer, seg in enumerate(segs):
        r = _rank(ranks, down, layer)
        xs, gs = x[seg], grad[seg]
        d, u, s = down[layer, :r], up[layer, :, :r], scaling[layer]
        t, g_up = xs @ d.t(), gs @ u
        dscaling[layer] = (g_up.to(wide) * t.to(wide)).sum()
        dup[layer, :, :r] = (gs.t() @ t) * s
        ddown[layer, :r] = (g_up.t() @ xs) * s
        if needs_x:
            parts.append(g_up * s @ d)
        if bias is not None and bias.dim() == 2:
            dbias[layer] = gs.sum(0)
    dx = grad @ weight + _unsort(order, torch.cat(parts)) if needs_x else None
    return dx, grad.t() @ x, ddown, dup, dbias, dscaling
