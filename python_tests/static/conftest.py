"""Fixtures shared by the static family's tests."""

import pytest


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group, as FSDP needs one."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
