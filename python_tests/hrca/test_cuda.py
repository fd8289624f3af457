"""HRCA's CUDA top-k selection (csrc/cuda/hrca.cu, csrc/cuda/topk_select.h), on any machine and on GPUs.

Without a GPU: the selection's arithmetic runs on the host through the kernel's passes
(python_tests/native/topk_host.cpp) against the reference; dispatch routes CUDA scores to the native
kernel when the backend is forced to native, and only then (a fake extension and fake CUDA tensors).
With a GPU and an extension built with CUDA: the kernel against the reference.
"""

import ctypes
import struct
import subprocess

import pytest
import torch
from helpers import CXX, GPU_DTYPES, ROOT, cuda_extension, fake_cuda, fake_native_extension, needs_cuda_extension

import lors_kernels as lk
from lors_kernels import backend
from lors_kernels.hrca import reference

from .oracle import exact_topk

# ------------------------------------------------------------- top-k arithmetic, run on the host


@pytest.fixture(scope="module")
def topk_host(tmp_path_factory):
    """python_tests/native/topk_host.cpp (csrc/cuda/topk_select.h through the kernel's passes), loaded."""
    if CXX is None:
        pytest.skip("no C++ compiler on PATH")
    library = tmp_path_factory.mktemp("topk_host") / "libtopk_host.so"
    # No contraction: the header's fmaf calls are the only fused operations, as in the kernel.
    cmd = [
        CXX,
        "-std=c++17",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-ffp-contract=off",
        "-shared",
        "-fPIC",
        f"-I{ROOT / 'csrc'}",
        str(ROOT / "python_tests" / "native" / "topk_host.cpp"),
        "-o",
        str(library),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    lib.lors_order_key.restype = ctypes.c_uint32
    lib.lors_order_key.argtypes = [ctypes.c_float]
    lib.lors_select_topk_host.restype = ctypes.c_uint32
    lib.lors_select_topk_host.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        *[ctypes.c_int] * 4,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    return lib


def host_select(lib, scores, low_hw, high_hw, k, per_query, chunk=1024):
    """The host run over every selection row, shaped like select_topk_pixels' output."""
    b, n, n_low = scores.shape
    rows = scores.float().reshape(b * n, 1, n_low) if per_query else scores.float()
    out = torch.full((rows.shape[0], k), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        row = row.contiguous()
        taken = lib.lors_select_topk_host(row.data_ptr(), row.shape[0], *low_hw, *high_hw, k, chunk, out[i].data_ptr())
        assert taken == k, f"row {i}: the compaction took {taken} pixels, not k = {k}"
    return out.reshape(b, n, k) if per_query else out


def dyadic_scores(shape, generator, low=-8, high=8):
    """Multiples of 1/8: with power-of-two ratios every upsampled value is exact in fp32, so fp32 and the
    float64 reference agree exactly, ties included (they are frequent)."""
    return torch.randint(low, high, shape, generator=generator).float() / 8


def test_order_key_orders_like_the_floats(topk_host):
    tiny = torch.finfo(torch.float32).tiny
    values = sorted(
        {-float("inf"), -3e38, -1.5, -1.0, -tiny, -tiny / 4, 0.0, tiny / 4, tiny, 1e-30, 1.0, 1.5, 3e38, float("inf")}
        | set(torch.randn(200, generator=torch.Generator().manual_seed(0)).tolist())
    )
    keys = [topk_host.lors_order_key(v) for v in values]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "keys do not order like the values"
    assert topk_host.lors_order_key(-0.0) == topk_host.lors_order_key(0.0), "-0.0 must tie with +0.0"
    nan, negative_nan = (struct.unpack("<f", struct.pack("<I", bits))[0] for bits in (0x7FC00000, 0xFFC00000))
    assert topk_host.lors_order_key(nan) > topk_host.lors_order_key(float("inf"))
    assert topk_host.lors_order_key(negative_nan) == topk_host.lors_order_key(nan), "every NaN ranks first"


@pytest.mark.parametrize("chunk", [1, 7, 1024], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
def test_host_selection_matches_reference(topk_host, per_query, chunk):
    """Random maps, power-of-two ratios (exact values, many ties), k from 1 to every pixel."""
    g = torch.Generator().manual_seed(7 + chunk)
    for trial in range(40):
        lh, lw = torch.randint(1, 6, (2,), generator=g).tolist()
        ratio = (1, 2, 4, 8)[trial % 4]
        hh, hw = lh * ratio, lw * ratio
        k = hh * hw if trial % 10 == 0 else int(torch.randint(1, hh * hw + 1, (1,), generator=g))
        scores = dyadic_scores((2, 3, lh * lw), g)
        got = host_select(topk_host, scores, (lh, lw), (hh, hw), k, per_query, chunk)
        expected = reference.select_topk_pixels(scores, (lh, lw), (hh, hw), k, per_query=per_query)
        assert torch.equal(got, expected), f"trial {trial}: {lh}x{lw} -> {hh}x{hw}, k = {k}"


def test_host_selection_border_plateau_ties_go_to_the_lower_index(topk_host):
    scores = torch.tensor([[[0.1, 0.2, 0.3, 0.7]]])
    assert host_select(topk_host, scores, (2, 2), (16, 16), 5, False).tolist() == [[204, 205, 206, 207, 220]]


def test_host_selection_spans_many_chunks_and_digits(topk_host):
    """A 96 x 128 map (12 compaction chunks) of values spread over many exponents: all 4 passes matter."""
    g = torch.Generator().manual_seed(3)
    scores = dyadic_scores((1, 4, 12 * 16), g) * 2.0 ** torch.randint(-20, 20, (1, 4, 12 * 16), generator=g)
    for k in (1, 100, 1000, 96 * 128 - 1):
        got = host_select(topk_host, scores, (12, 16), (96, 128), k, False)
        assert torch.equal(got, reference.select_topk_pixels(scores, (12, 16), (96, 128), k)), f"k = {k}"


def test_host_selection_is_a_top_k_for_any_ratio(topk_host):
    """Non-dyadic values and ratios: fp32 and float64 may order near-equal pixels differently, so check
    the property instead: ascending distinct indices, none below an unselected pixel beyond rounding."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(1, 3, 5 * 7, generator=g)
    k = 97
    got = host_select(topk_host, scores, (5, 7), (23, 31), k, False)[0]
    assert torch.equal(got, got.unique()), "indices must be ascending and distinct"
    up = torch.nn.functional.interpolate(
        scores.double().sum(1).reshape(1, 1, 5, 7), size=(23, 31), mode="bilinear", align_corners=False
    ).flatten()
    chosen = torch.zeros_like(up, dtype=torch.bool)
    chosen[got] = True
    assert up[chosen].min() >= up[~chosen].max() - 1e-5 * up.abs().max()


def test_host_selection_takes_nan_first(topk_host):
    """A NaN cell makes its pixels NaN: they rank above +inf (positive NaN), as torch.sort ranks NaN."""
    scores = dyadic_scores((1, 1, 16), torch.Generator().manual_seed(2))
    scores[0, 0, 5] = float("nan")
    k = 40
    got = host_select(topk_host, scores, (4, 4), (16, 16), k, True)
    assert torch.equal(got, reference.select_topk_pixels(scores, (4, 4), (16, 16), k, per_query=True))


@pytest.mark.parametrize("special", ["+inf", "-inf", "+inf,-inf", "-nan"])
def test_host_selection_follows_the_bilinear_sum_through_infinities(topk_host, special):
    """A +inf cell makes every pixel it weighs +inf (they tie: lower index first), +inf meeting -inf
    makes NaN, and a NaN of either sign ranks first: the definition (oracle.exact_topk)."""
    scores = dyadic_scores((1, 2, 16), torch.Generator().manual_seed(3))
    negative_nan = struct.unpack("<f", struct.pack("<I", 0xFFC00000))[0]
    for cell, value in zip((5, 6), special.split(",")):
        scores[0, 0, cell] = negative_nan if value == "-nan" else float(value)
    for per_query in (False, True):
        got = host_select(topk_host, scores, (4, 4), (16, 16), 40, per_query)
        assert torch.equal(got, exact_topk(scores, (4, 4), (16, 16), 40, per_query))


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def fake_native(monkeypatch):
    """An extension built with CUDA whose top-k kernel records its calls; returns (module, calls)."""
    return fake_native_extension(monkeypatch, select_topk_pixels_cuda=lambda *_: torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
def test_forced_native_routes_cuda_topk_to_the_cuda_kernel(per_query, fake_native, use_backend):
    _, calls = fake_native
    use_backend("native")
    scores = fake_cuda(torch.rand(2, 3, 12))
    lk.select_topk_pixels(scores, (3, 4), (12, 16), 5, per_query=per_query)
    assert [name for name, _ in calls] == ["select_topk_pixels_cuda"]
    assert calls[0][1][1:] == (3, 4, 12, 16, 5, per_query)


def test_automatic_choice_keeps_cuda_topk_on_triton(fake_native, use_backend, monkeypatch):
    _, calls = fake_native
    use_backend(None)
    if not backend.triton_available():
        pytest.skip("triton is not installed: CUDA tensors would take the reference")
    from lors_kernels.hrca import triton as kernels

    monkeypatch.setattr(
        kernels,
        "topk_pixels",
        lambda maps, low, high, k: calls.append(("triton", ())) or torch.zeros(maps.shape[0], k, dtype=torch.int64),
    )
    lk.select_topk_pixels(fake_cuda(torch.rand(2, 3, 12)), (3, 4), (12, 16), 5)
    assert [name for name, _ in calls] == ["triton"]


# --------------------------------------------------------------------------------------------- on a GPU

C = cuda_extension()


@needs_cuda_extension
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize(
    "low,high,k",
    [
        ((3, 4), (12, 16), 1),
        ((3, 4), (12, 16), 192),
        ((5, 3), (40, 24), 77),
        ((32, 64), (256, 512), 4096),
        ((16, 16), (64, 64), 1000),
    ],
)
def test_gpu_topk_matches_reference(low, high, k, per_query, dtype):
    g = torch.Generator().manual_seed(k)
    scores = dyadic_scores((2, 3, low[0] * low[1]), g)  # multiples of 1/8 below 1: exact in every dtype
    got = C.select_topk_pixels_cuda(scores.to("cuda", dtype), *low, *high, k, per_query)
    expected = reference.select_topk_pixels(scores, low, high, k, per_query=per_query)
    assert torch.equal(got.cpu(), expected)


@needs_cuda_extension
def test_gpu_topk_per_query_matches_triton_bitwise():
    """Per query the numerics are the Triton kernel's (fp32 taps, fused interpolation): same pixels."""
    scores = torch.randn(2, 5, 7 * 9, device="cuda")
    for k in (1, 50, 600):
        got = C.select_topk_pixels_cuda(scores, 7, 9, 60, 70, k, True)
        saved = backend.set_backend("triton")
        try:
            expected = lk.select_topk_pixels(scores, (7, 9), (60, 70), k, per_query=True)
        finally:
            backend.set_backend(saved)
        assert torch.equal(got, expected), f"k = {k}"


@needs_cuda_extension
def test_gpu_topk_forced_native_through_the_public_function(use_backend):
    use_backend("native")
    scores = dyadic_scores((2, 3, 12), torch.Generator().manual_seed(0))
    got = lk.select_topk_pixels(scores.cuda(), (3, 4), (12, 16), 20)
    assert torch.equal(got.cpu(), reference.select_topk_pixels(scores, (3, 4), (12, 16), 20))
