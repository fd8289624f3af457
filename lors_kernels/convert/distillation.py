"""Output matching: a lorsified model fitted to the dense model it came from."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..static import shared_stacks
from .calibration import _batches, _eval_mode, _run

__all__ = ["distill"]


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


@contextmanager
def _frozen(parameters: list[nn.Parameter]):
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    calibration: Any,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    parameters: Iterable[nn.Parameter] | None = None,
    output: Callable[[Any], Tensor] | None = None,
    progress: bool = True,
) -> list[float]:
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
        parameters = {
            id(p): p
            for _, layers in shared_stacks(student)
            for _, layer in layers
            for p in layer.parameters()
            if p.requires_grad
        }.values()
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
