"""How every op is exposed: a torch.library custom op for torch.compile (opaque, with a fake impl and
registered autograd), and in eager mode a twin autograd.Function over the same forward and backward,
because torch.library's Python dispatch costs ~30 us a call, more than a whole small kernel."""

from __future__ import annotations

import torch


def shape_str(t: torch.Tensor) -> str:
    """"[2, 3]" for error messages that name the shapes they saw."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def eager_twin(forward, setup_context, backward):
    """An autograd.Function with `forward(*args)`, `setup_context(ctx, args, output)` and
    `backward(ctx, *grads) -> one gradient (or None) per arg`."""

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):  # ctx-style: apply() then skips binding the signature
            output = forward(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Twin.__name__ = Twin.__qualname__ = f"{forward.__name__}_function"
    return Twin


def eager(forward, recorded, *args):
    """Outside torch.compile: `recorded(*args)` when autograd must record (the twin Function, or a
    pure-PyTorch path whose own autograd does as well), else plain `forward(*args)`."""
    if torch.is_grad_enabled():
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return recorded(*args)
    return forward(*args)
