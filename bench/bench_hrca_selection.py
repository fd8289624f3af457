"""HRCA bilinear top-k selection alone against upsampling the whole map + top-k (cases shared with
the CLI)."""

import functools

import pytest

from lors_kernels.bench import DEVICE, DTYPE, OURS, hrca_selection_case, hrca_selection_grid


@functools.lru_cache(maxsize=2)
def case(size, selection, b, n):
    return hrca_selection_case(DEVICE, DTYPE, size, selection, b, n)


def pytest_generate_tests(metafunc):
    grid = hrca_selection_grid(DEVICE, metafunc.config.lors_quick)
    metafunc.parametrize("shape", grid, ids=[f"{size}-{sel}-B{b}-N{n}" for size, sel, b, n in grid])


@pytest.mark.parametrize("provider", [OURS, "interpolate+topk"])
def bench_hrca_selection(shape, provider, timed):
    timed(case(*shape), provider)
