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


@pytest.fixture
def use_backend():
    """`use_backend("triton")` forces a backend until the end of the test."""
    saved = []

    def force(name):
        saved.append(backend.set_backend(name))

    yield force
    if saved:
        backend.set_backend(saved[0])
