"""`lors::lors_linear`: input checks, the table of implementations, the public function."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import backend
from ..registry import Impl, Measured, as_float, as_rows, define_op, public, require_tensors, shape_str
from . import reference

if backend.triton_available():  # optional: without Triton its rows never run (registry.Impl.runs_on)
    from . import triton as kernels

# The CUDA decode kernel's limits (csrc/cuda/static.h: kDecodeMaxRows, kDecodeMaxRank).
NATIVE_CUDA_MAX_ROWS = 16
NATIVE_CUDA_MAX_RANK = 512


def native_wins(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Where the native CPU kernel (one pass over the weight) beat eager PyTorch, measured on the
    project's 2-core AMD EPYC: fp32 up to M = 16 at every size; bf16 only for the smallest products,
    because torch's bf16 GEMM uses the CPU's AVX512-BF16 dot instructions and the kernel does not."""
    if dtype == torch.float32:
        return m <= 16
    return m <= 2 or m * n * k <= 1 << 22


def check_lors_linear(
    x: Tensor, weight: Tensor, down: Tensor, up: Tensor, bias: Tensor | None, scaling: float | None = None
) -> None:
    """Raise a clear error for bad input; the common valid case costs a few attribute reads."""
    try:
        ws, ds, us, dtype, device = weight.shape, down.shape, up.shape, x.dtype, x.device
        if (
            len(ws) == 2
            and len(ds) == 2
            and len(us) == 2
            and x.ndim >= 1
            and x.shape[-1] == ws[1] == ds[1]
            and us[0] == ws[0]
            and us[1] == ds[0]
            and dtype in backend.FLOAT_DTYPES
            and weight.dtype == dtype
            and down.dtype == dtype
            and up.dtype == dtype
            and weight.device == device
            and down.device == device
            and up.device == device
            and (bias is None or (bias.shape == ws[:1] and bias.dtype == dtype and bias.device == device))
        ):
            return
    except AttributeError:  # not a tensor: said below
        pass
    _explain_bad_inputs(x, weight, down, up, bias)


def _named(x, weight, down, up, bias) -> dict:
    named = {"x": x, "weight": weight, "down": down, "up": up}
    if bias is not None:
        named["bias"] = bias
    return named


def _require_floats(named: dict) -> None:
    for name, t in named.items():
        if t.dtype not in backend.FLOAT_DTYPES:
            raise TypeError(
                f"lors_linear: {name} has dtype {t.dtype}; expected a floating dtype {backend.FLOAT_DTYPES}"
            )


def _require_one_dtype_and_device(named: dict, *others: tuple[str, Tensor | None]) -> None:
    """One dtype among the float tensors `named`, one device among them and `others`."""
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(
            "lors_linear: all tensors must share one dtype, got "
            + ", ".join(f"{n}={d}" for n, d in dtypes.items())
            + f"; convert them first, e.g. weight.to(x.dtype) for x in {named['x'].dtype}"
        )
    devices = {name: t.device for name, t in [*named.items(), *others] if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "lors_linear: all tensors must be on one device, got " + ", ".join(f"{n}={d}" for n, d in devices.items())
        )


def _explain_bad_inputs(x, weight, down, up, bias) -> None:
    require_tensors("lors_linear", x=x, weight=weight, down=down, up=up, bias=bias)
    named = _named(x, weight, down, up, bias)
    _require_floats(named)
    if x.dim() < 1:
        raise ValueError(f"lors_linear: x must have at least one dimension [..., in], got shape {shape_str(x)}")
    for name, dim in (("weight", 2), ("down", 2), ("up", 2), ("bias", 1)):
        if name in named and named[name].dim() != dim:
            raise ValueError(f"lors_linear: {name} must be {dim}-D, got shape {shape_str(named[name])}")
    out_f, in_f = weight.shape
    r = down.shape[0]
    if x.shape[-1] != in_f:
        raise ValueError(
            f"lors_linear: x {shape_str(x)} has {x.shape[-1]} input features but weight "
            f"{shape_str(weight)} expects {in_f}"
        )
    if down.shape[1] != in_f:
        raise ValueError(
            f"lors_linear: down {shape_str(down)} must be [rank, in] = [R, {in_f}] for weight {shape_str(weight)}"
        )
    if tuple(up.shape) != (out_f, r):
        raise ValueError(
            f"lors_linear: up {shape_str(up)} must be [out, rank] = [{out_f}, {r}] "
            f"for weight {shape_str(weight)} and down {shape_str(down)}"
        )
    if bias is not None and bias.shape[0] != out_f:
        raise ValueError(f"lors_linear: bias {shape_str(bias)} must be [{out_f}] for weight {shape_str(weight)}")
    _require_one_dtype_and_device(named)


# The kernels take x as rows [M, in]; the op takes x [..., in].


def _unrows(y: Tensor, x: Tensor) -> Tensor:
    """The kernels' rows [M, out] back to x's leading dims, as a tensor of its own on the same memory, not
    a view of the rows: autograd refuses in-place ops on a view made inside a custom Function, and
    FSDP2 warns of views returned by a module (in-place ops there skip its pre-backward hook)."""
    if x.dim() == 2:
        return y
    shaped = y.view(*x.shape[:-1], y.shape[-1])
    return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), shaped.shape, shaped.stride())


def _triton_forward(x, weight, down, up, bias, scaling):
    return _unrows(kernels.lors_linear_forward(as_rows(x), weight, down, up, bias, scaling), x)


def _native_cuda_forward(x, weight, down, up, bias, scaling):
    return _unrows(backend.native().lors_linear_forward_cuda(as_rows(x), weight, down, up, bias, scaling), x)


def _native_cpu_forward(x, weight, down, up, bias, scaling):
    return _unrows(backend.native().lors_linear_forward_cpu(as_rows(x), weight, down, up, bias, scaling), x)


def _backward_args(c, grad):
    return as_rows(grad), as_rows(c.x), c.weight, c.down, c.up, c.scaling, c.bias is not None, c.needs.x


def _with_x_shape(grads, c):
    dx, dweight, ddown, dup, dbias = grads
    return (None if dx is None else dx.reshape(c.x.shape)), dweight, ddown, dup, dbias


def _triton_backward(c, grad):
    return _with_x_shape(kernels.lors_linear_backward(*_backward_args(c, grad)), c)


def _reference_backward(c, grad):
    return _with_x_shape(reference.lors_linear_backward(*_backward_args(c, grad)), c)


def _rows(c) -> int:
    return math.prod(c.x.shape[:-1])


def _shape_class(c):
    """Rows rounded up to a power of two; the weight's and the pair's sizes, dtype, bias or not."""
    return (1 << max(_rows(c) - 1, 0).bit_length(), *c.weight.shape, c.down.shape[0], c.x.dtype, c.bias is None)


lors_linear_op = define_op(
    "lors_linear",
    "(Tensor x, Tensor weight, Tensor down, Tensor up, Tensor? bias, float scaling) -> Tensor",
    check=check_lors_linear,
    fake=lambda x, weight, down, up, bias, scaling: x.new_empty((*x.shape[:-1], weight.shape[0])),
    grads=("x", "weight", "down", "up", "bias"),
    impls=[
        # Never slower than the composite addmm(bias, x, W^T).addmm_(x down^T, up^T) (the reference on
        # CUDA): measured on the first call of each shape class.
        Impl(
            "triton",
            "cuda",
            _triton_forward,
            _triton_backward,
            wins=Measured(_shape_class),
            fits=lambda c: c.x.dtype in backend.TRITON_DTYPES,
            takes="float32, float16, bfloat16",
        ),
        # The CUDA decode kernel runs only when forced: nothing has measured it against Triton yet.
        Impl(
            "native",
            "cuda",
            _native_cuda_forward,
            _triton_backward,
            auto=False,
            fits=lambda c: (
                c.x.dtype in backend.TRITON_DTYPES
                and _rows(c) <= NATIVE_CUDA_MAX_ROWS
                and c.down.shape[0] <= NATIVE_CUDA_MAX_RANK
                and backend.native_has_cuda()
            ),
            takes=f"float32/16, bfloat16, at most {NATIVE_CUDA_MAX_ROWS} rows and rank {NATIVE_CUDA_MAX_RANK}, "
            "in CUDA builds",
        ),
        Impl(
            "native",
            "cpu",
            _native_cpu_forward,
            _reference_backward,
            fits=lambda c: c.x.dtype in backend.NATIVE_CPU_DTYPES,
            wins=lambda c: native_wins(_rows(c), c.weight.shape[0], c.weight.shape[1], c.x.dtype),
            takes="float32, bfloat16",
        ),
        # Recording a call, the reference's own autograd saves x @ down^T instead of recomputing it, as the
        # eager code it replaces does.
        Impl("reference", None, reference.lors_linear, _reference_backward, eager=reference.lors_linear),
    ],
)


# ------------------------------------------------------------------------------------------ indexed


def check_lors_linear_indexed(
    x: Tensor,
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    scaling: Tensor,
    index: Tensor,
    ranks: Tensor | None,
) -> None:
    """Clear errors for bad input to lors_linear(..., index=): down [L, R, in], up [L, out, R], bias [out] or
    [L, out], scaling [L], index of x's leading shape, ranks [L] (the values: check_index)."""
    require_tensors("lors_linear", x=x, weight=weight, down=down, up=up, bias=bias, index=index, ranks=ranks)
    named = _named(x, weight, down, up, bias)
    _require_floats(named)
    if x.dim() < 1:
        raise ValueError(f"lors_linear: x must have at least one dimension [..., in], got shape {shape_str(x)}")
    if weight.dim() != 2:
        raise ValueError(f"lors_linear: weight must be 2-D [out, in], got shape {shape_str(weight)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(
            f"lors_linear: x {shape_str(x)} has {x.shape[-1]} input features but weight "
            f"{shape_str(weight)} expects {in_f}"
        )
    if down.dim() != 3 or down.shape[2] != in_f:
        raise ValueError(f"lors_linear: with index, down {shape_str(down)} must be [layers, rank, in] = [L, R, {in_f}]")
    layers, r = down.shape[:2]
    if tuple(up.shape) != (layers, out_f, r):
        raise ValueError(
            f"lors_linear: with index, up {shape_str(up)} must be [layers, out, rank] = [{layers}, {out_f}, {r}] "
            f"for weight {shape_str(weight)} and down {shape_str(down)}"
        )
    if bias is not None and tuple(bias.shape) not in ((out_f,), (layers, out_f)):
        raise ValueError(
            f"lors_linear: bias {shape_str(bias)} must be [out] = [{out_f}] (every row) or [layers, out] = "
            f"[{layers}, {out_f}] (the rows of each layer)"
        )
    if not scaling.dtype.is_floating_point or tuple(scaling.shape) != (layers,):
        raise ValueError(
            f"lors_linear: scaling must be a float or a float tensor [layers] = [{layers}], got "
            f"{scaling.dtype} {shape_str(scaling)}"
        )
    if index.dtype not in (torch.int32, torch.int64) or index.shape != x.shape[:-1]:
        raise ValueError(
            f"lors_linear: index must be an int32 or int64 tensor of x's leading shape {list(x.shape[:-1])} "
            f"(one layer per row), got {index.dtype} {shape_str(index)}"
        )
    if ranks is not None and (ranks.dtype not in (torch.int32, torch.int64) or tuple(ranks.shape) != (layers,)):
        raise ValueError(
            f"lors_linear: ranks must be int32 or int64 [layers] = [{layers}], got {ranks.dtype} {shape_str(ranks)}"
        )
    _require_one_dtype_and_device(named, ("scaling", scaling), ("index", index), ("ranks", ranks))


def check_index(x, weight, down, up, bias, scaling, index, ranks, sync: bool) -> None:
    """index in [-1, L) and ranks in [0, R]: one sync eagerly, a device-side assert in compiled graphs."""
    layers, r = down.shape[:2]
    checks = [(index, -1, layers - 1, f"index entries must be -1 (the shared weight alone) or in [0, {layers})")]
    if ranks is not None:
        checks.append((ranks, 0, r, f"ranks must be in [0, {r}] (R = down.shape[1])"))
    for values, low, high, message in checks:
        if values.numel() == 0:
            continue
        if not sync:
            torch._assert_async(((values >= low) & (values <= high)).all(), f"lors_linear: {message}")
            continue
        seen_low, seen_high = torch.stack(torch.aminmax(values)).tolist()
        if seen_low < low or seen_high > high:
            raise IndexError(f"lors_linear: {message}, got values in [{seen_low}, {seen_high}]")


# The kernels take x and index as rows: x [M, in], index [M].


def _triton_indexed_forward(x, weight, down, up, bias, scaling, index, ranks):
    y = kernels.lors_linear_indexed_forward(as_rows(x), weight, down, up, bias, scaling, index.reshape(-1), ranks)
    return _unrows(y, x)


def _native_cpu_indexed_forward(x, weight, down, up, bias, scaling, index, ranks):
    forward = backend.native().lors_linear_indexed_forward_cpu
    return _unrows(forward(as_rows(x), weight, down, up, bias, scaling, index.reshape(-1), ranks), x)


def _indexed_grads(backward, c, grad):
    dx, *grads = backward(
        as_rows(grad), as_rows(c.x), c.weight, c.down, c.up, c.bias, c.scaling, c.index.reshape(-1), c.ranks, c.needs.x
    )
    return (None if dx is None else dx.reshape(c.x.shape)), *grads


def _triton_indexed_backward(c, grad):
    return _indexed_grads(kernels.lors_linear_indexed_backward, c, grad)


def _reference_indexed_backward(c, grad):
    return _indexed_grads(reference.lors_linear_indexed_backward, c, grad)


lors_linear_indexed_op = define_op(
    "lors_linear_indexed",
    "(Tensor x, Tensor weight, Tensor down, Tensor up, Tensor? bias, Tensor scaling, Tensor index, Tensor? ranks) "
    "-> Tensor",
    check=check_lors_linear_indexed,
    validate=check_index,
    fake=lambda x, weight, *rest: x.new_empty((*x.shape[:-1], weight.shape[0])),
    grads=("x", "weight", "down", "up", "bias", "scaling"),
    impls=[
        Impl(
            "triton",
            "cuda",
            _triton_indexed_forward,
            _triton_indexed_backward,
            fits=lambda c: c.x.dtype in backend.TRITON_DTYPES,
            takes="float32, float16, bfloat16",
        ),
        # Against the reference (the dense GEMM, then a product per layer's segment) at in = out = 1024, 8
        # layers of rank 16 on 2 cores: fp32 0.33-0.85x its time up to 512 rows; bf16 0.3-0.9x up to 64 rows,
        # then slower (torch's bf16 GEMM uses AVX512-BF16, the kernel fp32 FMAs).
        Impl(
            "native",
            "cpu",
            _native_cpu_indexed_forward,
            _reference_indexed_backward,
            fits=lambda c: c.x.dtype in backend.NATIVE_CPU_DTYPES,
            wins=lambda c: _rows(c) <= (512 if c.x.dtype == torch.float32 else 64),
            takes="float32, bfloat16",
        ),
        Impl("reference", None, reference.lors_linear_indexed, _reference_indexed_backward),
    ],
)


def _indexed_arguments(x, weight, down, up, bias, scaling, index, ranks) -> tuple:
    """The indexed op's arguments: scaling as a tensor [L], index as x's leading shape, ranks a tensor."""
    require_tensors("lors_linear", x=x, down=down, index=index)
    layers = down.shape[0] if down.dim() == 3 else 0
    if not isinstance(scaling, Tensor):
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        scaling = torch.full((layers,), as_float("lors_linear", "scaling", scaling), dtype=wide, device=x.device)
    if index.shape != x.shape[:-1]:
        try:
            index = index.expand(x.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"lors_linear: index {shape_str(index)} must be x's leading shape {list(x.shape[:-1])} or broadcast "
                "to it (one layer per row)"
            ) from None
    if ranks is not None and not isinstance(ranks, Tensor):
        ranks = torch.tensor(list(ranks), dtype=torch.int64, device=x.device)
    return x, weight, down, up, bias, scaling, index, ranks


@public(lors_linear_op, lors_linear_indexed_op)
def lors_linear(
    x: Tensor,
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float | Tensor = 1.0,
    index: Tensor | None = None,
    ranks: Tensor | Sequence[int] | None = None,
) -> tuple:
    """Static LORS linear: ``x @ weight.T + scaling * (x @ down.T) @ up.T + bias``.

    x [..., in], weight [out, in] (the shared weight), down [R, in], up [out, R], bias [out] or None.
    R may be 0. Differentiable in every tensor; never builds ``weight + up @ down`` for small batches.
    Under torch.compile this is the custom op ``lors::lors_linear`` (no graph break).
    ``lors_linear.route(...)`` (same arguments) tells which implementation the call takes.

    Rows at different layers of one stack (``index`` given): down [L, R, in], up [L, out, R], index an
    integer tensor of x's leading shape (or broadcast to it) with values in [0, L), or -1 for the shared
    weight alone; row m of layer i = index[m] computes
    ``x_m @ weight.T + scaling[i] * (x_m @ down[i, :r].T) @ up[i, :, :r].T + bias_i`` with r = ranks[i]
    (``ranks`` [L] ints, default R: layers of lower rank cost only their own), ``scaling`` a float or a
    tensor [L], bias [out] (every row) or [L, out] (the rows of each layer; none on rows at -1). The
    shared weight is read once for all rows (``lors::lors_linear_indexed``).
    """
    if index is None:
        if ranks is not None:
            raise ValueError("lors_linear: ranks is per layer, for index= calls (down [L, R, in])")
        return lors_linear_op, (x, weight, down, up, bias, as_float("lors_linear", "scaling", scaling))
    return lors_linear_indexed_op, _indexed_arguments(x, weight, down, up, bias, scaling, index, ranks)
