"""HRCA: selection and sparse cross-attention, the references against brute force, the Triton kernels
and custom ops against the references, and the module against FASeg's layer."""

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_DEVICE, KERNEL_DTYPES, RTOL, assert_close, dtype_id, rel_err

import lors_kernels as lk
from lors_kernels.hrca import reference


def brute_windows(scores, low_hw, high_hw, k):
    (lh, lw), (hh, hw) = low_hw, high_hw
    ws = hh // lh
    out = []
    for b in range(scores.shape[0]):
        total = scores[b].sum(0).tolist()
        cells = sorted(sorted(range(len(total)), key=lambda c: (-total[c], c))[:k])
        out.append([(cy * ws + dy) * hw + cx * ws + dx
                    for cy, cx in ((c // lw, c % lw) for c in cells) for dy in range(ws) for dx in range(ws)])
    return torch.tensor(out)


@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
def test_select_windows_matches_brute_force(tied):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (2, 5, 4 * 6), generator=g).double() if tied else torch.rand(2, 5, 24, generator=g)
    got = reference.select_windows(scores, (4, 6), (16, 24), 5)
    assert got.shape == (2, 5 * 16)
    assert torch.equal(got, brute_windows(scores, (4, 6), (16, 24), 5))


def brute_topk(scores, low_hw, high_hw, k, per_query):
    (lh, lw), (hh, hw) = low_hw, high_hw
    s = scores.double() if per_query else scores.double().sum(1, keepdim=True)
    up = F.interpolate(s.reshape(-1, 1, lh, lw), size=(hh, hw), mode="bilinear", align_corners=False)
    up = up.reshape(*s.shape[:2], hh * hw)
    # F.interpolate's (1 - w) a + w b can miss a == b by an ulp where both taps are one cell (borders):
    # rounded to 40 bits, equal pixels tie and go by index as the selection promises
    up = torch.round(up * 2.0 ** 40) / 2.0 ** 40
    out = torch.sort(up, dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values
    return out if per_query else out[:, 0]


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_select_topk_pixels_matches_upsample_and_sort(per_query, tied, chunk):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 2, (2, 3, 12), generator=g).float() if tied else torch.rand(2, 3, 12, generator=g)
    got = reference.select_topk_pixels(scores, (3, 4), (12, 16), 20, per_query=per_query, rows_per_chunk=chunk)
    assert got.shape == ((2, 3, 20) if per_query else (2, 20))
    assert torch.equal(got, brute_topk(scores, (3, 4), (12, 16), 20, per_query))


def dense64(q, k, v, index, scale):
    """Per (batch, head, query) loops in float64 over the listed positions, duplicates included:
    (out, log-sum-exp with +inf for a row with nothing listed)."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    lse = torch.full((b, h, n), float("inf"), dtype=torch.float64)
    for bi in range(b):
        for qi in range(n):
            ids = index[bi, qi] if index.dim() == 3 else index[bi]
            ids = [int(i) for i in ids if i >= 0]
            if not ids:
                continue
            for hi in range(h):
                logits = torch.stack([q[bi, hi, qi].double() @ k[bi, hi, i].double() for i in ids]) * scale
                w = torch.softmax(logits, 0)
                out[bi, hi, qi] = sum(wj * v[bi, hi, i].double() for wj, i in zip(w, ids))
                lse[bi, hi, qi] = torch.logsumexp(logits, 0)
    return out, lse


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
def test_sparse_attention_reference_padding_duplicates_empty_rows(per_query):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 5, 8, generator=g)
    k, v = torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    shape = (2, 5, 7) if per_query else (2, 7)
    index = torch.randint(0, 11, shape, generator=g)
    index[..., -2:] = -1  # padding
    index[..., 1] = index[..., 0]  # a duplicate counts twice
    if per_query:
        index[0, 3] = -1  # one query with nothing to attend to
    out64, lse64 = dense64(q, k, v, index, 0.3)
    got = reference.sparse_cross_attention(q, k, v, index.int(), scale=0.3)
    assert_close(got, out64.float(), torch.float32, "out")
    # the op's PyTorch path: output and log-sum-exp from one gather
    got, lse = reference.attention_with_lse(q, k, v, index.int(), 0.3)
    assert_close(got, out64.float(), torch.float32, "out with lse")
    assert torch.equal(lse.isinf(), lse64.isinf())
    assert_close(lse.masked_fill(lse.isinf(), 0), lse64.masked_fill(lse64.isinf(), 0).float(), torch.float32, "lse")
    if per_query:
        assert got[0, :, 3].abs().sum() == 0


def test_sparse_attention_reference_gradcheck():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[[0, 2, 2, -1], [-1, -1, -1, -1], [5, 1, 0, 3]]])
    assert torch.autograd.gradcheck(lambda q, k, v: reference.sparse_cross_attention(q, k, v, index), (q, k, v))


# ----------------------------------------------------------------------------------- kernels and ops


def attention_inputs(b, h, n, length, s, d, per_query, dtype, device=KERNEL_DEVICE, seed=0):
    """q, k, v and an index with padding, a duplicate, and (per query) one row with nothing valid."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, rows, d, generator=g).to(device, dtype) for rows in (n, length, length))
    index = torch.randint(0, length, (b, n, s) if per_query else (b, s), generator=g)
    index[..., -3:] = -1
    index[..., 1] = index[..., 0]
    if per_query:
        index[0, n // 2] = -1
    return q, k, v, index.to(device)


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
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(out64, leaves64, dout.cpu().double())):
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


def test_attention_op_gradcheck_float64(use_backend):
    use_backend("reference")  # the op's explicit backward formula, not the reference's autograd
    q, k, v, index = attention_inputs(1, 2, 3, 6, 5, 4, True, torch.float64, "cpu")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.lors.sparse_cross_attention(q, k, v, index, 0.5)[0],
                                    leaves)


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_attention_opcheck(backend_name, per_query, use_backend):
    use_backend(backend_name)
    q, k, v, index = attention_inputs(1, 2, 3, 10, 6, 16, per_query, torch.float32)
    args = [t.requires_grad_() for t in (q, k, v)] + [index, 0.25]
    torch.library.opcheck(torch.ops.lors.sparse_cross_attention.default, args)


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


BAD_ATTENTION = {
    "index_high": (lambda q, k, v, i: (q, k, v, i + 20), IndexError, r"in \[0, 20\).*got values in \[19, 38\]"),
    "index_low": (lambda q, k, v, i: (q, k, v, i - 5), IndexError, "must be -1"),
    "index_float": (lambda q, k, v, i: (q, k, v, i.float()), TypeError, "int32 or int64"),
    "index_batch": (lambda q, k, v, i: (q, k, v, i[:1]), ValueError, "index .* must be"),
    "kv_dims": (lambda q, k, v, i: (q, k[..., :-1], v, i), ValueError, "k .* and v .* must"),
    "q_3d": (lambda q, k, v, i: (q[0], k, v, i), ValueError, "q must be 4-D"),
    "dtypes": (lambda q, k, v, i: (q.double(), k, v, i), TypeError, r"one floating dtype.*k\.to\(q\.dtype\)"),
}


@pytest.mark.parametrize("case", list(BAD_ATTENTION))
def test_attention_bad_inputs(case):
    make, error, message = BAD_ATTENTION[case]
    q, k, v, index = attention_inputs(2, 2, 3, 20, 6, 8, False, torch.float32, "cpu")
    with pytest.raises(error, match=message):
        lk.sparse_cross_attention(*make(q, k, v, index))


def test_out_of_range_index_is_an_error_in_compiled_graphs_too():
    q, k, v, index = attention_inputs(1, 2, 3, 20, 6, 8, False, torch.float32, "cpu")
    compiled = torch.compile(lambda q, k, v, i: lk.sparse_cross_attention(q, k, v, i), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, index), reference.sparse_cross_attention(q, k, v, index))
    with pytest.raises(IndexError, match="must be -1"):
        compiled(q, k, v, index + 20)


def test_index_check_in_compiled_graphs_on_a_gpu_never_syncs(monkeypatch, use_backend):
    """Inside the op (what compiled graphs and CUDA graphs run) CUDA indices are checked by a device-side
    assert: no .tolist(), so capture and reduce-overhead compile work; eager calls keep the clear error."""
    from helpers import fake_cuda

    use_backend("reference")  # PyTorch runs on the fake GPU tensors' CPU data
    q, k, v, index = attention_inputs(1, 2, 3, 20, 6, 8, False, torch.float32, "cpu")
    args = [fake_cuda(t) for t in (q, k, v)]
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("the op synced the host"))
    torch.ops.lors.sparse_cross_attention(*args, fake_cuda(index), 0.3)  # valid: no error, no sync
    with pytest.raises(RuntimeError, match="index entries must be -1"):  # the assert (on CPU data here)
        torch.ops.lors.sparse_cross_attention(*args, fake_cuda(index + 20), 0.3)
    monkeypatch.undo()
    with pytest.raises(IndexError, match=r"must be -1 .* got values in \[19, "):
        lk.sparse_cross_attention(q, k, v, index + 20)


def dyadic_scores(b, n, n_low, seed):
    """Multiples of 1/8: bilinear weights for power-of-two ratios are dyadic too, so the upsampled values
    are exact in fp32 and float64 alike, and ties are frequent."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (b, n, n_low), generator=g).float() / 8


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


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_topk_pixels_border_plateau_ties_go_to_the_lower_index(backend_name, use_backend):
    """Clamped border taps repeat one cell: those pixels are equal and the lower index wins (a
    (1 - w) a + w a interpolation would order them by rounding instead)."""
    use_backend(backend_name)
    scores = torch.tensor([[[0.1, 0.2, 0.3, 0.7]]]).to(KERNEL_DEVICE)
    got = lk.select_topk_pixels(scores, (2, 2), (16, 16), 5)
    assert got.tolist() == [[204, 205, 206, 207, 220]]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_selection_opcheck(backend_name, use_backend):
    use_backend(backend_name)
    scores = dyadic_scores(2, 3, 12, 0).to(KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.lors.select_windows.default, (scores, 3, 4, 12, 16, 2))
    for per_query in (False, True):
        torch.library.opcheck(torch.ops.lors.select_topk_pixels.default, (scores, 3, 4, 12, 16, 10, per_query))


def test_selection_op_errors():
    scores = torch.rand(1, 2, 12)
    with pytest.raises(ValueError, match="between 1 and the number of high-resolution pixels"):
        lk.select_topk_pixels(scores, (3, 4), (6, 8), 49)
    with pytest.raises(ValueError, match="between 1 and the number of low-resolution cells"):
        lk.select_windows(scores, (3, 4), (6, 8), 13)
    with pytest.raises(ValueError, match="n_low = 3\\*5"):
        lk.select_windows(scores, (3, 5), (6, 10), 2)
    with pytest.raises(ValueError, match="integer multiple"):
        lk.select_windows(scores, (3, 4), (7, 8), 2)


# ------------------------------------------------------------------------------------------------ module


def faseg_layer(mha, query, memory, pos, query_pos, low_scores, low_hw, high_hw, ratio=32):
    """FASeg's high-resolution cross-attention as its released code runs it: pick the windows, gather
    memory and positions there, and run nn.MultiheadAttention (sequence-first) on what was gathered."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    ws = hh // lh
    cells = low_scores.sum(1).topk(max(1, lh * lw // ratio), dim=-1).indices.sort(-1).values
    outs = []
    for b in range(query.shape[0]):
        pixels = [(int(c) // lw * ws + dy) * hw + int(c) % lw * ws + dx for c in cells[b] for dy in range(ws) for dx in range(ws)]
        mem, p = memory[b, pixels][:, None], pos[b, pixels][:, None]
        out = mha((query[b] + query_pos[b])[:, None], mem + p, mem, need_weights=False)[0]
        outs.append(out[:, 0])
    return torch.stack(outs)


def module_inputs(b=2, n=5, c=32, low_hw=(4, 8), high_hw=(16, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    length, n_low = high_hw[0] * high_hw[1], low_hw[0] * low_hw[1]
    return (torch.randn(b, n, c, generator=g), torch.randn(b, length, c, generator=g),
            torch.randn(b, length, c, generator=g), torch.randn(b, n, c, generator=g),
            torch.rand(b, n, n_low, generator=g).softmax(-1))


def test_window_mode_reproduces_faseg_layer():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4)
    layer = lk.HighResCrossAttention(32, 4, mode="window", ratio=8)
    layer.load_state_dict(mha.state_dict())
    query, memory, pos, query_pos, scores = module_inputs()
    got = layer(query, memory, pos, query_pos, scores, (4, 8), (16, 32))
    expected = faseg_layer(mha, query, memory, pos, query_pos, scores, (4, 8), (16, 32), ratio=8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bilinear_per_query_module_matches_masked_dense_attention():
    torch.manual_seed(1)
    layer = lk.HighResCrossAttention(32, 4, mode="bilinear", ratio=8, per_query=True)
    query, memory, pos, query_pos, scores = module_inputs(seed=1)
    got = layer(query, memory, pos, query_pos, scores, (4, 8), (16, 32))
    index = brute_topk(scores, (4, 8), (16, 32), 4 * 16, True)  # 32 // 8 cells of 4 x 4 pixels
    mask = torch.zeros(2, 5, 16 * 32, dtype=torch.bool).scatter_(2, index, True)
    w_q, w_k, w_v = layer.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.in_proj_bias.chunk(3)
    heads = lambda x: x.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
    q = heads(F.linear(query + query_pos, w_q, b_q))
    k, v = heads(F.linear(memory + pos, w_k, b_k)), heads(F.linear(memory, w_v, b_v))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    expected = layer.out_proj(dense.transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_module_arguments_and_state_dict_names():
    layer = lk.HighResCrossAttention(32, 4)
    assert set(layer.state_dict()) == set(torch.nn.MultiheadAttention(32, 4).state_dict())
    with pytest.raises(ValueError, match="per_query needs mode='bilinear'"):
        lk.HighResCrossAttention(32, 4, mode="window", per_query=True)
    with pytest.raises(ValueError, match="not divisible"):
        lk.HighResCrossAttention(30, 4)


@pytest.mark.parametrize("mode", ["window", "bilinear-per_query"])
def test_compile_fullgraph_module_cpu(mode):
    torch.manual_seed(2)
    layer = lk.HighResCrossAttention(32, 4, mode=mode.split("-")[0], ratio=8, per_query="per_query" in mode)
    inputs = module_inputs(seed=2)
    eager = layer(*inputs, (4, 8), (16, 32))
    compiled = torch.compile(lambda *a: layer(*a, (4, 8), (16, 32)), fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    compiled.sum().backward()
    assert layer.in_proj_weight.grad is not None and layer.in_proj_weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ launch geometry


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


# ------------------------------------------------------------------------------ ahead-of-time compiling


def aot_cases():
    """The paper's shape (8 heads, C = 256: D = 32) at Cityscapes size (S = 64 windows x 64 px of a
    256 x 512 map, N = 300) for B = 2 (short query tiles: few programs) and B = 16 (tall ones), then
    D = 64 with few queries, D = 128 and D = 256; the fused top-k for small k, 1024 and the largest."""
    from lors_kernels.hrca import triton as kernels

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for b, n, length, s, d in ((2, 300, 256 * 512, 4096, 32), (16, 300, 256 * 512, 4096, 32), (2, 8, 64, 64, 64),
                                   (2, 100, 64, 64, 128), (2, 100, 64, 64, 256)):
            q = torch.empty(b, 8, n, d, device="meta", dtype=dtype)
            kv = torch.empty(b, 8, length, d, device="meta", dtype=dtype)
            for index in (torch.empty(b, s, device="meta", dtype=torch.int64),
                          torch.empty(b, n, s, device="meta", dtype=torch.int32)):
                out, lse = kernels.attention_forward(q, kv, kv, index, 0.2)
                for deterministic in (False, True):
                    kernels.attention_backward(q, q, kv, kv, index, q, lse, 0.2, deterministic)
    for k in (20, 1024, 4096):
        kernels.topk_pixels(torch.empty(100, 32 * 64, device="meta"), (32, 64), (256, 512), k)


def test_aot_compiles_for_sm80_and_sm90():
    from aot import SHARED_LIMIT, compile_cases

    report = compile_cases(__name__.rsplit(".", 1)[-1])
    errors = [f"{e['launch']} sm_{e['capability']}: {e['error']}" for e in report if "error" in e]
    assert not errors, "\n".join(errors)
    assert len(report) > 2 * 3 * 5
    for entry in report:
        assert entry["shared"] <= SHARED_LIMIT[entry["capability"]], entry
