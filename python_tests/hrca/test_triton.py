"""hrca/triton.py: sparse attention and fused top-k selection against the references (under the
interpreter without a GPU), launch geometry, and the ahead-of-time compile for sm_80 and sm_90."""

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNEL_DTYPES, assert_close, dtype_id

import lors_kernels as lk
from lors_kernels.hrca import reference

from .oracle import attention_inputs, brute_topk, dyadic_scores

ATTENTION_CASES = {  # b, h, n, L, S, D: S never a multiple of the kernels' slot blocks
    "shared-d32": (2, 2, 37, 50, 70, 32, False),
    "shared-d48-n5": (1, 3, 5, 40, 21, 48, False),
    "per_query-d32": (2, 2, 5, 50, 70, 32, True),
    "per_query-d48": (1, 2, 4, 30, 19, 48, True),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=dtype_id)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_triton_attention_forward_backward(dtype, index_dtype, case, use_backend):
    use_backend("triton")
    *shape, per_query = ATTENTION_CASES[case]
    q, k, v, index = attention_inputs(*shape, per_query, dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = lk.sparse_cross_attention(q, k, v, index.to(index_dtype), scale=0.3)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, dout)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    out64 = reference.sparse_cross_attention(*leaves64, index.cpu(), 0.3)
    assert_close(out, out64, dtype, "out")
    if per_query:
        assert out[0, :, shape[2] // 2].abs().sum() == 0  # the row with no valid key
    for name, grad, expected in zip(
        ("dq", "dk", "dv"), grads, torch.autograd.grad(out64, leaves64, dout.cpu().double())
    ):
        assert_close(grad, expected, dtype, name)


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
def test_deterministic_mode_matches_atomics_bitwise_repeatable(per_query, use_backend):
    use_backend("triton")
    q, k, v, index = attention_inputs(1, 2, 6, 20, 40, 32, per_query, torch.float32)
    index[..., 5:20] = index[..., 4:5]  # many duplicates: many writers per key row

    def grads():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = lk.sparse_cross_attention(*leaves, index)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    atomic = grads()
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(saved)
    for a, b, c in zip(atomic, first, second):
        assert torch.equal(b, c)
        assert_close(b, a, torch.float32, "deterministic vs atomic")


def test_noncontiguous_inputs_and_empty_cases(use_backend):
    use_backend("triton")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 7, 3, 32, generator=g).to(KERNEL_DEVICE).transpose(1, 2)  # [B, H, N, D], strided
    kv = torch.randn(2, 20, 2, 3, 32, generator=g).to(KERNEL_DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    index = torch.randint(0, 20, (2, 9), generator=g).to(KERNEL_DEVICE)
    got = lk.sparse_cross_attention(q, k, v, index)
    expected = reference.sparse_cross_attention(q.contiguous(), k.contiguous(), v.contiguous(), index)
    assert_close(got, expected, torch.float32, "strided")
    for qq, ii in ((q[:0], index[:0]), (q[:, :, :0], index), (q, index[:, :0])):  # B = 0, N = 0, S = 0
        leaves = [t.detach().requires_grad_() for t in (qq, k[: qq.shape[0]], v[: qq.shape[0]])]
        out = lk.sparse_cross_attention(*leaves, ii)
        assert out.shape == qq.shape and out.abs().sum() == 0
        assert all(gr.abs().sum() == 0 for gr in torch.autograd.grad(out.sum(), leaves))


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("k", [1, 20, 64, 100])
def test_triton_topk_pixels_matches_upsample_and_sort(k, per_query, use_backend):
    use_backend("triton")
    scores = dyadic_scores(2, 3, 12, k).to(KERNEL_DEVICE)
    got = lk.select_topk_pixels(scores, (3, 4), (12, 16), k, per_query=per_query)
    assert torch.equal(got.cpu(), brute_topk(scores.cpu(), (3, 4), (12, 16), k, per_query))


def test_triton_topk_pixels_negative_scores_and_several_blocks(use_backend):
    use_backend("triton")
    g = torch.Generator().manual_seed(5)
    scores = (torch.randint(-8, 8, (1, 2, 8 * 6), generator=g).float() / 4).to(KERNEL_DEVICE)
    got = lk.select_topk_pixels(scores, (8, 6), (64, 48), 40)  # 3072 pixels: three blocks
    assert torch.equal(got.cpu(), brute_topk(scores.cpu(), (8, 6), (64, 48), 40, False))


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
def test_grids_fit_when_batch_times_heads_passes_65535(per_query, monkeypatch):
    """B * H = 70000 (heads of a big batch) fits: grid axes 1 and 2 hold at most 65535 programs."""
    from lors_kernels import triton_utils
    from lors_kernels.hrca import triton as kernels

    grids = []
    monkeypatch.setattr(triton_utils, "launch", lambda kernel, grid, *a, **kw: grids.append(grid))
    b, h, n, s, d = 7000, 10, 3, 16, 16
    q = torch.empty(b, h, n, d, device="meta")
    kv = torch.empty(b, h, 40, d, device="meta")
    index = torch.empty((b, n, s) if per_query else (b, s), device="meta", dtype=torch.int64)
    _, lse = kernels.attention_forward(q, kv, kv, index, 0.25)
    for deterministic in (False, True):
        kernels.attention_backward(q, q, kv, kv, index, q, lse, 0.25, deterministic)
    assert grids and all(len(grid) == 1 or max(grid[1:]) <= 65535 for grid in grids), grids


def test_query_tiles_follow_the_multiprocessor_count(monkeypatch):
    """Shared sets take query tiles as tall as still give two programs per SM: the count is the device's."""
    import types

    from lors_kernels import triton_utils
    from lors_kernels.hrca.triton import _config

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(multi_processor_count=114))
    triton_utils._sms.cache_clear()
    try:
        assert triton_utils.sm_count(torch.device("cuda", 1)) == 114  # an H100 PCIe
    finally:
        triton_utils._sms.cache_clear()
    assert _config(False, 300, 32, torch.float32, 50, 114)[0] == 64  # 5 tiles x 50 heads >= 2 x 114
    assert _config(False, 300, 32, torch.float32, 50, 132)[0] == 32  # 250 < 2 x 132: shorter tiles


def aot_cases():
    """The paper's shape (8 heads, C = 256: D = 32) at Cityscapes size (S = 64 windows x 64 px of a
    256 x 512 map, N = 300) for B = 2 (short query tiles: few programs) and B = 16 (tall ones), then
    D = 64 with few queries, D = 128 and D = 256; the fused top-k for small k, 1024 and the largest."""
    from lors_kernels.hrca import triton as kernels

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for b, n, length, s, d in (
            (2, 300, 256 * 512, 4096, 32),
            (16, 300, 256 * 512, 4096, 32),
            (2, 8, 64, 64, 64),
            (2, 100, 64, 64, 128),
            (2, 100, 64, 64, 256),
        ):
            q = torch.empty(b, 8, n, d, device="meta", dtype=dtype)
            kv = torch.empty(b, 8, length, d, device="meta", dtype=dtype)
            for index in (
                torch.empty(b, s, device="meta", dtype=torch.int64),
                torch.empty(b, n, s, device="meta", dtype=torch.int32),
            ):
                out, lse = kernels.attention_forward(q, kv, kv, index, 0.2)
                for deterministic in (False, True):
                    kernels.attention_backward(q, q, kv, kv, index, q, lse, 0.2, deterministic)
    for k in (20, 1024, 4096):
        kernels.topk_pixels(torch.empty(100, 32 * 64, device="meta"), (32, 64), (256, 512), k)


def test_aot_compiles_for_sm80_and_sm90():
    from aot import SHARED_LIMIT, compile_cases

    report = compile_cases(__name__)
    errors = [f"{e['launch']} sm_{e['capability']}: {e['error']}" for e in report if "error" in e]
    assert not errors, "\n".join(errors)
    assert len(report) > 2 * 3 * 5
    for entry in report:
        assert entry["shared"] <= SHARED_LIMIT[entry["capability"]], entry
