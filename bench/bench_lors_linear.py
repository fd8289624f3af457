"""lors_linear forward and forward+backward against dense F.linear, PEFT-style eager and
materialize-then-linear (the cases and peers are lors_kernels.bench's, shared with the CLI)."""

import functools

import pytest

from lors_kernels.bench import DEVICE, DTYPE, MODES, lors_linear_case, lors_linear_grid, lors_linear_providers

PROVIDERS = list(lors_linear_providers(*[None] * 5))


@functools.lru_cache(maxsize=2)
def case(m, d, r, mode):
    return lors_linear_case(DEVICE, DTYPE, m, d, r, mode)


def pytest_generate_tests(metafunc):
    quick = metafunc.config.lors_quick
    grid = lors_linear_grid(DEVICE, quick)
    metafunc.parametrize("shape", grid, ids=[f"M{m}-D{d}-R{r}" for m, d, r in grid])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
def bench_lors_linear(shape, mode, provider, timed):
    timed(case(*shape, mode), provider)
