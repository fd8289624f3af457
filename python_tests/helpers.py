"""Devices, dtypes and tolerances shared by the tests of every op family."""

import torch

CUDA = torch.cuda.is_available()
# Devices the Triton kernels are tested on: the interpreter on CPU, the real thing on a GPU.
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
# The interpreter's bf16 arithmetic is not faithful (DESIGN.md §4): bf16 is tested on GPUs only.
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
