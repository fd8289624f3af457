"""`lors::lors_linear`: input checks, dispatch, autograd and torch.library registration."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend, custom_op
from ..custom_op import shape_str
from . import reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 runs on the reference
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # the C++ CPU kernel's
# The CUDA decode kernel's limits (csrc/cuda/lors_linear.h: kDecodeMaxRows, kDecodeMaxRank).
NATIVE_CUDA_MAX_ROWS = 16
NATIVE_CUDA_MAX_RANK = 512


def native_wins(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Where the native CPU kernel (one pass over the weight) beat eager PyTorch, measured on the
    project's 2-core AMD EPYC: fp32 up to M = 16 at every size; bf16 only for the smallest products,
    because torch's bf16 GEMM uses the CPU's AVX512-BF16 dot instructions and the kernel does not."""
    if dtype == torch.float32:
        return m <= 16
    return m <= 2 or m * n * k <= 1 << 22



def check_inputs(x, weight, down, up, bias) -> None:
    """Raise a clear error for bad input; the common valid case costs a few attribute reads."""
    try:
        ws, ds, us, dtype, device = weight.shape, down.shape, up.shape, x.dtype, x.device
        if (len(ws) == 2 and len(ds) == 2 and len(us) == 2 and x.ndim >= 1
                and x.shape[-1] == ws[1] == ds[1] and us[0] == ws[0] and us[1] == ds[0]
                and dtype in FLOAT_DTYPES and weight.dtype == dtype and down.dtype == dtype and up.dtype == dtype
                and weight.device == device and down.device == device and up.device == device
                and (bias is None or (bias.shape == ws[:1] and bias.dtype == dtype and bias.device == device))):
            return
    except AttributeError:  # not a tensor: said below
        pass
    _explain_bad_inputs(x, weight, down, up, bias)


def _explain_bad_inputs(x, weight, down, up, bias) -> None:
    named = {"x": x, "weight": weight, "down": down, "up": up}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"lors_linear: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in named.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"lors_linear: {name} has dtype {t.dtype}; expected a floating dtype {FLOAT_DTYPES}")
    if x.dim() < 1:
        raise ValueError(f"lors_linear: x must have at least one dimension [..., in], got shape {shape_str(x)}")
    for name, dim in (("weight", 2), ("down", 2), ("up", 2), ("bias", 1)):
        if name in named and named[name].dim() != dim:
            raise ValueError(f"lors_linear: {name} must be {dim}-D, got shape {shape_str(named[name])}")
    out_f, in_f = weight.shape
    r = down.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(f"lors_linear: x {shape_str(x)} has {x.shape[-1]} input features but weight "
                         f"{shape_str(weight)} expects {in_f}")
    if down.shape[1] != in_f:
        raise ValueError(f"lors_linear: down {shape_str(down)} must be [rank, in] = [R, {in_f}] for weight {shape_str(weight)}")
    if tuple(up.shape) != (out_f, r):
        raise ValueError(f"lors_linear: up {shape_str(up)} must be [out, rank] = [{out_f}, {r}] "
                         f"for weight {shape_str(weight)} and down {shape_str(down)}")
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"lors_linear: bias {shape_str(bias)} must be [{out_f}] for weight {shape_str(weight)}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError("lors_linear: all tensors must share one dtype, got "
                        + ", ".join(f"{n}={d}" for n, d in dtypes.items()))
    devices = {name: t.device for name, t in named.items()}
    raise ValueError("lors_linear: all tensors must be on one device, got "
                     + ", ".join(f"{n}={d}" for n, d in devices.items()))


def as_rows(t: Tensor) -> Tensor:
    """[..., F] -> [rows, F] (a view when strides allow); explicit sizes, since F or rows may be 0."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def forward(x: Tensor, weight: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor], scaling: float) -> Tensor:
    """The forward on the backend that dispatch picks; inputs already checked."""
    x2 = as_rows(x)
    if x.is_cpu:
        fits = x.dtype in NATIVE_DTYPES and backend.native() is not None
        wins = fits and native_wins(x2.shape[0], weight.shape[0], x2.shape[1], x.dtype)
    else:
        # The CUDA decode kernel runs only when forced: nothing has measured it against Triton yet, so
        # the automatic choice stays Triton, and the extension is looked up only when it can be chosen.
        wins = False
        fits = (backend.forced_backend() == "native" and x.is_cuda and x.dtype in KERNEL_DTYPES
                and x2.shape[0] <= NATIVE_CUDA_MAX_ROWS and down.shape[0] <= NATIVE_CUDA_MAX_RANK
                and backend.native_cuda_built())
    which = backend.choose(x, native_fits=fits, native_wins=wins, triton_fits=x.dtype in KERNEL_DTYPES)
    if which == "triton":
        from . import triton as kernels

        y = kernels.lors_linear_forward(x2, weight, down, up, bias, scaling)
    elif which == "native":
        ext = backend.native()
        run = ext.lors_linear_forward_cpu if x.is_cpu else ext.lors_linear_forward_cuda
        y = run(x2, weight, down, up, bias, scaling)
    else:
        y = reference.lors_linear(x2, weight, down, up, bias, scaling)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def backward(grad: Tensor, x: Tensor, weight: Tensor, down: Tensor, up: Tensor, scaling: float, has_bias: bool,
             needs_x: bool):
    """(dx or None, dweight, ddown, dup, dbias or None)."""
    x2, g2 = as_rows(x), as_rows(grad)
    if backend.choose(x, native_fits=False, triton_fits=x.dtype in KERNEL_DTYPES) == "triton":
        from . import triton as kernels

        grads = kernels.lors_linear_backward(g2, x2, weight, down, up, scaling, has_bias, needs_x)
    else:
        grads = reference.lors_linear_backward(g2, x2, weight, down, up, scaling, has_bias, needs_x)
    dx, dweight, ddown, dup, dbias = grads
    return (dx.reshape(x.shape) if needs_x else None), dweight, ddown, dup, dbias


# The registered op: what torch.compile sees (opaque to the graph, with a fake impl and autograd).


@torch.library.custom_op("lors::lors_linear", mutates_args=())
def _lors_linear_op(x: Tensor, weight: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor],
                    scaling: float) -> Tensor:
    check_inputs(x, weight, down, up, bias)
    return forward(x, weight, down, up, bias, scaling)


@_lors_linear_op.register_fake
def _(x, weight, down, up, bias, scaling):
    check_inputs(x, weight, down, up, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("lors::lors_linear_backward", mutates_args=())
def _lors_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, down: Tensor, up: Tensor, scaling: float,
                             has_bias: bool, needs_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, ddown, dup, dbias); dx and dbias are empty when not asked for (ops return tensors)."""
    dx, dweight, ddown, dup, dbias = backward(grad, x, weight, down, up, scaling, has_bias, needs_x)
    return (x.new_empty(0) if dx is None else dx), dweight, ddown, dup, (weight.new_empty(0) if dbias is None else dbias)


@_lors_linear_backward_op.register_fake
def _(grad, x, weight, down, up, scaling, has_bias, needs_x):
    return (x.new_empty(x.shape if needs_x else (0,)), weight.new_empty(weight.shape), down.new_empty(down.shape),
            up.new_empty(up.shape), weight.new_empty((weight.shape[0],) if has_bias else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, down, up, bias, scaling = inputs
    ctx.save_for_backward(x, weight, down, up)
    ctx.scaling = scaling
    ctx.has_bias = bias is not None


def _gradients(backward_fn):
    def grads(ctx, grad):
        x, weight, down, up = ctx.saved_tensors
        needs_x = ctx.needs_input_grad[0]
        dx, dweight, ddown, dup, dbias = backward_fn(grad, x, weight, down, up, ctx.scaling, ctx.has_bias, needs_x)
        return (dx if needs_x else None), dweight, ddown, dup, (dbias if ctx.has_bias else None), None

    return grads


_lors_linear_op.register_autograd(_gradients(torch.ops.lors.lors_linear_backward), setup_context=_setup_context)
_LorsLinearFunction = custom_op.eager_twin(forward, _setup_context, _gradients(backward))


def lors_linear(x: Tensor, weight: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor] = None, *,
                scaling: float = 1.0) -> Tensor:
    """Static LORS linear: ``x @ weight.T + scaling * (x @ down.T) @ up.T + bias``.

    x [..., in], weight [out, in] (the shared weight), down [R, in], up [out, R], bias [out] or None.
    R may be 0. Differentiable in every tensor; never builds ``weight + up @ down`` for small batches.
    Under torch.compile this is the custom op ``lors::lors_linear`` (no graph break).
    """
    if torch.compiler.is_compiling():
        return torch.ops.lors.lors_linear(x, weight, down, up, bias, float(scaling))
    check_inputs(x, weight, down, up, bias)
    return custom_op.eager(forward, _recorded, x, weight, down, up, bias, float(scaling))


def _recorded(x, weight, down, up, bias, scaling):
    """With autograd recording: the kernels' Function, or on the reference its own autograd, which
    saves x @ down^T instead of recomputing it, as the eager code it replaces does. (Rank 0 takes the
    Function, which gives the empty down/up their empty gradients as every backend does.)"""
    if down.shape[0] and backend.choose(x, native_fits=False, triton_fits=x.dtype in KERNEL_DTYPES) == "reference":
        return reference.lors_linear(x, weight, down, up, bias, scaling)
    return _LorsLinearFunction.apply(x, weight, down, up, bias, scaling)
