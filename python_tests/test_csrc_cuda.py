"""csrc/cuda, the native CUDA kernels, on any machine and on GPUs.

Without a GPU: every .cu compiles warning-free for sm_80 and sm_90 (nvcc -c, torch's nvcc flags), no
csrc/cuda file includes torch, and the bindings' CUDA paths type-check with the host compiler; the top-k
selection's arithmetic (csrc/cuda/topk_select.h) runs on the host through the kernel's passes against the
reference; dispatch routes CUDA tensors to the native
kernels when the backend is forced to native, and only then (a fake extension and fake CUDA tensors).
With a GPU and an extension built with CUDA: the kernels against the references.
"""

import contextlib
import ctypes
import pathlib
import re
import shutil
import struct
import subprocess
import types

import pytest
import torch
from helpers import fake_cuda
from torch.utils import cpp_extension

import lors_kernels as lk
from lors_kernels import backend
from lors_kernels.hrca import reference as hrca_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("c++") or shutil.which("g++")

# ------------------------------------------------------------------------------------------ compilation


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_without_warnings(source, arch, tmp_path):
    """Compiled as the CUDA build compiles it (torch's nvcc flags: no implicit half conversions)."""
    cmd = [NVCC, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           *cpp_extension.COMMON_NVCC_FLAGS, "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
           str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), result.stderr


def cuda_include_dir():
    """The toolkit's include directory, as nvcc itself passes it (nvcc may be a wrapper script)."""
    dryrun = subprocess.run([NVCC, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True)
    found = re.search(r'INCLUDES="[^"]*?-I([^"\s]+)', dryrun.stdout + dryrun.stderr)
    return found.group(1) if found else None


BINDINGS = sorted((ROOT / "csrc" / "bindings").glob("*.cpp")) + [ROOT / "csrc" / "module.cpp"]


@pytest.mark.skipif(NVCC is None or CXX is None, reason="needs nvcc (for the CUDA headers) and a C++ compiler")
@pytest.mark.parametrize("source", BINDINGS, ids=lambda p: p.name)
def test_bindings_compile_with_the_cuda_path(source):
    """Each binding file with LORS_WITH_CUDA, checked by the host compiler against this torch's headers: the
    CUDA functions' checks and launcher calls type-check even where torch has no CUDA. (The CPU wheel
    lacks one generated c10/cuda header; C10_CUDA_NO_CMAKE_CONFIGURE_FILE is torch's switch to skip it.)"""
    include = cuda_include_dir()
    if include is None:
        pytest.skip("could not find the CUDA include directory in nvcc --dryrun")
    import sysconfig

    system = [include, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [CXX, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-DLORS_WITH_CUDA",
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[flag for path in system for flag in ("-isystem", path)], f"-I{ROOT / 'csrc'}", str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-6000:]}"


def test_cuda_sources_include_no_torch():
    """The kernels stay plain CUDA (nvcc builds them without torch): only csrc/bindings/ sees torch."""
    files = sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
    assert CU_SOURCES and files, f"no CUDA sources under {CUDA_DIR}"
    include = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2)/', re.MULTILINE)
    offenders = [p.name for p in files if include.search(p.read_text())]
    assert not offenders, f"torch headers included by {offenders}"


# ------------------------------------------------------------- top-k arithmetic, run on the host


@pytest.fixture(scope="module")
def topk_host(tmp_path_factory):
    """python_tests/native/topk_host.cpp (csrc/cuda/topk_select.h through the kernel's passes), loaded."""
    if CXX is None:
        pytest.skip("no C++ compiler on PATH")
    library = tmp_path_factory.mktemp("topk_host") / "libtopk_host.so"
    # No contraction: the header's fmaf calls are the only fused operations, as in the kernel.
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-shared", "-fPIC",
           f"-I{ROOT / 'csrc'}", str(pathlib.Path(__file__).parent / "native" / "topk_host.cpp"), "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    lib.lors_order_key.restype = ctypes.c_uint32
    lib.lors_order_key.argtypes = [ctypes.c_float]
    lib.lors_select_topk_host.restype = ctypes.c_uint32
    lib.lors_select_topk_host.argtypes = [ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_int] * 4, ctypes.c_uint32,
                                          ctypes.c_int, ctypes.c_void_p]
    return lib


def host_select(lib, scores, low_hw, high_hw, k, per_query, chunk=1024):
    """The host run over every selection row, shaped like select_topk_pixels' output."""
    b, n, n_low = scores.shape
    rows = scores.float().reshape(b * n, 1, n_low) if per_query else scores.float()
    out = torch.full((rows.shape[0], k), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        row = row.contiguous()
        taken = lib.lors_select_topk_host(row.data_ptr(), row.shape[0], *low_hw, *high_hw, k, chunk,
                                          out[i].data_ptr())
        assert taken == k, f"row {i}: the compaction took {taken} pixels, not k = {k}"
    return out.reshape(b, n, k) if per_query else out


def dyadic_scores(shape, generator, low=-8, high=8):
    """Multiples of 1/8: with power-of-two ratios every upsampled value is exact in fp32, so fp32 and the
    float64 reference agree exactly, ties included (they are frequent)."""
    return torch.randint(low, high, shape, generator=generator).float() / 8


def test_order_key_orders_like_the_floats(topk_host):
    tiny = torch.finfo(torch.float32).tiny
    values = sorted({-float("inf"), -3e38, -1.5, -1.0, -tiny, -tiny / 4, 0.0, tiny / 4, tiny, 1e-30, 1.0, 1.5,
                     3e38, float("inf")} | set(torch.randn(200, generator=torch.Generator().manual_seed(0)).tolist()))
    keys = [topk_host.lors_order_key(v) for v in values]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "keys do not order like the values"
    assert topk_host.lors_order_key(-0.0) == topk_host.lors_order_key(0.0), "-0.0 must tie with +0.0"
    nan, negative_nan = (struct.unpack("<f", struct.pack("<I", bits))[0] for bits in (0x7FC00000, 0xFFC00000))
    assert topk_host.lors_order_key(nan) > topk_host.lors_order_key(float("inf"))
    assert topk_host.lors_order_key(negative_nan) < topk_host.lors_order_key(-float("inf"))


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
        expected = hrca_reference.select_topk_pixels(scores, (lh, lw), (hh, hw), k, per_query=per_query)
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
        assert torch.equal(got, hrca_reference.select_topk_pixels(scores, (12, 16), (96, 128), k)), f"k = {k}"


def test_host_selection_is_a_top_k_for_any_ratio(topk_host):
    """Non-dyadic values and ratios: fp32 and float64 may order near-equal pixels differently, so check
    the property instead: ascending distinct indices, none below an unselected pixel beyond rounding."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(1, 3, 5 * 7, generator=g)
    k = 97
    got = host_select(topk_host, scores, (5, 7), (23, 31), k, False)[0]
    assert torch.equal(got, got.unique()), "indices must be ascending and distinct"
    up = torch.nn.functional.interpolate(scores.double().sum(1).reshape(1, 1, 5, 7), size=(23, 31), mode="bilinear",
                                         align_corners=False).flatten()
    chosen = torch.zeros_like(up, dtype=torch.bool)
    chosen[got] = True
    assert up[chosen].min() >= up[~chosen].max() - 1e-5 * up.abs().max()


def test_host_selection_takes_nan_first(topk_host):
    """A NaN cell makes its pixels NaN: they rank above +inf (positive NaN), as torch.sort ranks NaN."""
    scores = dyadic_scores((1, 1, 16), torch.Generator().manual_seed(2))
    scores[0, 0, 5] = float("nan")
    k = 40
    got = host_select(topk_host, scores, (4, 4), (16, 16), k, True)
    assert torch.equal(got, hrca_reference.select_topk_pixels(scores, (4, 4), (16, 16), k, per_query=True))


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def fake_native(monkeypatch):
    """An extension built with CUDA whose functions record their calls; returns (module, calls)."""
    calls = []

    def recorder(name, result):
        def run(*args):
            calls.append((name, args))
            return result(*args)
        return run

    def linear(x2, weight, *_):
        return x2.new_zeros(x2.shape[0], weight.shape[0])

    module = types.SimpleNamespace(
        built_backends=lambda: ["cpu", "cuda"],
        lors_linear_forward_cpu=recorder("lors_linear_forward_cpu", linear),
        lors_linear_forward_cuda=recorder("lors_linear_forward_cuda", linear),
        select_topk_pixels_cuda=recorder("select_topk_pixels_cuda", lambda *_: torch.zeros(1, dtype=torch.int64)),
    )
    monkeypatch.setattr(backend, "native", lambda: module)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # the launch guard
    return module, calls


def lors_inputs(m, r, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in ((m, 8), (6, 8), (r, 8), (6, r), (6,))]


def test_forced_native_routes_cuda_lors_linear_to_the_cuda_kernel(fake_native, use_backend):
    module, calls = fake_native
    use_backend("native")
    x, weight, down, up, bias = [fake_cuda(t) for t in lors_inputs(4, 3)]
    lk.lors_linear(x, weight, down, up, bias, scaling=0.5)
    assert [name for name, _ in calls] == ["lors_linear_forward_cuda"]
    args = calls[0][1]
    assert args[0].shape == (4, 8) and args[1] is weight and args[4] is bias and args[5] == 0.5


def test_forced_native_keeps_cpu_lors_linear_on_the_cpu_kernel(fake_native, use_backend):
    _, calls = fake_native
    use_backend("native")
    lk.lors_linear(*lors_inputs(4, 3), scaling=0.5)
    assert [name for name, _ in calls] == ["lors_linear_forward_cpu"]


@pytest.mark.parametrize("case", ["rows", "rank", "float64", "not_built"])
def test_forced_native_refuses_what_the_cuda_kernel_does_not_take(case, fake_native, use_backend, monkeypatch):
    module, calls = fake_native
    use_backend("native")
    m, r, dtype = {"rows": (17, 3, torch.float32), "rank": (2, 513, torch.float32),
                   "float64": (2, 3, torch.float64), "not_built": (2, 3, torch.float32)}[case]
    if case == "not_built":  # a CPU-only build has no CUDA functions
        monkeypatch.delattr(module, "lors_linear_forward_cuda")
    with pytest.raises(RuntimeError, match="backend 'native' has no kernel"):
        lk.lors_linear(*[fake_cuda(t) for t in lors_inputs(m, r, dtype)])
    assert not calls


def test_automatic_choice_keeps_cuda_lors_linear_on_triton(fake_native, use_backend, monkeypatch):
    """Never the native decode kernel unless forced; Triton where it measured at least as fast as the
    composite PyTorch path (timed once per shape class: here by a fake timer)."""
    _, calls = fake_native
    use_backend(None)
    if not backend.triton_available():
        pytest.skip("triton is not installed: CUDA tensors would take the reference")
    from lors_kernels.lors_linear import triton as kernels
    from lors_kernels.lors_linear.op import lors_linear_op

    measured = lors_linear_op.impls[0].wins
    monkeypatch.setattr(measured, "verdicts", {})
    monkeypatch.setattr(measured, "timer", lambda fn, args: (fn(*args), 1.0)[1])
    monkeypatch.setattr(kernels, "lors_linear_forward",
                        lambda x2, w, *_: calls.append(("triton", ())) or x2.new_zeros(x2.shape[0], w.shape[0]))
    lk.lors_linear(*[fake_cuda(t) for t in lors_inputs(2, 3)])
    assert [name for name, _ in calls] == ["triton"] * 2  # timed once, then run


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

    monkeypatch.setattr(kernels, "topk_pixels",
                        lambda maps, low, high, k: calls.append(("triton", ())) or torch.zeros(maps.shape[0], k,
                                                                                               dtype=torch.int64))
    lk.select_topk_pixels(fake_cuda(torch.rand(2, 3, 12)), (3, 4), (12, 16), 5)
    assert [name for name, _ in calls] == ["triton"]


# --------------------------------------------------------------------------------------------- on a GPU

C = backend.native() if torch.cuda.is_available() else None
gpu = pytest.mark.skipif(C is None or "cuda" not in C.built_backends(),
                         reason="needs a GPU and lors_kernels._C built with CUDA (LORS_KERNELS_BUILD_CUDA=1)")
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("low,high,k", [((3, 4), (12, 16), 1), ((3, 4), (12, 16), 192), ((5, 3), (40, 24), 77),
                                        ((32, 64), (256, 512), 4096), ((16, 16), (64, 64), 1000)])
def test_gpu_topk_matches_reference(low, high, k, per_query, dtype):
    g = torch.Generator().manual_seed(k)
    scores = dyadic_scores((2, 3, low[0] * low[1]), g)  # multiples of 1/8 below 1: exact in every dtype
    got = C.select_topk_pixels_cuda(scores.to("cuda", dtype), *low, *high, k, per_query)
    expected = hrca_reference.select_topk_pixels(scores, low, high, k, per_query=per_query)
    assert torch.equal(got.cpu(), expected)


@gpu
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


@gpu
def test_gpu_topk_forced_native_through_the_public_function(use_backend):
    use_backend("native")
    scores = dyadic_scores((2, 3, 12), torch.Generator().manual_seed(0))
    got = lk.select_topk_pixels(scores.cuda(), (3, 4), (12, 16), 20)
    assert torch.equal(got.cpu(), hrca_reference.select_topk_pixels(scores, (3, 4), (12, 16), 20))


def lors_oracle(x, weight, down, up, bias, scaling):
    y = x.double() @ (weight.double() + scaling * up.double() @ down.double()).t()
    return y + bias.double() if bias is not None else y


def gpu_lors_inputs(m, n, k, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    return (rand(m, k), rand(n, k, scale=max(k, 1) ** -0.5), rand(r, k, scale=max(k, 1) ** -0.5),
            rand(n, r, scale=max(r, 1) ** -0.5), rand(n) if bias else None)


GPU_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check_lors(x, weight, down, up, bias, scaling=0.75):
    y = C.lors_linear_forward_cuda(x, weight, down, up, bias, scaling)
    assert y.shape == (x.shape[0], weight.shape[0]) and y.dtype == x.dtype
    expected = lors_oracle(x, weight, down, up, bias, scaling).cpu()
    err = ((y.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert err <= GPU_RTOL[x.dtype], f"relative error {err:.2e}"
    return y


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("n,k,r", [(29, 37, 5), (300, 1024, 24), (4096, 4096, 64), (130, 8192, 0), (64, 7, 512)],
                         ids=lambda v: str(v))
def test_gpu_lors_linear_matches_float64(n, k, r, m, dtype):
    check_lors(*gpu_lors_inputs(m, n, k, r, dtype))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_gpu_lors_linear_edges(dtype):
    check_lors(*gpu_lors_inputs(3, 200, 512, 8, dtype, bias=False))
    x, weight, down, up, bias = gpu_lors_inputs(4, 9, 0, 3, dtype)  # K = 0: y = bias
    assert torch.equal(C.lors_linear_forward_cuda(x, weight, down, up, bias, 0.75), bias.expand(4, 9))
    # misaligned rows (element loads instead of 16-byte vectors): weight and down start one element in
    x, weight, down, up, bias = gpu_lors_inputs(5, 70, 264, 6, dtype)
    shifted_w = torch.cat([weight.new_zeros(1), weight.flatten()])[1:].view(70, 264)
    shifted_d = torch.cat([down.new_zeros(1), down.flatten()])[1:].view(6, 264)
    assert shifted_w.data_ptr() % 16 and shifted_d.data_ptr() % 16 and torch.equal(shifted_w, weight)
    check_lors(x, shifted_w, shifted_d, up, bias)


@gpu
def test_gpu_lors_linear_is_deterministic():
    args = gpu_lors_inputs(7, 4096, 4096, 32, torch.float32)
    first = C.lors_linear_forward_cuda(*args, 0.75)
    for _ in range(5):
        assert torch.equal(first, C.lors_linear_forward_cuda(*args, 0.75))


@gpu
def test_gpu_lors_linear_forced_native_through_the_public_function(use_backend):
    use_backend("native")
    x, weight, down, up, bias = gpu_lors_inputs(4, 33, 40, 3, torch.float32)
    y = lk.lors_linear(x[None], weight, down, up, bias, scaling=0.75)  # [1, 4, 40]: rows flattened
    assert torch.equal(y[0], C.lors_linear_forward_cuda(x, weight, down, up, bias, 0.75))
