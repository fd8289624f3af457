"""static/op.py: the op's checks of its inputs, its routes, gradcheck, opcheck, fullgraph compiling and
the backend forced by the environment."""

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_DEVICE, assert_close, route_device

import lors_kernels as lk

from .oracle import grads64, indexed64, indexed_grads64, make_indexed_inputs, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_gradcheck_op_float64(use_backend):
    use_backend("reference")
    x, weight, down, up, bias = make_inputs(3, 7, 5, 2, torch.float64, lead=(2,))
    inputs = [t.requires_grad_() for t in (x, weight, down, up, bias)]
    assert torch.autograd.gradcheck(lambda *a: lk.lors_linear(*a, scaling=0.7), inputs)


@pytest.mark.parametrize(
    "m,k,n,r", [(4, 32, 0, 4), (4, 0, 6, 3), (0, 0, 6, 2), (3, 5, 6, 0)], ids=["out0", "in0", "rows0_in0", "rank0"]
)
@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_degenerate_sizes(m, k, n, r, backend_name, use_backend):
    use_backend(backend_name)
    x, weight, down, up, bias = make_inputs(m, k, n, r, torch.float32, KERNEL_DEVICE)
    leaves = [t.requires_grad_() for t in (x, weight, down, up, bias)]
    y = lk.lors_linear(x, weight, down, up, bias)
    grad = torch.randn(y.shape, device=KERNEL_DEVICE)
    y.backward(grad)
    y64, expected = grads64(x, weight, down, up, bias, 1.0, grad)
    assert_close(y, y64, torch.float32, "y")
    for name, leaf, e in zip(["dx", "dweight", "ddown", "dup", "dbias"], leaves, expected):
        assert_close(leaf.grad, e, torch.float32, name)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_opcheck(backend_name, use_backend):
    use_backend(backend_name)
    x, weight, down, up, bias = make_inputs(5, 12, 10, 3, torch.float32, KERNEL_DEVICE, lead=(2,))
    for args in ((x, weight, down, up, bias, 0.5), (x, weight, down, up, None, 2.0)):
        args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(torch.ops.lors.lors_linear.default, args)
    grad = torch.randn(2, 5, 10, device=KERNEL_DEVICE)
    for needs in ([True] * 5, [False, True, True, True, True]):
        torch.library.opcheck(
            torch.ops.lors.lors_linear_backward.default,
            ([grad], [], needs, x.detach(), weight.detach(), down.detach(), up.detach(), bias.detach(), 0.5),
        )


def test_compile_fullgraph_stack_cpu():
    torch.manual_seed(0)
    stack = lk.make_lors_stack(3, 32, 32, rank=4)
    for layer in stack:
        torch.nn.init.normal_(layer.up, std=0.1)

    def run(x):
        for layer in stack:
            x = F.gelu(layer(x))
        return x

    x = torch.randn(4, 7, 32)
    eager = run(x)
    compiled = torch.compile(run, fullgraph=True)(x)
    assert_close(compiled, eager.double(), torch.float32, "compiled")
    compiled.sum().backward()
    grad_compiled = stack[0].shared.weight.grad.clone()
    stack.zero_grad()
    run(x).sum().backward()
    assert_close(grad_compiled, stack[0].shared.weight.grad.double(), torch.float32, "compiled dshared")


BAD_INPUTS = {
    "in_mismatch": (lambda x, w, d, u, b: (x[:, :-1], w, d, u, b), ValueError, "input features"),
    "down_in": (lambda x, w, d, u, b: (x, w, d[:, :-1], u, b), ValueError, "down"),
    "up_rank": (lambda x, w, d, u, b: (x, w, d, u[:, :-1], b), ValueError, "up"),
    "up_out": (lambda x, w, d, u, b: (x, w, d, u[:-1], b), ValueError, "up"),
    "bias_size": (lambda x, w, d, u, b: (x, w, d, u, b[:-1]), ValueError, "bias"),
    "weight_3d": (lambda x, w, d, u, b: (x, w[None], d, u, b), ValueError, "weight must be 2-D"),
    "bias_2d": (lambda x, w, d, u, b: (x, w, d, u, b[None]), ValueError, "bias must be 1-D"),
    "x_scalar": (lambda x, w, d, u, b: (x[0, 0], w, d, u, b), ValueError, "at least one dimension"),
    "dtype_mix": (lambda x, w, d, u, b: (x.double(), w, d, u, b), TypeError, r"one dtype.*weight\.to\(x\.dtype\)"),
    "int_dtype": (lambda x, w, d, u, b: (x.long(), w, d, u, b), TypeError, "dtype torch.int64"),
    "device_mix": (lambda x, w, d, u, b: (x.to("meta"), w, d, u, b), ValueError, "one device"),
    "not_tensor": (lambda x, w, d, u, b: (x, w.tolist(), d, u, b), TypeError, "weight must be a Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(case):
    make, error, message = BAD_INPUTS[case]
    args = make(*make_inputs(4, 8, 6, 2, torch.float32))
    with pytest.raises(error, match=message):
        lk.lors_linear(*args)


def test_env_override_selects_the_route(monkeypatch):
    from lors_kernels import backend
    from lors_kernels.static.op import lors_linear_op

    args = (*make_inputs(4, 8, 6, 2, torch.float32), 1.0)
    monkeypatch.setenv("LORS_KERNELS_BACKEND", "reference")
    assert lors_linear_op.route(*args).backend == "reference"
    monkeypatch.setenv("LORS_KERNELS_BACKEND", "native")
    assert lors_linear_op.route(*args).backend == ("native" if backend.native() is not None else "reference")
    monkeypatch.setenv("LORS_KERNELS_BACKEND", "cuda")  # the native CUDA kernels only: never the CPU one
    assert backend.forced_backend() == "cuda"
    with pytest.raises(RuntimeError, match="backend 'cuda' runs the native CUDA kernels, on CUDA tensors"):
        lors_linear_op.route(*args)
    monkeypatch.delenv("LORS_KERNELS_BACKEND")
    assert lors_linear_op.route(*args).backend == ("native" if backend.native() is not None else "reference")
    big = (*make_inputs(64, 8, 6, 2, torch.float32), 1.0)  # the native CPU kernel wins only small batches
    assert lors_linear_op.route(*big).backend == "reference"


# ------------------------------------------------------------------------------------------ indexed
# lors_linear(..., index=): rows at different layers of one stack.

ROUTES = ["reference", "native", "triton"]


def indexed_call(inputs, ranks=None):
    x, weight, down, up, bias, scaling, index = inputs
    return lk.lors_linear(x, weight, down, up, bias, scaling=scaling, index=index, ranks=ranks)


def check_indexed(inputs, ranks=None, dtype=torch.float32):
    """Forward and every gradient (x, weight, down, up, scaling, bias) against the float64 oracle."""
    for t in inputs[:6]:
        if t is not None:
            t.requires_grad_()
    y = indexed_call(inputs, ranks)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    y.backward(grad)
    y64, expected = indexed_grads64(*inputs, ranks, grad)
    assert_close(y, y64, dtype, "y")
    x, weight, down, up, bias, scaling, _ = inputs
    got = [x.grad, weight.grad, down.grad, up.grad, scaling.grad] + ([bias.grad] if bias is not None else [])
    for name, g, e in zip(["dx", "dweight", "ddown", "dup", "dscaling", "dbias"], got, expected):
        assert_close(g, e.to(g.dtype) if name == "dscaling" else e, g.dtype, name)


def test_indexed_gradcheck_float64(use_backend):
    use_backend("reference")
    x, weight, down, up, bias, scaling, index = make_indexed_inputs(5, 6, 4, 3, 2, torch.float64, lead=(2,))
    inputs = [t.requires_grad_() for t in (x, weight, down, up, bias, scaling.double())]

    def run(x, weight, down, up, bias, scaling):
        return lk.lors_linear(x, weight, down, up, bias, scaling=scaling, index=index, ranks=[2, 1, 0])

    assert torch.autograd.gradcheck(run, inputs)


INDEXED_SIZES = {
    # name: (rows, in, out, layers, rank, how the rows are spread)
    "mixed": (13, 24, 20, 4, 5, "mixed"),
    "one_layer": (6, 24, 20, 1, 5, "mixed"),
    "all_at_layer_2": (9, 24, 20, 4, 5, 2),
    "all_shared_only": (7, 24, 20, 3, 5, -1),
    "no_rows": (0, 24, 20, 3, 5, "mixed"),
    "rank0": (8, 24, 20, 3, 0, "mixed"),
    "in0": (8, 0, 20, 3, 5, "mixed"),
    "out0": (8, 24, 0, 3, 5, "mixed"),
}


@pytest.mark.parametrize("bias", [None, "shared", "layer"], ids=lambda b: f"bias_{b}")
@pytest.mark.parametrize("case", list(INDEXED_SIZES))
@pytest.mark.parametrize("route", ROUTES)
def test_indexed_every_route_and_size(route, case, bias, use_backend):
    use_backend(route)
    m, k, n, layers, r, spread = INDEXED_SIZES[case]
    device = route_device(route)
    inputs = list(make_indexed_inputs(m, k, n, layers, r, torch.float32, device, bias=bias))
    if spread != "mixed":
        inputs[6] = torch.full_like(inputs[6], spread)
    check_indexed(inputs)


@pytest.mark.parametrize("route", ROUTES)
def test_indexed_ranks_cost_their_own_columns(route, use_backend):
    """Layer i reads down[i, :ranks[i]] and up[i, :, :ranks[i]] only: NaN stored beyond stays out."""
    use_backend(route)
    device = route_device(route)
    inputs = list(make_indexed_inputs(17, 24, 20, 4, 6, torch.float32, device))
    ranks = [6, 0, 2, 5]
    with torch.no_grad():
        for i, r in enumerate(ranks):
            inputs[2][i, r:] = float("nan")
            inputs[3][i, :, r:] = float("nan")
    check_indexed(inputs, ranks)


@pytest.mark.parametrize("route", ROUTES)
def test_indexed_layers_are_isolated(route, use_backend):
    """An inf in one layer's pair reaches that layer's rows only, as in the written-out math."""
    use_backend(route)
    device = route_device(route)
    x, weight, down, up, bias, scaling, index = make_indexed_inputs(16, 24, 20, 4, 4, torch.float32, device)
    up[1, 3, 0] = float("inf")
    y = lk.lors_linear(x, weight, down, up, bias, scaling=scaling, index=index)
    assert torch.isfinite(y[index != 1]).all()
    assert not torch.isfinite(y[index == 1]).all()


@pytest.mark.parametrize("route", ROUTES)
def test_indexed_leading_dims_broadcast_index_and_strides(route, use_backend):
    """x [B, T, in] with one layer per sample (index [B, 1]), every operand a strided view."""
    use_backend(route)
    device = route_device(route)
    x, weight, down, up, bias, scaling, _ = make_indexed_inputs(5, 24, 20, 3, 4, torch.float32, device, lead=(4,))
    per_sample = torch.tensor([[2], [-1], [0], [2]], device=device)
    views = (
        x.transpose(0, 1).contiguous().transpose(0, 1),
        weight.t().contiguous().t(),
        down.transpose(1, 2).contiguous().transpose(1, 2),
        up.permute(2, 0, 1).contiguous().permute(1, 2, 0),
        torch.stack([bias, bias], -1)[..., 0],  # every other element
    )
    scaling = torch.stack([scaling, scaling], -1)[:, 0]
    assert not any(t.is_contiguous() for t in (*views, scaling))
    inputs = [*views, scaling, per_sample.expand(4, 5)]
    y = lk.lors_linear(*views, scaling=scaling, index=per_sample)
    assert y.shape == (4, 5, 20)
    assert_close(y, indexed64(*inputs), torch.float32, "y")
    check_indexed(inputs)


def test_indexed_scaling_as_a_number_and_ranks_as_a_list():
    x, weight, down, up, bias, _, index = make_indexed_inputs(9, 16, 12, 3, 4, torch.float32)
    y = lk.lors_linear(x, weight, down, up, bias, scaling=0.5, index=index, ranks=[4, 2, 3])
    expected = indexed64(x, weight, down, up, bias, torch.full((3,), 0.5), index, [4, 2, 3])
    assert_close(y, expected, torch.float32, "y")


@pytest.mark.parametrize("route", ["reference", "triton"])
def test_indexed_opcheck(route, use_backend):
    use_backend(route)
    x, weight, down, up, bias, scaling, index = make_indexed_inputs(7, 12, 10, 3, 3, torch.float32, KERNEL_DEVICE)
    ranks = torch.tensor([3, 1, 0], device=KERNEL_DEVICE)
    for args in ((x, weight, down, up, bias, scaling, index, ranks), (x, weight, down, up, None, scaling, index, None)):
        args = [a.requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
        torch.library.opcheck(torch.ops.lors.lors_linear_indexed.default, args)


def test_indexed_compile_fullgraph():
    x, weight, down, up, bias, scaling, index = make_indexed_inputs(8, 16, 12, 3, 4, torch.float32)
    leaves = [t.requires_grad_() for t in (weight, down, up, bias)]

    def run(x, index):
        return torch.relu(lk.lors_linear(x, weight, down, up, bias, scaling=0.5, index=index)).sum()

    compiled = torch.compile(run, fullgraph=True)(x, index)
    grads = torch.autograd.grad(compiled, leaves)
    eager = run(x, index)
    assert_close(compiled, eager.double(), torch.float32, "compiled")
    for got, want in zip(grads, torch.autograd.grad(eager, leaves)):
        assert_close(got, want.double(), torch.float32, "compiled gradient")


BAD_INDEXED = {
    "index_out_of_range": (
        lambda a: {**a, "index": a["index"] + 3},
        IndexError,
        r"index entries must be -1 .* \[0, 3\)",
    ),
    "index_float": (lambda a: {**a, "index": a["index"].float()}, ValueError, "index must be an int32 or int64"),
    "index_rows": (lambda a: {**a, "index": a["index"][:-1]}, ValueError, "index .* must be x's leading shape"),
    "down_2d": (lambda a: {**a, "down": a["down"][0]}, ValueError, r"down .* must be \[layers, rank, in\]"),
    "up_layers": (lambda a: {**a, "up": a["up"][:-1]}, ValueError, r"up .* must be \[layers, out, rank\]"),
    "bias_layers": (lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, r"bias .* must be \[out\]"),
    "scaling_length": (lambda a: {**a, "scaling": a["scaling"][:-1]}, ValueError, r"scaling must be .* \[layers\]"),
    "ranks_above_r": (lambda a: {**a, "ranks": [4, 5, 1]}, IndexError, r"ranks must be in \[0, 4\]"),
    "ranks_length": (lambda a: {**a, "ranks": [4, 1]}, ValueError, "ranks must be int32 or int64"),
    "ranks_without_index": (lambda a: {**a, "index": None, "ranks": [1, 1, 1]}, ValueError, "ranks is per layer"),
    "dtype_mix": (lambda a: {**a, "up": a["up"].double()}, TypeError, "one dtype"),
    "index_not_tensor": (lambda a: {**a, "index": [0, 1]}, TypeError, "index must be a Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXED))
def test_indexed_bad_inputs_raise_clear_errors(case):
    make, error, message = BAD_INDEXED[case]
    x, weight, down, up, bias, scaling, index = make_indexed_inputs(6, 8, 5, 3, 4, torch.float32)
    args = make(dict(x=x, weight=weight, down=down, up=up, bias=bias, scaling=scaling, index=index, ranks=None))
    with pytest.raises(error, match=message):
        lk.lors_linear(args.pop("x"), args.pop("weight"), args.pop("down"), args.pop("up"), **args)


def test_indexed_route_follows_the_measured_rule():
    """The native CPU kernel where it measured faster than the reference: fp32 up to 512 rows, bf16 to 64."""
    from lors_kernels import backend

    native = "native" if backend.native() is not None else "reference"

    def route(m, dtype):
        x, weight, down, up, bias, scaling, index = make_indexed_inputs(m, 8, 6, 2, 2, dtype)
        return lk.lors_linear.route(x, weight, down, up, bias, scaling=scaling, index=index).backend

    assert route(32, torch.float32) == route(512, torch.float32) == route(64, torch.bfloat16) == native
    assert route(513, torch.float32) == route(65, torch.bfloat16) == route(4, torch.float64) == "reference"
