"""Every op family's benchmark cases under pytest-benchmark: the grids, providers and cases of the
`Family` records beside each family (lors_kernels/<family>/bench.py), the same ones the CLI times."""

import functools

from lors_kernels.bench import DEVICE, DTYPE, families


@functools.lru_cache(maxsize=2)
def case(family, shape_items, mode):
    return families()[family].case(DEVICE, DTYPE, dict(shape_items), mode)


def pytest_generate_tests(metafunc):
    params, ids = [], []
    for family in families().values():
        for shape in family.grid(DEVICE, metafunc.config.lors_quick):
            for mode in family.modes:
                for provider in family.providers(DEVICE):
                    params.append((family.name, tuple(shape.items()), mode, provider))
                    ids.append("-".join([family.name, *(f"{k}{v}" for k, v in shape.items()), mode, provider]))
    metafunc.parametrize("family,shape,mode,provider", params, ids=ids)


def bench_op(family, shape, mode, provider, timed):
    timed(case(family, shape, mode), provider)
