"""Calibration batches: the forms they come in, and running a model on them in eval mode."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn


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


@torch.no_grad()
def _calibrate(model: nn.Module, calibration, hooks: dict[nn.Module, Callable[[Tensor, Tensor], None]]) -> None:
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
