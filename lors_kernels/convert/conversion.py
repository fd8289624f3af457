"""Dense stacks to LORS, by truncated SVD or feature PCA.

``lorsify`` replaces the ``nn.Linear`` layers that a glob pattern names by ``LorsLinear`` layers sharing
one ``SharedWeight`` (the mean of their weights), each keeping the best rank-R approximation of its
residual ``W_l - W_shared``: of the weight (``method="svd"``), or of the features the residual adds to
the layer's outputs on calibration inputs (``method="pca"``, Atomic Feature Mimicking).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from .. import hf
from ..static import LorsLinear, SharedWeight
from .accounting import _numel
from .calibration import _batches, _calibrate
from .modules import _glob, replace_modules
from .structure import lors_structure

__all__ = ["StackReport", "lorsify", "rank_for_ratio"]


def rank_for_ratio(in_features: int, out_features: int, kappa: float) -> int:
    """The private rank that makes a layer's pair ``kappa`` times smaller than its dense weight (PELA's
    rule): R = floor(in * out / (kappa * (in + out)))."""
    if not kappa > 0:
        raise ValueError(f"rank_for_ratio: the compression ratio kappa must be > 0, got {kappa}")
    # Exact rational arithmetic (kappa as written: 1.1 is 11/10), so exact quotients do not round down.
    kappa = Fraction(str(kappa)) if isinstance(kappa, float) else Fraction(kappa)
    return math.floor(Fraction(in_features * out_features) / (kappa * (in_features + out_features)))


@dataclass
class StackReport:
    """What ``lorsify`` did to the layers one pattern matched. Errors are relative Frobenius norms:
    ``weight_error[l] = |W_l - W_eff| / |W_l|``; with calibration data, ``output_error[l] = |y_lors - y| / |y|``
    over the layer's inputs in the dense model (nan for a layer the calibration never ran). ``saves``:
    the LORS stack has fewer parameters than the dense one. With ``kappa`` it always does when
    kappa > L / (L - 1); below that, the rank's rounding down can still make it save."""

    pattern: str
    layers: list[str]
    in_features: int
    out_features: int
    ranks: list[int]
    method: str
    params_before: int
    params_after: int
    weight_error: list[float]
    output_error: list[float] | None = None
    kappa: float | None = None

    @property
    def saves(self) -> bool:
        return self.params_after < self.params_before

    def warning(self) -> str | None:
        """What to say when the conversion saved no parameter, else None."""
        if self.saves:
            return None
        n = len(self.layers)
        why = ""
        if self.kappa is not None:  # shared (1 dense weight) + n pairs of at most 1/kappa each vs n dense
            # weights: saving nothing implies kappa <= n / (n - 1) (not the converse: the rank is rounded down)
            limit = "inf" if n == 1 else f"{n / (n - 1):.4g}"
            why = f": kappa = {self.kappa} <= L / (L - 1) = {limit} for L = {n} layers"
        return (
            f"{self.pattern}: the LORS stack is no smaller than the dense one ({self.params_after:,} >= "
            f"{self.params_before:,} parameters){why}"
        )

    def __str__(self) -> str:
        rows = [
            f"{self.pattern}: {len(self.layers)} x Linear({self.in_features}, {self.out_features}) -> LORS "
            f"({self.method}), parameters {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(self.params_before, 1):.1%})"
        ]
        if not self.saves:
            rows.append(f"  warning: {self.warning()}")
        for i, name in enumerate(self.layers):
            out = "" if self.output_error is None else f"  output error {self.output_error[i]:.2e}"
            rows.append(f"  {name:<36} rank {self.ranks[i]:>4}  weight error {self.weight_error[i]:.2e}{out}")
        return "\n".join(rows)


def _residual(linear: nn.Linear, shared: SharedWeight) -> Tensor:
    return linear.weight.detach().double() - shared.weight.detach().double()


class _ResidualFeatures:
    """Running moments of the features a layer's residual adds, z = x (W_l - W_shared)^T, over its
    calibration inputs, kept in the smaller of the layer's two spaces (inputs x when in <= out, else
    z itself): float64 sums of u and u u^T, min(in, out)^2 numbers per layer."""

    def __init__(self, linear: nn.Linear, shared: SharedWeight):
        self.linear, self.shared = linear, shared
        out, inp = linear.weight.shape
        self.project = out < inp  # u = z (each batch projected) or u = x
        d = min(out, inp)
        self.n = 0
        self.sum = torch.zeros(d, dtype=torch.float64, device=linear.weight.device)
        self.outer = torch.zeros(d, d, dtype=torch.float64, device=linear.weight.device)

    def add(self, x: Tensor) -> None:
        u = x.detach().reshape(-1, x.shape[-1]).double()
        if self.project:
            u = u @ _residual(self.linear, self.shared).t()
        self.n += u.shape[0]
        self.sum += u.sum(0)
        self.outer += u.t() @ u

    def principal(self, centered: bool) -> tuple[Tensor, Tensor]:
        """(U, mean): the principal directions of z, best first, as columns of U [out, d], and z's mean.
        Centered (the mean goes to the bias), or of the second moment when there is no bias to take it."""
        if self.n == 0:
            raise RuntimeError(
                "lorsify: a matched layer never ran on the calibration data (is it called through "
                "its forward? nn.MultiheadAttention, for one, reads out_proj.weight directly)"
            )
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean) if centered else self.outer) / self.n
        evals, evecs = torch.linalg.eigh(cov)
        factor = evecs * evals.clamp_min(0).sqrt()  # cov(u) = factor factor^T
        if not self.project:  # cov(z) = R cov(x) R^T = (R factor)(R factor)^T
            residual = _residual(self.linear, self.shared)
            factor, mean = residual @ factor, residual @ mean
        u, _, _ = torch.linalg.svd(factor, full_matrices=False)
        return u, mean


def _matches(model: nn.Module, pattern: str) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear layers whose name (any of their names, when a module is reachable by several)
    matches: each once, under its first name."""
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and _glob(n, pattern)]
    unique = {}
    for n, m in named:
        if isinstance(m, nn.Linear):
            unique.setdefault(id(m), (n, m))
    order = _first_name(model)
    linears = sorted(unique.values(), key=lambda item: order[id(item[1])])
    if not linears:
        known = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        seen = f"; it matches {', '.join(n for n, _ in named[:4])} (not nn.Linear)" if named else ""
        raise ValueError(
            f"lorsify: pattern {pattern!r} matches no nn.Linear{seen}. Linear layers: "
            + (", ".join(known[:8]) + (", ..." if len(known) > 8 else "") if known else "none")
        )
    shapes = {}
    for n, m in linears:
        shapes.setdefault((tuple(m.weight.shape), m.weight.dtype, m.weight.device), []).append(n)
    if len(shapes) > 1:
        raise ValueError(
            f"lorsify: pattern {pattern!r} matches layers of different weights; one shared weight "
            "needs one shape, dtype and device: "
            + "; ".join(f"[{o}, {i}] {d} {dev}: {', '.join(ns)}" for ((o, i), d, dev), ns in shapes.items())
        )
    return linears


def _first_name(model: nn.Module) -> dict[int, int]:
    """Module order: each module's position in named_modules() (its first name)."""
    return {id(m): i for i, (_, m) in enumerate(model.named_modules())}


def _per_layer(value, n: int, what: str) -> list[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or any(not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"lorsify: {what} must be an int >= 0 or one per matched layer ({n}), got {value!r}")
    return values


def lorsify(
    model: nn.Module,
    targets: str | Sequence[str],
    rank: int | None = None,
    groups: int | Sequence[int] = 1,
    method: str = "svd",
    calibration: Any = None,
    *,
    kappa: float | None = None,
    scaling: float = 1.0,
) -> dict[str, StackReport]:
    """Turn the ``nn.Linear`` stacks of ``model`` that ``targets`` name into LORS stacks, in place.

    targets: glob patterns over module names (``*`` within a name component, ``**`` across them), one
        shared weight per pattern; every nn.Linear a pattern matches must have one shape.
    rank, groups: each layer gets ``groups`` private pairs of rank ``rank`` (one pair of rank
        rank*groups); either may list one value per matched layer. Or give ``kappa`` instead of
        ``rank``: rank = rank_for_ratio(in, out, kappa) // groups. rank*groups may not exceed
        min(in, out) (the pair would outgrow the dense weight for nothing).
    method: ``"svd"``, the truncated SVD of W_l - W_shared; ``"pca"``, the principal components U_k of
        the residual features z = x (W_l - W_shared)^T on the calibration inputs: up = U_k,
        down = U_k^T (W_l - W_shared), bias += (I - U_k U_k^T) mean(z) (layers without bias keep none).
    calibration: model inputs: one batch (a Tensor, a tuple of positional args, a Mapping of keyword
        args) or an iterable of batches (a list, a DataLoader, a generator: it is read once and kept). A
        DataLoader of (input, label) pairs would pass the label too: give ``(x for x, _ in loader)``.
        Required by ``"pca"``; with it, the report has each layer's relative output error.
    scaling: the LorsLinear layers' scaling (non-zero); requires_grad is carried over from each layer.

    Returns {pattern: StackReport}. The model's function is kept exactly when every residual's rank
    fits (and, for "pca", when the calibration inputs span the layer's input space). A stack that saves
    no parameter is warned about. A Hugging Face model's config gets the stacks (``lors_structure``) as
    its ``quantization_config`` of method "lors", so that ``save_pretrained`` records them and
    transformers' ``from_pretrained`` rebuilds them (``lors_kernels.hf``).
    """
    if method not in ("svd", "pca"):
        raise ValueError(f"lorsify: method must be 'svd' or 'pca', got {method!r}")
    if method == "pca" and calibration is None:
        raise ValueError("lorsify: method='pca' needs calibration inputs")
    if (rank is None) == (kappa is None):
        raise ValueError("lorsify: give exactly one of rank and kappa")
    if not scaling:
        raise ValueError("lorsify: scaling must be non-zero")
    if calibration is not None:
        calibration = _batches(calibration)
        if iter(calibration) is calibration:  # a generator: it is read twice (fit, then errors)
            calibration = list(calibration)
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("lorsify: no target patterns given")
    stacks, owner = {}, {}
    for pattern in patterns:
        stacks[pattern] = _matches(model, pattern)
        for name, _ in stacks[pattern]:
            if owner.setdefault(name, pattern) != pattern:
                raise ValueError(f"lorsify: {name} is matched by two patterns, {owner[name]!r} and {pattern!r}")

    plans = []  # (pattern, [(name, linear)], shared, per-layer group counts, per-layer ranks)
    for pattern, layers in stacks.items():
        out, inp = layers[0][1].weight.shape
        group_counts = _per_layer(groups, len(layers), "groups")
        if kappa is not None:
            total = rank_for_ratio(inp, out, kappa)
            ranks = [total // g if g else 0 for g in group_counts]
        else:
            ranks = _per_layer(rank, len(layers), "rank")
        too_big = [(n, r * g) for (n, _), r, g in zip(layers, ranks, group_counts) if r * g > min(inp, out)]
        if too_big:
            raise ValueError(
                f"lorsify: pattern {pattern!r}: rank*groups {too_big[0][1]} for {too_big[0][0]} exceeds "
                f"min(in, out) = {min(inp, out)} of Linear({inp}, {out})"
            )
        weight = layers[0][1].weight
        shared = SharedWeight(inp, out, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            shared.weight.copy_(sum(linear.weight.detach().double() for _, linear in layers) / len(layers))
        shared.weight.requires_grad_(any(linear.weight.requires_grad for _, linear in layers))
        plans.append((pattern, layers, shared, group_counts, ranks))

    if method == "pca":
        features = {
            linear: _ResidualFeatures(linear, shared) for _, layers, shared, _, _ in plans for _, linear in layers
        }
        _calibrate(model, calibration, {linear: (lambda x, y, f=f: f.add(x)) for linear, f in features.items()})

    reports, replacements = {}, {}
    for pattern, layers, shared, group_counts, ranks in plans:
        errors = []
        for (name, linear), g, r in zip(layers, group_counts, ranks):
            if method == "svd":
                layer = LorsLinear.from_linear(linear, shared=shared, rank=r, groups=g, scaling=scaling)
            else:
                layer = _fit_pca(linear, shared, features[linear], r, g, scaling)
            layer.down.requires_grad_(linear.weight.requires_grad)
            layer.up.requires_grad_(linear.weight.requires_grad)
            if linear.bias is not None:
                layer.bias.requires_grad_(linear.bias.requires_grad)
            w = linear.weight.detach().double()
            errors.append(((w - layer.effective_weight().detach().double()).norm() / w.norm().clamp_min(1e-30)).item())
            replacements[name] = (linear, layer)
        before = sum(_numel(linear.parameters()) for _, linear in layers)
        after = shared.weight.numel() + sum(
            _numel(replacements[n][1].parameters()) - shared.weight.numel() for n, _ in layers
        )
        reports[pattern] = StackReport(
            pattern,
            [n for n, _ in layers],
            layers[0][1].in_features,
            layers[0][1].out_features,
            [r * g for r, g in zip(ranks, group_counts)],
            method,
            before,
            after,
            errors,
            kappa=kappa,
        )
        if not reports[pattern].saves:
            warnings.warn(reports[pattern].warning(), stacklevel=2)

    if calibration is not None:  # each new layer against the dense one, on the dense model's inputs
        sums = {name: [0, 0] for name in replacements}  # |y_lors - y|^2, |y|^2 (tensors: no sync per call)

        def compare(name):
            def hook(x, y):
                with torch.no_grad():
                    sums[name][0] = sums[name][0] + (replacements[name][1](x).double() - y.double()).square().sum()
                sums[name][1] = sums[name][1] + y.double().square().sum()

            return hook

        _calibrate(model, calibration, {linear: compare(name) for name, (linear, _) in replacements.items()})
        for report in reports.values():
            report.output_error = [
                math.sqrt(float(sums[n][0]) / float(sums[n][1])) if float(sums[n][1]) else math.nan
                for n in report.layers
            ]  # nan: the layer never ran (or only output zeros)

    replace_modules(model, {id(linear): layer for linear, layer in replacements.values()})
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):  # a Hugging Face model: save_pretrained writes it to config.json
        config.quantization_config = hf.quantization_config(lors_structure(_config_owner(model, config)))
    return reports


def _config_owner(model: nn.Module, config: Any) -> nn.Module:
    """The outermost transformers model holding ``config``, whose save_pretrained writes the weights under
    names relative to it: ``model`` itself, or the inner model of a wrapper that shows its config (a
    SentenceTransformer's ``.config`` is its transformer's)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel) and m.config is config), model)


def _fit_pca(
    linear: nn.Linear, shared: SharedWeight, features: _ResidualFeatures, rank: int, groups: int, scaling: float
) -> LorsLinear:
    """A LorsLinear on ``shared`` whose pair keeps the principal directions of the residual features."""
    weight = linear.weight
    layer = LorsLinear(
        linear.in_features,
        linear.out_features,
        rank=rank,
        groups=groups,
        bias=linear.bias is not None,
        shared=shared,
        scaling=scaling,
        device=weight.device,
        dtype=weight.dtype,
    )
    u, mean = features.principal(centered=linear.bias is not None)
    u = u[:, : rank * groups]
    keep = u.shape[1]
    with torch.no_grad():
        layer.up.zero_()
        layer.down.zero_()
        layer.up[:, :keep].copy_(u / scaling)
        layer.down[:keep].copy_(u.t() @ _residual(linear, shared))
        if linear.bias is not None:  # the mean the kept directions miss becomes bias
            layer.bias.copy_(linear.bias.double() + mean - u @ (u.t() @ mean))
    return layer
