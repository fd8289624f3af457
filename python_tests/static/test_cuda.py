"""The static family's CUDA kernel (csrc/cuda/static.cu): dispatch routes CUDA tensors to it when the
backend is forced to native, and only then (a fake extension and fake CUDA tensors); with a GPU and an
extension built with CUDA, lors_linear against float64.
"""

import pytest
import torch
from helpers import GPU_DTYPES, cuda_extension, fake_cuda, fake_native_extension, needs_cuda_extension

import lors_kernels as lk
from lors_kernels import backend

# ---------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def fake_native(monkeypatch):
    """An extension built with CUDA whose lors_linear kernels record their calls; returns (module, calls)."""

    def linear(x2, weight, *_):
        return x2.new_zeros(x2.shape[0], weight.shape[0])

    return fake_native_extension(monkeypatch, lors_linear_forward_cpu=linear, lors_linear_forward_cuda=linear)


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
    m, r, dtype = {
        "rows": (17, 3, torch.float32),
        "rank": (2, 513, torch.float32),
        "float64": (2, 3, torch.float64),
        "not_built": (2, 3, torch.float32),
    }[case]
    if case == "not_built":  # a CPU-only build
        monkeypatch.setattr(module, "built_backends", lambda: ["cpu"])
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
    from lors_kernels.static import triton as kernels
    from lors_kernels.static.op import lors_linear_op

    measured = lors_linear_op.impls[0].wins
    monkeypatch.setattr(measured, "verdicts", {})
    monkeypatch.setattr(measured, "timer", lambda fn, args: (fn(*args), 1.0)[1])
    monkeypatch.setattr(
        kernels,
        "lors_linear_forward",
        lambda x2, w, *_: calls.append(("triton", ())) or x2.new_zeros(x2.shape[0], w.shape[0]),
    )
    lk.lors_linear(*[fake_cuda(t) for t in lors_inputs(2, 3)])
    assert [name for name, _ in calls] == ["triton"] * 2  # timed once, then run


# --------------------------------------------------------------------------------------------- on a GPU

C = cuda_extension()


def lors_oracle(x, weight, down, up, bias, scaling):
    y = x.double() @ (weight.double() + scaling * up.double() @ down.double()).t()
    return y + bias.double() if bias is not None else y


def gpu_lors_inputs(m, n, k, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    return (
        rand(m, k),
        rand(n, k, scale=max(k, 1) ** -0.5),
        rand(r, k, scale=max(k, 1) ** -0.5),
        rand(n, r, scale=max(r, 1) ** -0.5),
        rand(n) if bias else None,
    )


GPU_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def check_lors(x, weight, down, up, bias, scaling=0.75):
    y = C.lors_linear_forward_cuda(x, weight, down, up, bias, scaling)
    assert y.shape == (x.shape[0], weight.shape[0]) and y.dtype == x.dtype
    expected = lors_oracle(x, weight, down, up, bias, scaling).cpu()
    err = ((y.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert err <= GPU_RTOL[x.dtype], f"relative error {err:.2e}"
    return y


@needs_cuda_extension
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize(
    "n,k,r", [(29, 37, 5), (300, 1024, 24), (4096, 4096, 64), (130, 8192, 0), (64, 7, 512)], ids=lambda v: str(v)
)
def test_gpu_lors_linear_matches_float64(n, k, r, m, dtype):
    check_lors(*gpu_lors_inputs(m, n, k, r, dtype))


@needs_cuda_extension
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


@needs_cuda_extension
def test_gpu_lors_linear_is_deterministic():
    args = gpu_lors_inputs(7, 4096, 4096, 32, torch.float32)
    first = C.lors_linear_forward_cuda(*args, 0.75)
    for _ in range(5):
        assert torch.equal(first, C.lors_linear_forward_cuda(*args, 0.75))


@needs_cuda_extension
def test_gpu_lors_linear_forced_native_through_the_public_function(use_backend):
    use_backend("native")
    x, weight, down, up, bias = gpu_lors_inputs(4, 33, 40, 3, torch.float32)
    y = lk.lors_linear(x[None], weight, down, up, bias, scaling=0.75)  # [1, 4, 40]: rows flattened
    assert torch.equal(y[0], C.lors_linear_forward_cuda(x, weight, down, up, bias, 0.75))
