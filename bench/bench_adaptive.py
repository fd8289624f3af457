"""adaptive_mixing forward and forward+backward against the eager reference (materialized M/S, 4-D
matmuls, separate LayerNorm/ReLU) and, on GPUs, torch.compile of it (cases shared with the CLI)."""

import functools

import pytest

from lors_kernels.bench import DEVICE, DTYPE, MODES, OURS, adaptive_mixing_case, adaptive_mixing_grid

PROVIDERS = [OURS, "eager"] + (["torch.compile(eager)"] if DEVICE == "cuda" else [])


@functools.lru_cache(maxsize=2)
def case(name, b, n, mode):
    return adaptive_mixing_case(DEVICE, DTYPE, name, b, n, mode)


def pytest_generate_tests(metafunc):
    grid = adaptive_mixing_grid(DEVICE, metafunc.config.lors_quick)
    metafunc.parametrize("shape", grid, ids=[f"{name}-B{b}-N{n}" for name, b, n in grid])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def bench_adaptive_mixing(shape, mode, provider, timed):
    timed(case(*shape, mode), provider)
