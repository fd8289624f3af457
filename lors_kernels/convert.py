"""Dense stacks to LORS (truncated SVD or feature PCA) and parameter accounting.

``lorsify`` replaces the ``nn.Linear`` layers that a glob pattern names by ``LorsLinear`` layers sharing
one ``SharedWeight`` (the mean of their weights), each keeping the best rank-R approximation of its
residual ``W_l - W_shared``: of the weight (``method="svd"``), or of the features the residual adds to
the layer's outputs on calibration inputs (``method="pca"``, Atomic Feature Mimicking).
``count_parameters`` counts a model's parameters with each shared one counted once, stack by stack.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .lors_linear.module import LorsLinear, SharedWeight, shared_stacks

__all__ = ["ParameterCount", "StackCount", "StackReport", "count_parameters", "distill", "lors_structure", "lorsify",
           "rank_for_ratio", "restore_lors"]


def rank_for_ratio(in_features: int, out_features: int, kappa: float) -> int:
    """The private rank that makes a layer's pair ``kappa`` times smaller than its dense weight (PELA's
    rule): R = floor(in * out / (kappa * (in + out)))."""
    if not kappa > 0:
        raise ValueError(f"rank_for_ratio: the compression ratio kappa must be > 0, got {kappa}")
    # Exact rational arithmetic (kappa as written: 1.1 is 11/10), so exact quotients do not round down.
    kappa = Fraction(str(kappa)) if isinstance(kappa, float) else Fraction(kappa)
    return math.floor(Fraction(in_features * out_features) / (kappa * (in_features + out_features)))


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


# ---------------------------------------------------------------------------------------------------
# Parameter accounting


@dataclass
class StackCount:
    """One stack: parameters every layer uses (counted once) and each layer's own."""

    name: str
    shared: int
    private: List[int]

    @property
    def layers(self) -> int:
        return len(self.private)

    @property
    def total(self) -> int:
        return self.shared + sum(self.private)

    @property
    def per_layer(self) -> float:
        """The paper's 'average parameters per layer': shared / L + mean private."""
        return self.total / max(self.layers, 1)


class ParameterCount(int):
    """The number of parameters, each counted once: an int (``int()``, arithmetic, comparisons, format
    specs such as ``f"{count:,}"``; ``f"{count}"`` is the number too) that also has ``stacks``, breaking
    the stacked ones down, and ``other``, the rest. ``table()`` is that breakdown as text, and so are
    ``str()`` and ``print()``."""

    def __new__(cls, total: int, stacks: Sequence[StackCount] = ()):
        count = super().__new__(cls, total)
        count.stacks = list(stacks)
        return count

    def __getnewargs__(self):
        return int(self), self.stacks

    @property
    def total(self) -> int:
        return int(self)

    @property
    def other(self) -> int:
        return self.total - sum(s.total for s in self.stacks)

    def __repr__(self) -> str:
        return f"ParameterCount({self.total}, stacks={self.stacks!r})"

    def table(self) -> str:
        """One row per stack (layers, shared, private, average per layer), then the total."""
        rows = [f"{'stack':<40} {'layers':>6} {'shared':>12} {'private':>12} {'per layer':>12}"]
        rows += [f"{s.name:<40} {s.layers:>6} {s.shared:>12,} {sum(s.private):>12,} {s.per_layer:>12,.0f}"
                 for s in self.stacks]
        rows.append(f"total {self.total:,} parameters ({self.other:,} outside stacks)")
        return "\n".join(rows)

    __str__ = table

    def __format__(self, spec: str) -> str:  # int's: "" would fall back to str(), the table
        return format(int(self), spec)


def _numel(params: Iterable[Tensor]) -> int:
    return sum(p.numel() for p in params)


def count_parameters(module: nn.Module) -> ParameterCount:
    """Parameters of ``module`` with every shared tensor counted once, and per-stack averages.

    Stacks are the LorsLinear layers that use one SharedWeight (shared: its weight; private: each
    layer's down, up, bias) and whatever a module reports through ``lors_stacks()`` (LorsAdaptiveMixing's
    generator and per-stage cores, LorsWeightGenerator's).
    """
    stacks = []
    for shared, layers in shared_stacks(module):
        private = [[p for n, p in layer.named_parameters() if not n.startswith("shared.")] for _, layer in layers]
        stacks.append((_stack_name([n for n, _ in layers]), [shared.weight], private))
    for name, sub in module.named_modules():
        if hasattr(sub, "lors_stacks"):
            stacks += [(f"{name}.{label}" if name else label, shared, private)
                       for label, shared, private in sub.lors_stacks()]
    counts, owner = [], {}  # owner: id(tensor) -> the stack counting it
    for i, (name, shared, private) in enumerate(stacks):
        sizes = []
        for params in (shared, *private):  # a tensor counts where it first appears (a bias shared by layers)
            clash = [stacks[owner[id(p)]][0] for p in params if owner.get(id(p), i) != i]
            if clash:  # one tensor in two stacks would be counted twice
                raise ValueError(f"count_parameters: a parameter belongs to two stacks, {clash[0]} and {name}")
            fresh = {id(p): p for p in params if id(p) not in owner}
            owner.update(dict.fromkeys(fresh, i))
            sizes.append(_numel(fresh.values()))
        counts.append(StackCount(name, sizes[0], sizes[1:]))
    return ParameterCount(_numel(module.parameters()), counts)


# ---------------------------------------------------------------------------------------------------
# Conversion


@dataclass
class StackReport:
    """What ``lorsify`` did to the layers one pattern matched. Errors are relative Frobenius norms:
    ``weight_error[l] = |W_l - W_eff| / |W_l|``; with calibration data, ``output_error[l] = |y_lors - y| / |y|``
    over the layer's inputs in the dense model (nan for a layer the calibration never ran). ``saves``:
    the LORS stack has fewer parameters than the dense one. With ``kappa`` it always does when
    kappa > L / (L - 1); below that, the rank's rounding down can still make it save."""

    pattern: str
    layers: List[str]
    in_features: int
    out_features: int
    ranks: List[int]
    method: str
    params_before: int
    params_after: int
    weight_error: List[float]
    output_error: Optional[List[float]] = None
    kappa: Optional[float] = None

    @property
    def saves(self) -> bool:
        return self.params_after < self.params_before

    def warning(self) -> Optional[str]:
        """What to say when the conversion saved no parameter, else None."""
        if self.saves:
            return None
        n = len(self.layers)
        why = ""
        if self.kappa is not None:  # shared (1 dense weight) + n pairs of at most 1/kappa each vs n dense
            # weights: saving nothing implies kappa <= n / (n - 1) (not the converse: the rank is rounded down)
            limit = "inf" if n == 1 else f"{n / (n - 1):.4g}"
            why = f": kappa = {self.kappa} <= L / (L - 1) = {limit} for L = {n} layers"
        return (f"{self.pattern}: the LORS stack is no smaller than the dense one ({self.params_after:,} >= "
                f"{self.params_before:,} parameters){why}")

    def __str__(self) -> str:
        rows = [f"{self.pattern}: {len(self.layers)} x Linear({self.in_features}, {self.out_features}) -> LORS "
                f"({self.method}), parameters {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_after / max(self.params_before, 1):.1%})"]
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

    def principal(self, centered: bool) -> Tuple[Tensor, Tensor]:
        """(U, mean): the principal directions of z, best first, as columns of U [out, d], and z's mean.
        Centered (the mean goes to the bias), or of the second moment when there is no bias to take it."""
        if self.n == 0:
            raise RuntimeError("lorsify: a matched layer never ran on the calibration data (is it called through "
                               "its forward? nn.MultiheadAttention, for one, reads out_proj.weight directly)")
        mean = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean, mean) if centered else self.outer) / self.n
        evals, evecs = torch.linalg.eigh(cov)
        factor = evecs * evals.clamp_min(0).sqrt()  # cov(u) = factor factor^T
        if not self.project:  # cov(z) = R cov(x) R^T = (R factor)(R factor)^T
            residual = _residual(self.linear, self.shared)
            factor, mean = residual @ factor, residual @ mean
        u, _, _ = torch.linalg.svd(factor, full_matrices=False)
        return u, mean


def _batches(calibration):
    """A Tensor, a tuple (positional args) or a Mapping (keyword args) is one batch; anything else is an
    iterable of such batches."""
    return [calibration] if isinstance(calibration, (Tensor, tuple, Mapping)) else calibration


def _run(model: nn.Module, batch):
    """model(batch): a Mapping is keyword arguments, a tuple or list positional ones."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextmanager
def _eval_mode(*models: nn.Module):
    """The models in eval mode (no dropout: outputs comparable), each submodule's mode restored after."""
    modes = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def _frozen(parameters: List[nn.Parameter]):
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


@torch.no_grad()
def _calibrate(model: nn.Module, calibration, hooks: Dict[nn.Module, callable]) -> None:
    """Run the calibration batches through ``model`` (eval mode) with ``hooks[layer](x, y)`` on each layer."""
    def hook(fn):  # nn.Linear.forward(input): positional or by keyword
        return lambda mod, args, kwargs, out: fn(args[0] if args else kwargs["input"], out)

    handles = [layer.register_forward_hook(hook(fn), with_kwargs=True) for layer, fn in hooks.items()]
    try:
        with _eval_mode(model):
            for batch in calibration:
                _run(model, batch)
    finally:
        for h in handles:
            h.remove()


def _matches(model: nn.Module, pattern: str) -> List[Tuple[str, nn.Linear]]:
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
        raise ValueError(f"lorsify: pattern {pattern!r} matches no nn.Linear{seen}. Linear layers: "
                         + (", ".join(known[:8]) + (", ..." if len(known) > 8 else "") if known else "none"))
    shapes = {}
    for n, m in linears:
        shapes.setdefault((tuple(m.weight.shape), m.weight.dtype, m.weight.device), []).append(n)
    if len(shapes) > 1:
        raise ValueError(f"lorsify: pattern {pattern!r} matches layers of different weights; one shared weight "
                         "needs one shape, dtype and device: "
                         + "; ".join(f"[{o}, {i}] {d} {dev}: {', '.join(ns)}"
                                     for ((o, i), d, dev), ns in shapes.items()))
    return linears


def _first_name(model: nn.Module) -> Dict[int, int]:
    """Module order: each module's position in named_modules() (its first name)."""
    return {id(m): i for i, (_, m) in enumerate(model.named_modules())}


def _per_layer(value, n: int, what: str) -> List[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or any(not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"lorsify: {what} must be an int >= 0 or one per matched layer ({n}), got {value!r}")
    return values


def _replace(model: nn.Module, new: Dict[int, nn.Module]) -> None:
    """Put new[id(old)] wherever ``model`` holds old, under every name it has."""
    for name, old in list(model.named_modules(remove_duplicate=False)):
        if name and id(old) in new:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new[id(old)])


def lorsify(model: nn.Module, targets: Union[str, Sequence[str]], rank: Optional[int] = None,
            groups: Union[int, Sequence[int]] = 1, method: str = "svd", calibration=None, *,
            kappa: Optional[float] = None, scaling: float = 1.0) -> Dict[str, StackReport]:
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
    no parameter is warned about. A Hugging Face model's config gets the stacks (``config.lors``, see
    ``lors_structure``), so that ``save_pretrained`` records them.
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
            raise ValueError(f"lorsify: pattern {pattern!r}: rank*groups {too_big[0][1]} for {too_big[0][0]} exceeds "
                             f"min(in, out) = {min(inp, out)} of Linear({inp}, {out})")
        weight = layers[0][1].weight
        shared = SharedWeight(inp, out, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            shared.weight.copy_(sum(linear.weight.detach().double() for _, linear in layers) / len(layers))
        shared.weight.requires_grad_(any(linear.weight.requires_grad for _, linear in layers))
        plans.append((pattern, layers, shared, group_counts, ranks))

    if method == "pca":
        features = {linear: _ResidualFeatures(linear, shared)
                    for _, layers, shared, _, _ in plans for _, linear in layers}
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
        after = shared.weight.numel() + sum(_numel(replacements[n][1].parameters()) - shared.weight.numel()
                                            for n, _ in layers)
        reports[pattern] = StackReport(pattern, [n for n, _ in layers], layers[0][1].in_features,
                                       layers[0][1].out_features, [r * g for r, g in zip(ranks, group_counts)],
                                       method, before, after, errors, kappa=kappa)
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
            report.output_error = [math.sqrt(float(sums[n][0]) / float(sums[n][1])) if float(sums[n][1]) else math.nan
                                   for n in report.layers]  # nan: the layer never ran (or only output zeros)

    _replace(model, {id(linear): layer for linear, layer in replacements.values()})
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):  # a Hugging Face model: save_pretrained writes it to config.json
        config.lors = lors_structure(model)
    return reports


def _fit_pca(linear: nn.Linear, shared: SharedWeight, features: _ResidualFeatures, rank: int, groups: int,
             scaling: float) -> LorsLinear:
    """A LorsLinear on ``shared`` whose pair keeps the principal directions of the residual features."""
    weight = linear.weight
    layer = LorsLinear(linear.in_features, linear.out_features, rank=rank, groups=groups,
                       bias=linear.bias is not None, shared=shared, scaling=scaling, device=weight.device,
                       dtype=weight.dtype)
    u, mean = features.principal(centered=linear.bias is not None)
    u = u[:, :rank * groups]
    keep = u.shape[1]
    with torch.no_grad():
        layer.up.zero_()
        layer.down.zero_()
        layer.up[:, :keep].copy_(u / scaling)
        layer.down[:keep].copy_(u.t() @ _residual(linear, shared))
        if linear.bias is not None:  # the mean the kept directions miss becomes bias
            layer.bias.copy_(linear.bias.double() + mean - u @ (u.t() @ mean))
    return layer


# ---------------------------------------------------------------------------------------------------
# Distillation


def _first_tensor(output) -> Tensor:
    """A model's output as one tensor: itself; else its ``logits`` or ``last_hidden_state``; else its
    first tensor that is not a scalar, and not under the key ``loss`` (a Hugging Face model given labels
    puts its loss first, in a ModelOutput or, with return_dict=False, a tuple)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(output.get(key), Tensor):
                return output[key]
        values = [v for k, v in output.items() if k != "loss"]
    else:
        values = output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value
    raise TypeError(f"distill: no tensor in the model's output ({type(output).__name__}); pass output=")


def distill(student: nn.Module, teacher: nn.Module, calibration, *, steps: int = 100, lr: float = 1e-3,
            parameters: Optional[Iterable[nn.Parameter]] = None, output=None, progress: bool = True) -> List[float]:
    """Fit a lorsified model to the dense one it came from by output matching: ``steps`` Adam steps on
    the relative squared error |y_student - y_teacher|^2 / |y_teacher|^2, one calibration batch per
    step, round robin.

    teacher: the dense model (keep a ``copy.deepcopy`` from before ``lorsify``); its outputs are computed
        once per batch. Both models run in eval mode (no dropout), their modes restored after.
    calibration: batches as ``lorsify`` takes them (a Tensor, a tuple, a Mapping, or an iterable of them).
    parameters: what to train; by default every parameter of the student's LorsLinear layers (shared
        weights, private pairs, biases) that requires grad.
    output: model output -> the tensor to match (default: the output if a tensor, else its logits or
        last_hidden_state, else its first tensor that is not a scalar loss).
    progress: a tqdm bar, when tqdm is installed.

    Returns the relative output error |y_s - y_t| / |y_t| of each step's batch, measured before that step.
    """
    batches = list(_batches(calibration))
    if not batches:
        raise ValueError("distill: no calibration batch")
    if steps < 1:
        raise ValueError(f"distill: steps must be >= 1, got {steps}")
    if parameters is None:
        parameters = {id(p): p for _, layers in shared_stacks(student) for _, layer in layers
                      for p in layer.parameters() if p.requires_grad}.values()
    parameters = list(parameters)
    if not parameters:
        raise ValueError("distill: nothing to train (no LorsLinear parameter requires grad; pass parameters=)")
    pick = output or _first_tensor
    errors = []
    trained = {id(p) for p in parameters}
    frozen = [p for p in student.parameters() if p.requires_grad and id(p) not in trained]
    with _eval_mode(student, teacher), _frozen(frozen):  # no gradient work for what is not trained
        with torch.no_grad():
            targets = [pick(_run(teacher, batch)).detach() for batch in batches]
        optimizer = torch.optim.Adam(parameters, lr=lr)
        bar = range(steps)
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(bar, desc="distill", leave=False, dynamic_ncols=True)
            except ImportError:  # tqdm is optional (the bench extra and Hugging Face installs have it)
                pass
        for step in bar:
            target = targets[step % len(batches)].float()
            got = pick(_run(student, batches[step % len(batches)])).float()
            loss = (got - target).square().sum() / target.square().sum().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            errors.append(math.sqrt(loss.item()))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(error=f"{errors[-1]:.3e}")
    return errors


# ---------------------------------------------------------------------------------------------------
# The structure of a converted model, for checkpoints


def lors_structure(model: nn.Module) -> dict:
    """The LORS^T stacks of ``model`` as JSON-able data: for each stack its shape, the shared weight's
    init and each layer's name, rank, groups, bias, scaling and dropout. ``lorsify`` stores it in a
    Hugging Face model's ``config.lors`` (so ``save_pretrained`` writes it to config.json);
    ``restore_lors`` rebuilds the stacks from it."""
    stacks = [{"pattern": _stack_name([n for n, _ in layers]), "in_features": shared.in_features,
               "out_features": shared.out_features, "init": shared.init,
               "layers": [{"name": n, "rank": layer.rank, "groups": layer.groups, "bias": layer.bias is not None,
                           "scaling": layer.scaling, "dropout": layer.dropout} for n, layer in layers]}
              for shared, layers in shared_stacks(model)]
    return {"format": "lors_kernels", "version": 1, "stacks": stacks}


def restore_lors(model: nn.Module, structure: Optional[dict] = None) -> nn.Module:
    """Give a dense model (the same architecture, e.g. built from its config) the LORS stacks that
    ``structure`` (from ``lors_structure``; by default ``model.config.lors``) describes, in place and
    with fresh values, ready to load the converted model's checkpoint. Stacks the model builds itself
    (LorsAdaptiveMixing's output projection) are left as they are. Returns ``model``."""
    if structure is None:
        structure = getattr(getattr(model, "config", None), "lors", None)
        if structure is None:
            raise ValueError("restore_lors: no structure given, and the model has no config.lors (lorsify records "
                             "it in a Hugging Face model's config; elsewhere save lors_structure(model) yourself)")
    if not isinstance(structure, Mapping) or structure.get("format") != "lors_kernels" or structure.get("version") != 1:
        raise ValueError("restore_lors: not a lors_kernels structure (version 1) as lors_structure returns")
    new = {}
    for stack in structure["stacks"]:
        shape = (stack["in_features"], stack["out_features"])
        names = [spec["name"] for spec in stack["layers"]]
        try:
            modules = [model.get_submodule(n) for n in names]
        except AttributeError as e:
            raise ValueError(f"restore_lors: stack {stack['pattern']}: {e}") from None
        if all(isinstance(m, LorsLinear) for m in modules) and len({id(m.shared) for m in modules}) == 1 and [
                (m.in_features, m.out_features, m.rank, m.groups) for m in modules] == [
                (*shape, spec["rank"], spec["groups"]) for spec in stack["layers"]]:
            continue  # built by the model itself
        bad = [f"{n} ({type(m).__name__})" for n, m in zip(names, modules)
               if type(m) is not nn.Linear or (m.in_features, m.out_features) != shape]
        if bad:
            raise ValueError(f"restore_lors: stack {stack['pattern']} needs nn.Linear{shape} layers to replace; "
                             f"found {', '.join(bad[:4])}")
        weight = modules[0].weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        shared = SharedWeight(*shape, init=stack["init"], **factory)
        for module, spec in zip(modules, stack["layers"]):
            new[id(module)] = LorsLinear(*shape, rank=spec["rank"], groups=spec["groups"], bias=spec["bias"],
                                         shared=shared, scaling=spec["scaling"], dropout=spec["dropout"], **factory)
    _replace(model, new)
    return model
