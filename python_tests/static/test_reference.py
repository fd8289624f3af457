"""static/reference.py: the forward on both of its paths and the backward formulas, against float64."""

import pytest
import torch
from helpers import assert_close, dtype_id

from lors_kernels.static import reference

from .oracle import dense64, grads64, indexed64, indexed_grads64, make_indexed_inputs, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize(
    "m,k,n,r", [(1, 33, 17, 4), (7, 64, 48, 8), (300, 40, 24, 16), (5, 16, 16, 0)], ids=lambda v: str(v)
)
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


# ------------------------------------------------------------------------------------------ indexed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bias", [None, "shared", "layer"], ids=lambda b: f"bias_{b}")
@pytest.mark.parametrize("ranks", [None, [3, 0, 1, 3]], ids=["full_rank", "ranks"])
def test_indexed_reference_matches_float64(ranks, bias, dtype):
    x, weight, down, up, b, scaling, index = make_indexed_inputs(11, 20, 9, 4, 3, dtype, bias=bias)
    ranks = None if ranks is None else torch.tensor(ranks)
    y = reference.lors_linear_indexed(x, weight, down, up, b, scaling, index, ranks)
    assert_close(y, indexed64(x, weight, down, up, b, scaling, index, ranks), dtype, "y")


@pytest.mark.parametrize("bias", [None, "shared", "layer"], ids=lambda b: f"bias_{b}")
@pytest.mark.parametrize("m,layers", [(0, 3), (1, 1), (13, 4), (6, 1)], ids=lambda v: str(v))
def test_indexed_reference_backward_formulas(m, layers, bias):
    x, weight, down, up, b, scaling, index = make_indexed_inputs(m, 21, 13, layers, 4, torch.float64, bias=bias)
    ranks = torch.arange(layers) % 5
    grad = torch.randn(m, 13, dtype=torch.float64)
    _, expected = indexed_grads64(x, weight, down, up, b, scaling, index, ranks, grad)
    dx, dweight, ddown, dup, dbias, dscaling = reference.lors_linear_indexed_backward(
        grad, x, weight, down, up, b, scaling.double(), index, ranks, True
    )
    got = [dx, dweight, ddown, dup, dscaling] + ([dbias] if b is not None else [])
    for name, a, e in zip(["dx", "dweight", "ddown", "dup", "dscaling", "dbias"], got, expected):
        assert_close(a, e, torch.float64, name)


@pytest.mark.parametrize("bias", [None, "shared", "layer"], ids=lambda b: f"bias_{b}")
def test_indexed_export_path_is_the_same_math(bias):
    """What an exported program records (no size read from the data) equals the segment path."""
    x, weight, down, up, b, scaling, index = make_indexed_inputs(9, 12, 7, 3, 4, torch.float64, bias=bias)
    ranks = torch.tensor([4, 1, 0])
    expected = reference.lors_linear_indexed(x, weight, down, up, b, scaling, index, ranks)
    assert_close(reference._masked(x, weight, down, up, b, scaling, index, ranks), expected, torch.float64, "y")
