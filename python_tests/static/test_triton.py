"""static/triton.py: the kernels on every path against float64 (under the interpreter without a GPU),
their configurations, and the ahead-of-time compile for sm_80 and sm_90."""

import pytest
import torch
from helpers import CUDA, KERNEL_DEVICE, KERNEL_DTYPES, RTOL, assert_close, dtype_id, rel_err

import lors_kernels as lk

from .oracle import dense64, grads64, indexed_grads64, make_indexed_inputs, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


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
    from lors_kernels.static import triton as kernels

    g = torch.Generator().manual_seed(4)
    a = torch.randn(m, k, generator=g).to(KERNEL_DEVICE)
    b = (torch.randn(n, k, generator=g) / k**0.5).to(KERNEL_DEVICE).t()  # a transposed view, as W^T
    first = kernels.lors_matmul(a, b, torch.empty(m, n, device=KERNEL_DEVICE), split_k=split_k)
    second = kernels.lors_matmul(a, b, torch.empty(m, n, device=KERNEL_DEVICE), split_k=split_k)
    assert torch.equal(first, second)
    assert_close(first, a.double() @ b.double(), torch.float32, f"split_k={split_k}")


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
def test_triton_decode_splits_k_with_t_hoisted(has_bias, use_backend):
    """Decode (M <= 16): T = x down^T first, then the main GEMM's K loop split over programs, the given T
    and the bias added by the first split only; forward and backward against float64."""
    from lors_kernels.static import triton as kernels

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
    from lors_kernels.static.triton import k_splits, pick_config

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
    assert_close(lk.lors_linear(x, weight, down, up, bias), dense64(x, weight, down, up, bias, 1.0), torch.float32, "y")


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


# ------------------------------------------------------------------------------------------ indexed


@pytest.mark.parametrize("bias", [None, "shared", "layer"], ids=lambda b: f"bias_{b}")
@pytest.mark.parametrize("m,layers,r", [(3, 8, 4), (40, 5, 20), (70, 2, 80), (300, 9, 16)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_triton_indexed_forward_backward(dtype, m, layers, r, bias, use_backend):
    """Tiles holding many layers or one, ranks over several R blocks (80), several row tiles (300)."""
    use_backend("triton")
    k, n = (37, 29) if not CUDA else (200, 136)
    x, weight, down, up, b, scaling, index = make_indexed_inputs(m, k, n, layers, r, dtype, KERNEL_DEVICE, bias=bias)
    ranks = (torch.arange(layers, device=KERNEL_DEVICE) * 7) % (r + 1)
    leaves = [t.requires_grad_() for t in (x, weight, down, up, scaling) + ((b,) if b is not None else ())]
    y = lk.lors_linear(x, weight, down, up, b, scaling=scaling, index=index, ranks=ranks)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad)
    y64, expected = indexed_grads64(x, weight, down, up, b, scaling, index, ranks.cpu(), grad)
    assert_close(y, y64, dtype, "y")
    for name, leaf, e in zip(["dx", "dweight", "ddown", "dup", "dscaling", "dbias"], leaves, expected):
        if name != "dscaling":
            assert_close(leaf.grad, e, leaf.grad.dtype, name)
            continue
        # dscaling_i = sum over layer i's rows of dy . (t up_i^T): a sum of K*N products that can cancel, so
        # its error is relative to the terms, not the result (fp32 at k, n = 200, 136 reached 7.8e-5 of it).
        assert leaf.grad.dtype == torch.float32 and rel_err(leaf.grad, e) <= RTOL[torch.float16], name


def test_triton_indexed_is_bitwise_repeatable_and_reads_the_weight_once(use_backend):
    """No atomics: two runs agree bit for bit. The forward is two launches (the shrink, then one GEMM over
    the shared weight for all rows), whatever the number of layers."""
    from lors_kernels.static import triton as kernels

    use_backend("triton")
    x, weight, down, up, b, scaling, index = make_indexed_inputs(32, 64, 48, 8, 16, torch.float32, KERNEL_DEVICE)
    leaves = [t.requires_grad_() for t in (x, weight, down, up, b, scaling)]
    launches = []
    original = kernels.triton_utils.launch

    def launch(kernel, *args, **kwargs):
        launches.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return original(kernel, *args, **kwargs)

    runs = []
    kernels.triton_utils.launch = launch
    try:
        for _ in range(2):
            launches.clear()
            y = lk.lors_linear(x, weight, down, up, b, scaling=scaling, index=index)
            forward = list(launches)
            runs.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
    finally:
        kernels.triton_utils.launch = original
    assert forward == ["lors_indexed_shrink_kernel", "lors_indexed_matmul_kernel"]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ------------------------------------------------------------------------------ ahead-of-time compiling


def aot_cases():
    """Every launch dispatch can make: each dtype, M bucket, rank regime, bias, dx choice and fp32 mode."""
    from lors_kernels.static import triton as kernels

    for dtype, precision in [
        (torch.float32, "highest"),
        (torch.float32, "high"),
        (torch.float16, "highest"),
        (torch.bfloat16, "highest"),
    ]:
        torch.set_float32_matmul_precision(precision)
        for m, n in ((1, 256), (64, 256), (256, 256), (4096, 256), (16, 4096), (256, 4096), (4096, 4096)):
            for r in (0, 8, 128):
                x, weight, down, up, bias = make_inputs(m, 512, n, r, dtype, "meta")
                for b in (bias, None):
                    kernels.lors_linear_forward(x, weight, down, up, b, 0.5)
                    for needs_x in (True, False):
                        grad = torch.empty(m, n, device="meta", dtype=dtype)
                        kernels.lors_linear_backward(grad, x, weight, down, up, 0.5, b is not None, needs_x)
        # Rows at different layers, every flag on (a bias per layer, ranks) in each dtype and tile bucket; the
        # other flags' branches once, in bf16.
        for m in (1, 64, 4096):
            indexed_launches(m, dtype, "layer", ranks=True)
    torch.set_float32_matmul_precision("highest")
    for bias_kind, ranks in ((None, False), ("shared", False), ("shared", True)):
        indexed_launches(64, torch.bfloat16, bias_kind, ranks)


def indexed_launches(m, dtype, bias_kind, ranks):
    from lors_kernels.static import triton as kernels

    x, weight, down, up, b, scaling, _ = make_indexed_inputs(m, 512, 256, 8, 16, dtype, "meta", bias_kind)
    index = torch.empty(m, device="meta", dtype=torch.int64)
    ranks = torch.empty(8, device="meta", dtype=torch.int64) if ranks else None
    kernels.lors_linear_indexed_forward(x, weight, down, up, b, scaling, index, ranks)
    grad = torch.empty(m, 256, device="meta", dtype=dtype)
    kernels.lors_linear_indexed_backward(grad, x, weight, down, up, b, scaling, index, ranks, True)


def test_aot_compiles_for_sm80_and_sm90():
    from aot import SHARED_LIMIT, compile_cases

    report = compile_cases(__name__)
    errors = [f"{e['launch']} sm_{e['capability']}: {e['error']}" for e in report if "error" in e]
    assert not errors, "\n".join(errors)
    assert len(report) >= 2 * 20, "fewer launches than the dispatch paths imply"
    for entry in report:
        assert entry["shared"] <= SHARED_LIMIT[entry["capability"]], entry
    # Hopper, 16-bit: no launch spills registers, and every tile of 64 rows or more runs on wgmma (decode
    # tiles of 16 rows are below wgmma's 64 and take mma.sync: they are bound by reading W; so are the
    # segment sums of two sides of at most 16, the per-layer scaling gradient). fp32 dots
    # run on the FMA units (IEEE) or tf32 mma.sync and spill 8-60 bytes in about ten configurations,
    # depending on the Triton version.
    hopper = [e for e in report if e["capability"] == 90 and "DOT_DTYPE=fp32" not in e["launch"]]
    assert hopper and not [e["launch"] for e in hopper if e["spills"]]
    wide = [e for e in hopper if "BLOCK_M=16," not in e["launch"] and "BLOCK_P=16," not in e["launch"]]
    assert wide and all(e["wgmma"] for e in wide), [e["launch"] for e in wide if not e["wgmma"]]
