"""Test harness shared by every op family.

Without CUDA the Triton kernels run under the interpreter, which must be switched on before any
kernel is defined, so this happens here, before the test modules import lors_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lors_kernels import backend  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes long; skipped unless --run-slow")
    config.addinivalue_line(
        "markers", "toolchain: compiles csrc/ with the host's compilers; the Python dependencies play no part"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)


@pytest.fixture
def use_backend():
    """`use_backend("triton")` forces a backend until the end of the test."""
    saved = []

    def force(name):
        saved.append(backend.set_backend(name))

    yield force
    if saved:
        backend.set_backend(saved[0])
