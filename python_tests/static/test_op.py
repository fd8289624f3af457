"""static/op.py: the op's checks of its inputs, its routes, gradcheck, opcheck, fullgraph compiling and
the backend forced by the environment."""

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_DEVICE, assert_close

import lors_kernels as lk

from .oracle import grads64, make_inputs

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
