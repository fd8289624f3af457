"""backend.py: backend names, and what `python -m lors_kernels env` reports."""

import pytest
import torch

import lors_kernels as lk


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown lors_kernels backend"):
        lk.set_backend("fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine can run every backend")
def test_env_warns_when_the_forced_backend_cannot_run(monkeypatch):
    from lors_kernels import backend

    monkeypatch.setenv("LORS_KERNELS_BACKEND", "cuda")
    assert "warning     backend 'cuda' is forced but cannot run here" in backend.env_report()
    monkeypatch.setenv("LORS_KERNELS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1 is not set" in backend.env_report()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "warning" not in backend.env_report()
    monkeypatch.setenv("LORS_KERNELS_BACKEND", "reference")
    assert "warning" not in backend.env_report()
