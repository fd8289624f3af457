"""The CPU kernel of lors_kernels._C (csrc/cpu/static.cpp) against the float64 oracle, and csrc/cpu as
plain C++17."""

import subprocess

import pytest
import torch
from helpers import CXX, ROOT, dtype_id, rel_err

from lors_kernels import backend

from .oracle import dense64

C = backend.native()
native = pytest.mark.skipif(
    C is None, reason="lors_kernels._C is not built (pip install --no-build-isolation -e . builds it)"
)

SCALING = 0.75
# Relative-norm error allowed against float64: fp32 accumulation, and bf16 inputs rounded once on output.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make(m, n, k, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    return (
        rand(m, k),
        rand(n, k, scale=k**-0.5 if k else 1.0),
        rand(r, k, scale=k**-0.5 if k else 1.0),
        rand(n, r, scale=max(r, 1) ** -0.5),
        rand(n) if bias else None,
    )


def check(x, weight, down, up, bias, scaling=SCALING):
    y = C.lors_linear_forward_cpu(x, weight, down, up, bias, scaling)
    assert y.shape == (x.shape[0], weight.shape[0]) and y.dtype == x.dtype and y.is_contiguous()
    err = rel_err(y, dense64(x, weight, down, up, bias, scaling))
    assert err <= RTOL[x.dtype], f"relative error {err:.2e} > {RTOL[x.dtype]:.0e}"
    return y


@native
def test_built_backends():
    backends = C.built_backends()
    assert "cpu" in backends
    assert set(backends) <= {"cpu", "cuda"}


@native
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("r", [0, 1, 8, 24], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("m", [0, 1, 5, 16, 33], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_matches_float64(dtype, m, r, bias):
    check(*make(m, 29, 37, r, dtype, bias=bias))


# K over one 1024-element chunk with a ragged last chunk, weight rows not a multiple of the 4-row
# block, M over 4 (bf16 weight widened once per chunk), and the big decode shape.
@native
@pytest.mark.parametrize(
    "m,n,k,r",
    [
        pytest.param(*shape, id="M{}-N{}-K{}-R{}".format(*shape))
        for shape in [(3, 7, 1100, 5), (2, 130, 2049, 16), (6, 9, 2100, 3), (16, 1024, 1024, 32)]
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_larger_shapes(dtype, m, n, k, r):
    check(*make(m, n, k, r, dtype))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_empty_reduction_gives_bias(dtype):
    x, weight, down, up, bias = make(4, 9, 0, 3, dtype)
    y = C.lors_linear_forward_cpu(x, weight, down, up, bias, SCALING)
    assert torch.equal(y, bias.expand(4, 9))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_non_contiguous_inputs(dtype):
    m, n, k, r = 5, 29, 37, 8
    x, weight, down, up, bias = make(m, n, k, r, dtype)
    x_t = x.t().contiguous().t()  # a transposed view: strides (1, m)
    weight_t = weight.t().contiguous().t()
    up_sliced = torch.stack([up, up], dim=-1)[..., 0]  # a strided view: strides (2R, 2)
    assert not (x_t.is_contiguous() or weight_t.is_contiguous() or up_sliced.is_contiguous())
    y = check(x_t, weight_t, down, up_sliced, bias)
    assert torch.equal(y, C.lors_linear_forward_cpu(x, weight, down, up, bias, SCALING)), "differs from dense inputs"


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_bitwise_independent_of_thread_count(dtype):
    # Large enough that the kernel really splits the work over the threads it is given.
    args = make(5, 203, 301, 8, dtype)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(C.lors_linear_forward_cpu(*args, SCALING))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(results[0], y) for y in results[1:]), "results depend on the thread count"


@native
def test_bf16_rounds_to_nearest_even():
    # K = 1, weight 1, R = 0: y = x + bias exactly in fp32, so the only rounding is the final one.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, generator=g).to(torch.bfloat16)
    bias = (torch.randn(64, generator=g) * 2**-6).to(torch.bfloat16)
    weight, down, up = (
        torch.ones(64, 1, dtype=torch.bfloat16),
        torch.empty(0, 1, dtype=torch.bfloat16),
        torch.empty(64, 0, dtype=torch.bfloat16),
    )
    y = C.lors_linear_forward_cpu(x, weight, down, up, bias, SCALING)
    assert torch.equal(y, (x.float() + bias.float()).to(torch.bfloat16))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_nan_propagates(dtype):
    x, weight, down, up, bias = make(2, 9, 11, 2, dtype)
    x[1, 3] = float("nan")
    y = C.lors_linear_forward_cpu(x, weight, down, up, bias, SCALING)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


def _bad_inputs():
    x, weight, down, up, bias = make(4, 6, 5, 3, torch.float32)
    yield "x2-1d", (x[0], weight, down, up, bias), ValueError, "x2 must be 2-D"
    yield "weight-in", (x, weight[:, :4], down, up, bias), ValueError, r"weight \[6, 4\]"
    yield "down-in", (x, weight, down[:, :4], up, bias), ValueError, r"down \[3, 4\]"
    yield "up-rank", (x, weight, down, up[:, :2], bias), ValueError, r"up \[6, 2\] must be \[N, R\] = \[6, 3\]"
    yield "up-out", (x, weight, down, up[:5], bias), ValueError, r"up \[5, 3\]"
    yield "bias-len", (x, weight, down, up, bias[:5]), ValueError, r"bias \[5\] must be \[N\] = \[6\]"
    yield "bias-2d", (x, weight, down, up, bias[None]), ValueError, r"bias \[1, 6\]"
    yield "mixed-dtype", (x, weight.bfloat16(), down, up, bias), TypeError, "weight has dtype BFloat16 but x2 has Float"
    yield "bias-dtype", (x, weight, down, up, bias.double()), TypeError, "bias has dtype Double"
    yield "float16", tuple(t.half() for t in (x, weight, down, up, bias)), TypeError, "expected Float or BFloat16"
    yield "meta-device", (x.to("meta"), weight, down, up, bias), ValueError, "x2 must be a CPU tensor"


@native
@pytest.mark.parametrize(
    "args,error,match", [case[1:] for case in _bad_inputs()], ids=[case[0] for case in _bad_inputs()]
)
def test_bad_input_raises_clear_error(args, error, match):
    with pytest.raises(error, match=match):
        C.lors_linear_forward_cpu(*args, SCALING)


CPU_SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))


# Needs a compiler, not the built extension.
@pytest.mark.toolchain
@pytest.mark.skipif(CXX is None or not CPU_SOURCES, reason="no C++ compiler on PATH, or no csrc/ beside the tests")
@pytest.mark.parametrize("variant", [[], ["-DLORS_NO_VECTOR_EXT"]], ids=["vector_ext", "portable"])
@pytest.mark.parametrize("openmp", [["-fopenmp"], ["-Wno-unknown-pragmas"]], ids=["openmp", "no_openmp"])
def test_cpu_kernels_are_plain_cxx17(tmp_path, variant, openmp):
    """csrc/cpu compiles without torch headers as warning-free C++17, with or without OpenMP."""
    for source in CPU_SOURCES:
        cmd = [
            CXX,
            "-std=c++17",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-c",
            str(source),
            "-o",
            str(tmp_path / (source.stem + ".o")),
            *variant,
            *openmp,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
