"""pytest-benchmark suites: `pytest bench --benchmark-json out.json` times them; with
`--benchmark-disable` (as CI runs them) every case runs once on the quick grid, as a smoke test."""

import pytest
import torch

from lors_kernels.bench import DEVICE, DTYPE, machine_info


def pytest_configure(config):
    config.lors_quick = bool(config.getoption("benchmark_disable", False))


@pytest.fixture
def timed(benchmark):
    """`timed(case, provider)`: benchmark one provider of a Case, synchronized, with machine info."""

    def run(case, provider):
        fn = case.providers[provider]
        benchmark.group = f"{case.family} {case.mode} {case.label}"
        benchmark.extra_info.update(machine_info(DEVICE, str(DTYPE)), shape=case.shape, provider=provider)
        if DEVICE == "cuda":
            return benchmark(lambda: (fn(), torch.cuda.synchronize()))
        return benchmark(fn)

    return run
