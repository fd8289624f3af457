"""Devices, dtypes and tolerances shared by the tests of every op family."""

import typing

import torch

CUDA = torch.cuda.is_available()
# Devices the Triton kernels are tested on: the interpreter on CPU, the real thing on a GPU.
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
# The interpreter's bf16 arithmetic is not faithful (docs/design.md §5): bf16 is tested on GPUs only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Relative-norm error allowed against a float64 reference, by the inputs' dtype.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; a NaN or inf anywhere fails."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.2e} > {RTOL[dtype]:.0e} ({dtype_id(dtype)})"


class Call(typing.NamedTuple):
    run: typing.Callable  # () -> the op's output
    inputs: tuple  # the float tensors it reads


def op_calls(device="cpu", dtype=torch.float32, grad=True, seed=0):
    """One small call of every public op, on fixed inputs: {name: Call}. Float inputs require gradients
    when `grad`; the privates of adaptive mixing are included."""
    import lors_kernels as lk

    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_(grad)

    scores = torch.rand(2, 5, 4 * 8, generator=g).to(device=device, dtype=dtype)
    linear = (rand(37, 64), rand(48, 64, std=0.125), rand(8, 64, std=0.125), rand(48, 8, std=0.35), rand(48))
    bn, groups, p_in, c, p_out, r, k = 6, 2, 8, 16, 12, 4, 2
    mixing = (rand(bn, groups, p_in, c), rand(bn, groups, c, c, std=0.25), rand(bn, groups, p_out, p_in, std=0.35))
    channel = (rand(groups * k, c, r, std=0.25), rand(bn, groups * k, r, r, std=0.5), rand(groups * k, r, c, std=0.5))
    spatial = (rand(groups * k, p_out, r, std=0.5), rand(bn, groups * k, r, r, std=0.5),
               rand(groups * k, r, p_in, std=0.35))
    shape = dict(groups=2, in_channels=4, out_channels=4, in_points=3, out_points=5)
    generation = (rand(2, 3, 16), rand(2 * (16 + 15), 16, std=0.25), rand(2 * (16 + 15)))
    attention = (rand(2, 2, 5, 16), rand(2, 2, 64, 16), rand(2, 2, 64, 16))
    shared = torch.randint(-1, 64, (2, 24), generator=g).to(device)
    per_query = torch.randint(-1, 64, (2, 5, 24), generator=g).to(device)
    return {
        "lors_linear": Call(lambda: lk.lors_linear(*linear, scaling=0.5), linear),
        "adaptive_mixing": Call(lambda: lk.adaptive_mixing(*mixing, channel_private=channel, spatial_private=spatial),
                                mixing + channel + spatial),
        "generate_mixing_weights": Call(lambda: lk.generate_mixing_weights(*generation, **shape)[1], generation),
        "select_windows": Call(lambda: lk.select_windows(scores, (4, 8), (16, 32), 3), (scores,)),
        "select_topk_pixels": Call(lambda: lk.select_topk_pixels(scores, (4, 8), (16, 32), 40, per_query=True),
                                   (scores,)),
        "sparse_cross_attention_shared": Call(lambda: lk.sparse_cross_attention(*attention, shared), attention),
        "sparse_cross_attention_per_query": Call(lambda: lk.sparse_cross_attention(*attention, per_query),
                                                 attention),
    }


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that claims to be on a GPU (cuda:0, or the index set on the class): what dispatch
    looks at, without one. Results of ops on it are FakeCudaTensors too."""

    cuda_index = 0

    @property
    def device(self):
        return torch.device("cuda", self.cuda_index)

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False


def fake_cuda(t, index=0):
    cls = FakeCudaTensor if index == 0 else type(f"FakeCuda{index}Tensor", (FakeCudaTensor,), {"cuda_index": index})
    return t.as_subclass(cls)
