"""Static LORS: reference, Triton kernels, custom op, modules, errors and AOT compilation."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA, KERNEL_DEVICE, KERNEL_DTYPES, RTOL, assert_close, dtype_id

import lors_kernels as lk
from lors_kernels.lors_linear import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def dense64(x, weight, down, up, bias, scaling):
    """Independent oracle: materialize W + s * up @ down in float64 and apply it densely."""
    w = weight.double() + scaling * up.double() @ down.double()
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def make_inputs(m, k, n, r, dtype, device="cpu", bias=True, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rand(*lead, m, k)
    weight = rand(n, k, scale=max(k, 1) ** -0.5)
    down = rand(r, k, scale=max(k, 1) ** -0.5)
    up = rand(n, r, scale=max(r, 1) ** -0.5)
    b = rand(n) if bias else None
    return x, weight, down, up, b


def grads64(x, weight, down, up, bias, scaling, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, down, up)]
    b = bias.detach().double().requires_grad_() if bias is not None else None
    y = dense64(*leaves, b, scaling)
    y.backward(grad_out.double())
    return y.detach(), [t.grad for t in leaves] + ([b.grad] if b is not None else [])


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("m,k,n,r", [(1, 33, 17, 4), (7, 64, 48, 8), (300, 40, 24, 16), (5, 16, 16, 0)],
                         ids=lambda v: str(v))
def test_reference_forward_matches_float64(m, k, n, r, dtype):
    x, weight, down, up, bias = make_inputs(m, k, n, r, dtype)
    y = reference.lors_linear(x, weight, down, up, bias, 0.5)
    assert_close(y, dense64(x, weight, down, up, bias, 0.5), dtype, "y")


def test_reference_takes_both_paths():
    # Small M stays factored; large M materializes W_eff because that is cheaper: both are exact.
    assert not reference.materialize_is_cheaper(16, 1024, 1024, 8)
    assert reference.materialize_is_cheaper(4096, 1024, 1024, 8)


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("m,r", [(0, 4), (1, 1), (9, 8), (40, 0)], ids=lambda v: str(v))
def test_reference_backward_formulas(m, r, has_bias):
    x, weight, down, up, bias = make_inputs(m, 21, 13, r, torch.float64, bias=has_bias)
    grad = torch.randn(m, 13, dtype=torch.float64)
    _, expected = grads64(x, weight, down, up, bias, 0.3, grad)
    dx, dweight, ddown, dup, dbias = reference.lors_linear_backward(grad, x, weight, down, up, 0.3, has_bias, True)
    got = [dx, dweight, ddown, dup] + ([dbias] if has_bias else [])
    for name, a, e in zip(["dx", "dweight", "ddown", "dup", "dbias"], got, expected):
        assert_close(a, e, torch.float64, name)


def test_gradcheck_op_float64(use_backend):
    use_backend("reference")
    x, weight, down, up, bias = make_inputs(3, 7, 5, 2, torch.float64, lead=(2,))
    inputs = [t.requires_grad_() for t in (x, weight, down, up, bias)]
    assert torch.autograd.gradcheck(lambda *a: lk.lors_linear(*a, scaling=0.7), inputs)


# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("r", [0, 1, 8, 24, 80], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("m", [0, 1, 5, 64, 300], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_triton_forward_backward(dtype, m, r, has_bias, use_backend):
    """Every path: fused shrink (M <= 256), K-extended (M = 300), ranks above the fused limit (80)."""
    use_backend("triton")
    k, n = (37, 29) if not CUDA else (200, 136)
    x, weight, down, up, bias = make_inputs(m, k, n, r, dtype, KERNEL_DEVICE, bias=has_bias)
    leaves = [t.requires_grad_() for t in (x, weight, down, up) + ((bias,) if has_bias else ())]
    y = lk.lors_linear(x, weight, down, up, bias, scaling=0.7)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad)
    y64, expected = grads64(x, weight, down, up, bias, 0.7, grad)
    assert_close(y, y64, dtype, "y")
    for name, leaf, e in zip(["dx", "dweight", "ddown", "dup", "dbias"], leaves, expected):
        assert_close(leaf.grad, e, dtype, name)


@pytest.mark.parametrize("m,k,n,r", [(4, 32, 0, 4), (4, 0, 6, 3), (0, 0, 6, 2), (3, 5, 6, 0)],
                         ids=["out0", "in0", "rows0_in0", "rank0"])
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


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_triton_leading_dims_and_noncontiguous(dtype, use_backend):
    use_backend("triton")
    _, weight, down, up, bias = make_inputs(1, 24, 20, 8, dtype, KERNEL_DEVICE)
    base = torch.randn(24, 3, 10, device=KERNEL_DEVICE).to(dtype)
    for x in (base.permute(1, 2, 0), base[:, 0].t(), base.permute(1, 2, 0)[:, ::2]):
        assert not x.is_contiguous()
        x = x.detach().requires_grad_()
        y = lk.lors_linear(x, weight, down, up, bias, scaling=2.0)
        assert y.shape == (*x.shape[:-1], 20)
        assert_close(y, dense64(x, weight, down, up, bias, 2.0), dtype, "y")
        y.sum().backward()
        _, expected = grads64(x, weight, down, up, bias, 2.0, torch.ones(y.shape, dtype=torch.float64))
        assert_close(x.grad, expected[0], dtype, "dx")


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("m,k,n", [(300, 520, 8), (8, 700, 40)], ids=["thin_n", "thin_m"])
def test_triton_split_k_products(m, k, n, split_k):
    """Plain products split their K loop over programs (fp32 slices summed afterwards): the same sums,
    bitwise the same on every run; a split count that whole K blocks cannot fill takes fewer splits."""
    from lors_kernels.lors_linear import triton as kernels

    g = torch.Generator().manual_seed(4)
    a = torch.randn(m, k, generator=g).to(KERNEL_DEVICE)
    b = (torch.randn(n, k, generator=g) / k ** 0.5).to(KERNEL_DEVICE).t()  # a transposed view, as W^T
    first = kernels.lors_matmul(a, b, torch.empty(m, n, device=KERNEL_DEVICE), split_k=split_k)
    second = kernels.lors_matmul(a, b, torch.empty(m, n, device=KERNEL_DEVICE), split_k=split_k)
    assert torch.equal(first, second)
    assert_close(first, a.double() @ b.double(), torch.float32, f"split_k={split_k}")


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_triton_decode_splits_k_with_t_hoisted(has_bias, use_backend):
    """Decode (M <= 16): T = x down^T first, then the main GEMM's K loop split over programs, the given T
    and the bias added by the first split only; forward and backward against float64."""
    from lors_kernels.lors_linear import triton as kernels

    use_backend("triton")
    launches = []
    original = kernels.triton_utils.launch

    def launch(kernel, grid, *args, **kwargs):
        launches.append(grid)
        return original(kernel, grid, *args, **kwargs)

    kernels.triton_utils.launch = launch
    try:
        x, weight, down, up, bias = make_inputs(4, 1100, 20, 8, torch.float32, KERNEL_DEVICE, bias=has_bias)
        leaves = [t.requires_grad_() for t in (x, weight, down, up) + ((bias,) if has_bias else ())]
        y = lk.lors_linear(x, weight, down, up, bias, scaling=0.6)
    finally:
        kernels.triton_utils.launch = original
    assert [grid[0] for grid in launches] == [4, 4]  # T, then the main GEMM: one tile each, 4 K splits
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y)
    y.backward(grad)
    y64, expected = grads64(x, weight, down, up, bias, 0.6, grad)
    assert_close(y, y64, torch.float32, "y")
    for name, leaf, e in zip(["dx", "dweight", "ddown", "dup", "dbias"], leaves, expected):
        assert_close(leaf.grad, e, torch.float32, name)


def test_configs_follow_the_shape():
    """128 x 128 tiles only where they give every SM a program; thin products get narrow tiles, and split
    their K loop until the grid covers the SMs twice."""
    from lors_kernels.lors_linear.triton import k_splits, pick_config

    assert pick_config(256, 4096, torch.bfloat16, 132)[:2] == (64, 64)  # 2 x 32 = 64 tiles of 128: too few
    assert pick_config(4096, 4096, torch.bfloat16, 132)[:2] == (128, 128)
    assert pick_config(4096, 8, torch.bfloat16, 132)[:2] == (128, 16)  # T = x down^T at rank 8
    assert k_splits(32, 4096, 64, 132) == 9  # 32 tiles x 9 splits >= 264 programs; 16 K blocks per split
    assert k_splits(32, 512, 64, 132) == 2  # K too short to split further
    assert k_splits(1024, 4096, 64, 132) == 1


@pytest.mark.parametrize("m", [5, 300], ids=["fused", "k_extended"])
def test_triton_strided_bias(m, use_backend):
    """A bias that is a strided view (b[::3]) is read by its stride, not as if it were dense."""
    use_backend("triton")
    x, weight, down, up, _ = make_inputs(m, 24, 20, 4, torch.float32, KERNEL_DEVICE)
    bias = torch.randn(60, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE)[::3]
    assert bias.stride() == (3,)
    assert_close(lk.lors_linear(x, weight, down, up, bias), dense64(x, weight, down, up, bias, 1.0),
                 torch.float32, "y")


def test_triton_only_input_grad_or_only_weight_grad(use_backend):
    use_backend("triton")
    x, weight, down, up, bias = make_inputs(6, 16, 12, 4, torch.float32, KERNEL_DEVICE)
    weight.requires_grad_()
    lk.lors_linear(x, weight, down, up, bias).sum().backward()  # x needs no grad: dx is skipped
    _, expected = grads64(x, weight, down, up, bias, 1.0, torch.ones(6, 12, dtype=torch.float64))
    assert_close(weight.grad, expected[1], torch.float32, "dweight")
    assert x.grad is None and down.grad is None


@pytest.mark.skipif(not CUDA, reason="tf32 only exists on GPUs")
def test_triton_fp32_respects_matmul_precision(use_backend):
    use_backend("triton")
    x, weight, down, up, bias = make_inputs(512, 1024, 512, 8, torch.float32, "cuda")
    expected = dense64(x, weight, down, up, bias, 1.0)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert_close(lk.lors_linear(x, weight, down, up, bias), expected, torch.float32, "ieee")
        torch.set_float32_matmul_precision("high")
        y = lk.lors_linear(x, weight, down, up, bias)
        assert 1e-6 < (y.double() - expected).norm() / expected.norm() < 1e-3  # tf32 was used, and is close
    finally:
        torch.set_float32_matmul_precision(previous)


# --------------------------------------------------------------------------------------- shared weight


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_shared_weight_gradient_is_sum_over_layers(backend_name, use_backend):
    use_backend(backend_name)
    torch.manual_seed(0)
    stack = lk.make_lors_stack(3, 16, 16, rank=4, groups=[1, 2, 3]).to(KERNEL_DEVICE)
    for layer in stack:
        torch.nn.init.normal_(layer.up)
    x = torch.randn(5, 16, device=KERNEL_DEVICE)
    h = x
    for layer in stack:
        h = torch.tanh(layer(h))
    h.square().sum().backward()
    shared = stack[0].shared.weight

    # The same network with three independent float64 copies of the shared weight.
    copies = [shared.detach().double().clone().requires_grad_() for _ in stack]
    h = x.double()
    for w, layer in zip(copies, stack):
        h = torch.tanh(dense64(h, w, layer.down, layer.up, layer.bias, layer.scaling))
    h.square().sum().backward()
    expected = sum(w.grad for w in copies)
    assert all(layer.shared is stack[0].shared for layer in stack)
    assert_close(shared.grad, expected, torch.float32, "dshared")


# ------------------------------------------------------------------------------- custom op and compile


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_opcheck(backend_name, use_backend):
    use_backend(backend_name)
    x, weight, down, up, bias = make_inputs(5, 12, 10, 3, torch.float32, KERNEL_DEVICE, lead=(2,))
    for args in ((x, weight, down, up, bias, 0.5), (x, weight, down, up, None, 2.0)):
        args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(torch.ops.lors.lors_linear.default, args)
    grad = torch.randn(2, 5, 10, device=KERNEL_DEVICE)
    for needs in ([True] * 5, [False, True, True, True, True]):
        torch.library.opcheck(torch.ops.lors.lors_linear_backward.default,
                              ([grad], [], needs, x.detach(), weight.detach(), down.detach(), up.detach(),
                               bias.detach(), 0.5))


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


# ------------------------------------------------------------------------------------------ bad inputs

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


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown lors_kernels backend"):
        lk.set_backend("fast")


def test_env_override_selects_the_route(monkeypatch):
    from lors_kernels import backend
    from lors_kernels.lors_linear.op import lors_linear_op

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


# -------------------------------------------------------------------------------------------- modules


def test_lors_linear_init_follows_the_paper():
    torch.manual_seed(0)
    layer = lk.LorsLinear(64, 32, rank=4, groups=2)
    assert layer.down.shape == (8, 64) and layer.up.shape == (32, 8) and layer.bias.shape == (32,)
    assert layer.up.abs().sum() == 0 and layer.bias.abs().sum() == 0
    bound = math.sqrt(6 / 64)  # the official kaiming_uniform_(a=0) on fan_in 64
    assert layer.down.abs().max() <= bound and layer.down.abs().max() > 0.9 * bound
    assert abs(layer.down.std() / (bound / math.sqrt(3)) - 1) < 0.1  # U(-b, b) has std b / sqrt(3)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.shared.weight))  # zero residual at init


def test_lors_linear_is_a_drop_in_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    layer = lk.LorsLinear.from_linear(linear, rank=4)
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(layer(x), linear(x))
    assert (layer.in_features, layer.out_features) == (24, 16)
    torch.nn.init.normal_(layer.up)
    assert layer.weight.shape == linear.weight.shape
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert "rank=4" in repr(layer) and "in_features=24" in repr(layer)
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = linear.weight  # the effective weight is read-only


def test_from_linear_with_a_shared_weight_absorbs_the_residual():
    torch.manual_seed(0)
    shared = lk.SharedWeight(20, 12)
    residual = torch.randn(12, 3) @ torch.randn(3, 20)  # rank 3
    linear = torch.nn.Linear(20, 12)
    with torch.no_grad():
        linear.weight.copy_(shared.weight + residual)
    layer = lk.LorsLinear.from_linear(linear, shared=shared, rank=3, scaling=0.5)
    assert layer.shared is shared
    x = torch.randn(6, 20)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_dtype_moves():
    torch.manual_seed(0)
    stack = lk.make_lors_stack(2, 8, 8, rank=2)
    for layer in stack:
        torch.nn.init.normal_(layer.up)
    clone = lk.make_lors_stack(2, 8, 8, rank=2)
    clone.load_state_dict(stack.state_dict())
    x = torch.randn(3, 8)
    for a, b in zip(stack, clone):
        torch.testing.assert_close(a(x), b(x))
    assert clone[0].shared is clone[1].shared
    half = clone.to(torch.float64)
    assert half[0].shared.weight.dtype == torch.float64 and half[1].down.dtype == torch.float64
    assert half[0](x.double()).dtype == torch.float64
    # The shared weight is one parameter of the stack, counted once.
    assert sum(p.numel() for p in stack.parameters()) == 64 + 2 * (2 * 8 + 8 * 2 + 8)


def test_make_lors_stack_groups_and_errors():
    stack = lk.make_lors_stack(3, 10, 6, rank=2, groups=[1, 2, 4], bias=False)
    assert [layer.down.shape[0] for layer in stack] == [2, 4, 8]
    assert all(layer.bias is None for layer in stack)
    with pytest.raises(ValueError, match="2 group counts given for 3 layers"):
        lk.make_lors_stack(3, 10, 6, groups=[1, 2])
    with pytest.raises(ValueError, match="shared weight"):
        lk.LorsLinear(10, 7, shared=stack[0].shared)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine can run every backend")
def test_env_warns_when_the_forced_backend_cannot_run(monkeypatch):
    from lors_kernels import backend

    monkeypatch.setenv("LORS_KERNELS_BACKEND", "cuda")
    assert "warning     backend 'cuda' is forced but cannot run here" in backend.env_report()
    monkeypatch.setenv("LORS_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1 is not set" in backend.env_report()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "warning" not in backend.env_report()
    monkeypatch.setenv("LORS_KERNELS_BACKEND", "reference")
    assert "warning" not in backend.env_report()


def test_cli_env_reports_versions():
    out = subprocess.run([sys.executable, "-m", "lors_kernels", "env"], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout and "usable" in out.stdout and "reference" in out.stdout


# ------------------------------------------------------------------------------ ahead-of-time compiling


def aot_cases():
    """Every launch dispatch can make: each dtype, M bucket, rank regime, bias, dx choice and fp32 mode."""
    from lors_kernels.lors_linear import triton as kernels

    for dtype, precision in [(torch.float32, "highest"), (torch.float32, "high"), (torch.float16, "highest"),
                             (torch.bfloat16, "highest")]:
        torch.set_float32_matmul_precision(precision)
        for m, n in ((1, 256), (64, 256), (256, 256), (4096, 256), (16, 4096), (256, 4096), (4096, 4096)):
            for r in (0, 8, 128):
                x, weight, down, up, bias = make_inputs(m, 512, n, r, dtype, "meta")
                for b in (bias, None):
                    kernels.lors_linear_forward(x, weight, down, up, b, 0.5)
                    for needs_x in (True, False):
                        grad = torch.empty(m, n, device="meta", dtype=dtype)
                        kernels.lors_linear_backward(grad, x, weight, down, up, 0.5, b is not None, needs_x)


def test_aot_compiles_for_sm80_and_sm90():
    from aot import SHARED_LIMIT, compile_cases

    report = compile_cases(__name__.rsplit(".", 1)[-1])
    errors = [f"{e['launch']} sm_{e['capability']}: {e['error']}" for e in report if "error" in e]
    assert not errors, "\n".join(errors)
    assert len(report) >= 2 * 20, "fewer launches than the dispatch paths imply"
    for entry in report:
        assert entry["shared"] <= SHARED_LIMIT[entry["capability"]], entry
    # Hopper, 16-bit: no launch spills registers, and every tile of 64 rows or more runs on wgmma (decode
    # tiles of 16 rows are below wgmma's 64 and take mma.sync: they are bound by reading W). fp32 dots
    # run on the FMA units (IEEE) or tf32 mma.sync and spill 8-60 bytes in about ten configurations,
    # depending on the Triton version.
    hopper = [e for e in report if e["capability"] == 90 and "DOT_DTYPE=fp32" not in e["launch"]]
    assert hopper and not [e["launch"] for e in hopper if e["spills"]]
    wide = [e for e in hopper if "BLOCK_M=16," not in e["launch"]]
    assert wide and all(e["wgmma"] for e in wide), [e["launch"] for e in wide if not e["wgmma"]]
