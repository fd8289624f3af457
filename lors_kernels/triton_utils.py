"""What every family's Triton launchers share: dtype mapping, the fp32 dot precision, and the one
function that starts kernels (the AOT tests replace it to collect every launch dispatch makes)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# What grids are sized for where no GPU is there to ask (the interpreter, AOT tests on meta tensors): an
# H100 SXM / H200.
NOMINAL_SMS = 132


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of the GPU that tensors on `device` launch on (an H100 PCIe has 114, SXM 132)."""
    if device.type != "cuda":
        return NOMINAL_SMS
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def dot_dtype(*tensors: torch.Tensor) -> tl.dtype:
    """Dots run in the narrowest float type among the operands (fp32 side buffers meet 16-bit inputs)."""
    narrow = [t.dtype for t in tensors if t.dtype.itemsize == 2]
    return TL_DTYPES[narrow[0] if narrow else torch.float32]


def precision() -> str:
    """fp32 dots follow torch: IEEE under the default "highest" matmul precision, else tf32."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def block(n: int, least: int = 16) -> int:
    """A power-of-two tile covering n (tl.dot wants every dimension >= 16); extra lanes are masked."""
    return max(least, triton.next_power_of_2(n))


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: programs that run together share
    columns of B in L2 (GROUP_M row tiles per group)."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_in_group) * GROUP_M
    group_rows = min(tl.cdiv(M, BLOCK_M) - first_pid_m, GROUP_M)
    return first_pid_m + (pid % pids_in_group) % group_rows, (pid % pids_in_group) // group_rows


def launch(
    kernel: Any,
    grid: tuple[int, ...],
    args: Sequence[Any],
    constexprs: dict[str, Any],
    num_warps: int,
    num_stages: int = 1,
) -> None:
    kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
