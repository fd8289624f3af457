"""Test harness shared by every op family.

Without CUDA the Triton kernels run under the interpreter, which must be switched on before any
kernel is defined, so this happens here, before the test modules import lors_kernels.
"""

import os
import sys

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    """On a GPU, an illegal address or a failed device-side assert ends the CUDA context for the rest of
    the process: every later test in it would fail for this one's fault. Such a test ends its process
    (pytest-xdist names it as the test that crashed its worker and starts a fresh worker)."""
    yield
    if not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:  # torch.AcceleratorError: the CUDA error is sticky
        sys.stderr.write(f"\n{item.nodeid} left the CUDA context broken: {error}\n")
        sys.stderr.flush()
        os._exit(3)


def pytest_runtest_logreport(report):
    """On a GPU (gpu-check), each failure's message goes to stderr at once: a run that its time budget
    cuts off, before pytest's summary, still says why each test failed. Workers print (with
    pytest-xdist the controller gets the same report again, marked with its node)."""
    if not torch.cuda.is_available() or not report.failed or getattr(report, "node", None) is not None:
        return
    lines = report.longreprtext.strip().splitlines()
    errors = [line[1:].strip() for line in lines if line.startswith("E ")] or lines[-1:]
    sys.stderr.write(f"\nFAILED-NOW {report.nodeid} ({report.when}): {' | '.join(errors[:3])[:500]}\n")
    sys.stderr.flush()


@pytest.fixture
def use_backend():
    """`use_backend("triton")` forces a backend until the end of the test."""
    saved = []

    def force(name):
        saved.append(backend.set_backend(name))

    yield force
    if saved:
        backend.set_backend(saved[0])
