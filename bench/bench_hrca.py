"""HRCA selection + sparse attention, forward and forward+backward, against top-k + gather + SDPA and
dense SDPA over the whole high-resolution map (cases shared with the CLI)."""

import functools

import pytest

from lors_kernels.bench import DEVICE, DTYPE, MODES, OURS, hrca_case, hrca_grid


@functools.lru_cache(maxsize=2)
def case(size, selection, b, n, mode):
    return hrca_case(DEVICE, DTYPE, size, selection, b, n, mode)


def pytest_generate_tests(metafunc):
    grid = hrca_grid(DEVICE, metafunc.config.lors_quick)
    metafunc.parametrize("shape", grid, ids=[f"{size}-{sel}-B{b}-N{n}" for size, sel, b, n in grid])


@pytest.mark.parametrize("provider", [OURS, "topk+gather+SDPA", "dense SDPA"])
@pytest.mark.parametrize("mode", MODES)
def bench_hrca(shape, mode, provider, timed):
    timed(case(*shape, mode), provider)
