"""The ahead-of-time compile harness (aot.py): its report cache and its reading of ptxas logs."""

import aot
import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


def _launch(block=64):
    x = torch.empty(256, device="meta")
    return aot.Launch(_copy_kernel, (x, x, 256), {"BLOCK": block}, num_warps=4, num_stages=1)


@pytest.fixture
def compiles(tmp_path, monkeypatch):
    """The (launch, capability) pairs that were really compiled, with compiling replaced by a stub."""
    monkeypatch.setenv("LORS_KERNELS_AOT_CACHE", str(tmp_path))
    calls = []

    def report(launch, capability):
        calls.append((repr(launch), capability))
        return {"shared": len(calls)}

    monkeypatch.setattr(aot, "_report", report)
    return calls


def test_a_report_is_compiled_once_then_read_from_the_cache(compiles):
    first = aot._cached_report(_launch(), 90)
    assert aot._cached_report(_launch(), 90) == first
    assert len(compiles) == 1


def test_the_cache_key_holds_configuration_architecture_and_triton_version(compiles, monkeypatch):
    aot._cached_report(_launch(), 90)
    aot._cached_report(_launch(), 80)
    aot._cached_report(_launch(block=128), 90)
    monkeypatch.setattr(triton, "__version__", "0.0.0")
    aot._cached_report(_launch(), 90)
    assert len(compiles) == 4


def test_spills_are_read_from_the_ptxas_log():
    log = (
        "ptxas info    : Function properties for kernel\n"
        "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
    )
    wide = "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16"
    assert aot.hopper_report(wide, log) == {"wgmma": True, "narrow_wgmma": False, "tma": False, "spills": 24}
    clean = "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    assert aot.hopper_report("mma.sync cp.async.bulk.tensor", clean) == {
        "wgmma": False,
        "narrow_wgmma": False,
        "tma": True,
        "spills": 0,
    }
    narrow = aot.hopper_report("wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16", clean)
    assert narrow["wgmma"] and narrow["narrow_wgmma"]
    assert not aot.hopper_report("wgmma.mma_async.sync.aligned.m64n8k8.f32.tf32.tf32", clean)["narrow_wgmma"]
