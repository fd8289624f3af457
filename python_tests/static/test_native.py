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


# ------------------------------------------------------------------------------------------ indexed
# lors_linear_indexed_forward_cpu: rows at different layers of a stack (down [L, R, K], up [L, N, R],
# scaling [L], index [M] in [-1, L), ranks [L] or None, bias None, [N] or [L, N]).


def indexed64(x, weight, down, up, bias, scaling, index, ranks):
    """Independent oracle: row by row in float64 (-1: the shared weight alone, and only a bias [N])."""
    x, weight, down, up = (t.double() for t in (x, weight, down, up))
    y = x @ weight.t()
    for m, i in enumerate(index.tolist()):
        if i >= 0:
            r = down.shape[1] if ranks is None else int(ranks[i])
            y[m] += float(scaling[i]) * (x[m] @ down[i, :r].t()) @ up[i, :, :r].t()
        if bias is not None and bias.dim() == 1:
            y[m] += bias.double()
        elif bias is not None and i >= 0:
            y[m] += bias[i].double()
    return y


def make_indexed(m, n, k, layers, r, dtype, index, ranks=None, bias="shared", seed=0):
    """The operands, with NaN stored beyond each layer's rank in down and up: never to be read."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rand(m, k)
    weight = rand(n, k, scale=k**-0.5 if k else 1.0)
    down = rand(layers, r, k, scale=k**-0.5 if k else 1.0)
    up = rand(layers, n, r, scale=max(r, 1) ** -0.5)
    b = {None: None, "shared": rand(n), "per_layer": rand(layers, n)}[bias]
    scaling = torch.rand(layers, generator=g) + 0.5
    if ranks is not None:
        for layer, rank in enumerate(ranks):
            down[layer, rank:] = float("nan")
            up[layer, :, rank:] = float("nan")
        ranks = torch.tensor(ranks, dtype=torch.int64)
    return x, weight, down, up, b, scaling, torch.tensor(index, dtype=torch.int64), ranks


def check_indexed(x, weight, down, up, bias, scaling, index, ranks):
    y = C.lors_linear_indexed_forward_cpu(x, weight, down, up, bias, scaling, index, ranks)
    assert y.shape == (x.shape[0], weight.shape[0]) and y.dtype == x.dtype and y.is_contiguous()
    err = rel_err(y, indexed64(x, weight, down, up, bias, scaling, index, ranks))
    assert err <= RTOL[x.dtype], f"relative error {err:.2e} > {RTOL[x.dtype]:.0e}"
    return y


# (id, M, N, K, L, R, index, ranks)
INDEXED_CASES = [
    ("mixed", 8, 29, 37, 4, 8, [0, 3, 1, 1, 2, 0, 3, 2], None),
    ("sorted-runs", 9, 29, 37, 3, 8, [0, 0, 0, 1, 1, 1, 1, 2, 2], None),
    ("rows-at-minus-1", 6, 29, 37, 3, 8, [-1, 0, -1, 2, 1, -1], None),
    ("all-at-minus-1", 4, 29, 37, 3, 8, [-1, -1, -1, -1], None),
    ("all-at-one-layer", 5, 29, 37, 4, 8, [2, 2, 2, 2, 2], None),
    ("L1", 5, 29, 37, 1, 8, [0, -1, 0, 0, -1], None),
    ("L0", 3, 29, 37, 0, 8, [-1, -1, -1], None),
    ("ranks-below-R", 8, 29, 37, 4, 8, [0, 3, 1, 1, 2, 0, 3, 2], [8, 0, 3, 5]),
    ("ranks-pairs-differ", 6, 29, 37, 2, 8, [0, 0, 1, 1, 0, 1], [2, 7]),
    ("M0", 0, 29, 37, 3, 8, [], None),
    ("R0", 5, 29, 37, 3, 0, [0, 1, -1, 2, 0], None),
    ("odd-M5-N37-K19", 5, 37, 19, 3, 5, [1, 0, 2, -1, 1], [5, 2, 4]),
    ("K0", 4, 9, 0, 2, 3, [0, 1, -1, 1], None),
    # K over one 1024-element chunk, M over 16 (outputs on the heap, bf16 weight widened once).
    ("M20-K1100", 20, 37, 1100, 4, 16, [(7 * i) % 5 - 1 for i in range(20)], [16, 9, 0, 13]),
]


@native
@pytest.mark.parametrize("bias", [None, "shared", "per_layer"], ids=["no_bias", "bias_N", "bias_LN"])
@pytest.mark.parametrize("m,n,k,layers,r,index,ranks", [pytest.param(*case[1:], id=case[0]) for case in INDEXED_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_indexed_matches_float64(dtype, m, n, k, layers, r, index, ranks, bias):
    check_indexed(*make_indexed(m, n, k, layers, r, dtype, index, ranks, bias=bias))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_indexed_one_layer_is_the_plain_kernel(dtype):
    # Every row at the one layer of a stack: the same pass as lors_linear_forward_cpu, bit for bit.
    x, weight, down, up, bias, scaling, index, _ = make_indexed(7, 29, 37, 1, 8, dtype, [0] * 7)
    y = check_indexed(x, weight, down, up, bias, scaling, index, None)
    assert torch.equal(y, C.lors_linear_forward_cpu(x, weight, down[0], up[0], bias, float(scaling[0])))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_indexed_non_contiguous_inputs(dtype):
    args = make_indexed(6, 29, 37, 3, 8, dtype, [2, -1, 0, 1, 1, 0], [8, 3, 5], bias="per_layer")
    x, weight, down, up, bias, scaling, index, ranks = args

    def strided(t):  # the same values through a view with every stride doubled
        return torch.stack([t, t], dim=-1)[..., 0]

    views = (x.t().contiguous().t(), weight.t().contiguous().t(), strided(down), strided(up), strided(bias))
    views += (strided(scaling), strided(index), strided(ranks))
    assert not any(v.is_contiguous() for v in views)
    y = check_indexed(*views)
    assert torch.equal(y, C.lors_linear_indexed_forward_cpu(*args)), "differs from dense inputs"


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_indexed_int32_index_and_ranks(dtype):
    args = make_indexed(6, 29, 37, 3, 8, dtype, [2, -1, 0, 1, 1, 0], [8, 3, 5])
    x, weight, down, up, bias, scaling, index, ranks = args
    y = C.lors_linear_indexed_forward_cpu(x, weight, down, up, bias, scaling, index.int(), ranks.int())
    assert torch.equal(y, C.lors_linear_indexed_forward_cpu(*args))
    # scaling of another float dtype is converted to float32 (exactly, here).
    y = C.lors_linear_indexed_forward_cpu(x, weight, down, up, bias, scaling.double(), index, ranks)
    assert torch.equal(y, C.lors_linear_indexed_forward_cpu(*args))


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_indexed_bitwise_independent_of_thread_count(dtype):
    # Large enough that the kernel really splits the work over the threads it is given.
    index = [(5 * i) % 4 - 1 for i in range(9)]
    args = make_indexed(9, 203, 301, 3, 8, dtype, index, [8, 5, 2], bias="per_layer")
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(C.lors_linear_indexed_forward_cpu(*args))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(results[0], y) for y in results[1:]), "results depend on the thread count"


def _bad_indexed_inputs():
    x, weight, down, up, bias, scaling, index, ranks = make_indexed(4, 6, 5, 3, 2, torch.float32, [0, 2, -1, 1])
    ranks = torch.tensor([2, 1, 0])

    def case(name, error, match, **changes):
        args = dict(x2=x, weight=weight, down=down, up=up, bias=bias, scaling=scaling, index=index, ranks=ranks)
        return name, tuple({**args, **changes}.values()), error, match

    yield case("down-2d", ValueError, r"down must be 3-D \[L, R, K\], got \[2, 5\]", down=down[0])
    yield case("up-2d", ValueError, r"up must be 3-D \[L, N, R\], got \[6, 2\]", up=up[0])
    yield case("down-in", ValueError, r"down \[3, 2, 4\] must be \[L, R, K\] with K = 5", down=down[..., :4])
    yield case("up-rank", ValueError, r"up \[3, 6, 1\] must be \[L, N, R\] = \[3, 6, 2\]", up=up[..., :1])
    yield case("up-layers", ValueError, r"up \[2, 6, 2\] must be \[L, N, R\] = \[3, 6, 2\]", up=up[:2])
    yield case("bias-len", ValueError, r"bias \[5\] must be \[N\] = \[6\] or \[L, N\] = \[3, 6\]", bias=bias[:5])
    yield case("bias-layers", ValueError, r"bias \[2, 6\] must be", bias=bias.expand(2, 6))
    yield case("bias-3d", ValueError, r"bias \[1, 3, 6\] must be", bias=bias.expand(1, 3, 6))
    yield case("scaling-len", ValueError, r"scaling \[2\] must be \[L\] = \[3\]", scaling=scaling[:2])
    yield case("scaling-int", TypeError, "scaling has dtype Long; expected a floating", scaling=scaling.long())
    yield case("index-len", ValueError, r"index \[3\] must be \[M\] = \[4\]", index=index[:3])
    yield case("index-2d", ValueError, r"index \[1, 4\] must be \[M\]", index=index[None])
    yield case("index-float", TypeError, "index has dtype Float; expected Long or Int", index=index.float())
    yield case("index-above-L", ValueError, r"index\[1\] = 3 is outside \[-1, L\)", index=torch.tensor([0, 3, 0, 0]))
    yield case("index-below-minus-1", ValueError, r"index\[0\] = -2 is outside", index=torch.tensor([-2, 0, 0, 0]))
    yield case("ranks-len", ValueError, r"ranks \[2\] must be \[L\] = \[3\]", ranks=ranks[:2])
    yield case("ranks-float", TypeError, "ranks has dtype Float; expected Long or Int", ranks=ranks.float())
    yield case(
        "rank-above-R", ValueError, r"ranks\[2\] = 3 is outside \[0, R\] = \[0, 2\]", ranks=torch.tensor([2, 1, 3])
    )
    yield case("mixed-dtype", TypeError, "down has dtype BFloat16 but x2 has Float", down=down.bfloat16())
    yield case("index-device", ValueError, "index must be a CPU tensor", index=index.to("meta"))


@native
@pytest.mark.parametrize(
    "args,error,match",
    [case[1:] for case in _bad_indexed_inputs()],
    ids=[case[0] for case in _bad_indexed_inputs()],
)
def test_indexed_bad_input_raises_clear_error(args, error, match):
    with pytest.raises(error, match=match):
        C.lors_linear_indexed_forward_cpu(*args)
