"""Native HRCA kernels (csrc/cpu/hrca_*.cpp): selection against brute-force upsample + stable sort and
the PyTorch reference (bitwise: both compute in float64 with the same operations), attention forward
against float64 attention restricted to the index set, thread-count independence, dispatch, errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, dtype_id

import lors_kernels
from lors_kernels import backend
from lors_kernels.hrca import op, reference

C = backend.native()
native = pytest.mark.skipif(
    C is None or not hasattr(C, "select_topk_pixels_cpu"),
    reason="lors_kernels._C is not built (pip install --no-build-isolation -e . builds it)",
)
pytestmark = native


def brute_force_topk(scores, low_hw, high_hw, k, per_query):
    """Whole upsampled map in float64 by F.interpolate, stable descending sort, k first, ascending."""
    s = scores.double()
    s = s if per_query else s.sum(1, keepdim=True)
    up = F.interpolate(s.reshape(*s.shape[:2], *low_hw), size=tuple(high_hw), mode="bilinear", align_corners=False)
    order = torch.sort(up.flatten(2), dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values
    return order if per_query else order[:, 0]


def dyadic(*shape, seed=0, levels=16):
    """Scores on a coarse grid of multiples of 1/8: many exact ties, sums and interpolations exact."""
    return torch.randint(-levels, levels, shape, generator=torch.Generator().manual_seed(seed)).float() / 8


# name: (B, N, low_hw, high_hw, k)
MAPS = {
    "ratio4": (2, 3, (4, 6), (16, 24), 37),
    "non_integer_ratio": (1, 4, (3, 5), (7, 11), 20),
    "downsample": (2, 2, (6, 8), (4, 5), 7),
    "k1": (1, 3, (4, 4), (8, 8), 1),
    "all_pixels": (1, 2, (2, 3), (6, 9), 54),
    "cityscapes_rows": (1, 2, (32, 64), (256, 512), 4096),
}


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("case", list(MAPS))
@pytest.mark.parametrize("values", ["random", "dyadic"])
def test_select_topk_pixels(case, per_query, values):
    b, n, low_hw, high_hw, k = MAPS[case]
    scores = torch.randn(b, n, low_hw[0] * low_hw[1]) if values == "random" else dyadic(b, n, low_hw[0] * low_hw[1])
    got = C.select_topk_pixels_cpu(scores, *low_hw, *high_hw, k, per_query)
    assert got.dtype == torch.int64 and got.shape == ((b, n, k) if per_query else (b, k))
    assert torch.equal(got, reference.select_topk_pixels(scores, low_hw, high_hw, k, per_query=per_query))
    if values == "dyadic" or case != "cityscapes_rows":  # random float64 sums may round differently apart
        assert torch.equal(got, brute_force_topk(scores, low_hw, high_hw, k, per_query))


@pytest.mark.parametrize("special", ["constant", "nan", "inf", "signed_zero"])
def test_select_topk_pixels_ties_and_specials(special):
    """torch.sort's order: NaN above +inf, -0 == +0, equal values by ascending index."""
    scores = torch.zeros(1, 2, 4 * 5)
    if special == "nan":
        scores[0, 0, [3, 11]] = float("nan")
    elif special == "inf":
        scores[0, 1, [0, 7]] = float("inf")
        scores[0, 0, 4] = -float("inf")
    elif special == "signed_zero":
        scores[0, :, ::2] = -0.0
    for per_query in (False, True):
        got = C.select_topk_pixels_cpu(scores, 4, 5, 8, 10, 9, per_query)
        assert torch.equal(got, reference.select_topk_pixels(scores, (4, 5), (8, 10), 9, per_query=per_query))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_select_matches_reference_in_every_dtype(dtype):
    scores = torch.randn(2, 3, 4 * 6).to(dtype)
    for per_query in (False, True):
        assert torch.equal(
            C.select_topk_pixels_cpu(scores, 4, 6, 16, 24, 50, per_query),
            reference.select_topk_pixels(scores, (4, 6), (16, 24), 50, per_query=per_query),
        )
    assert torch.equal(
        C.select_windows_cpu(scores, 4, 6, 16, 24, 5), reference.select_windows(scores, (4, 6), (16, 24), 5)
    )


@pytest.mark.parametrize("values", ["random", "dyadic"])
@pytest.mark.parametrize("k", [1, 5, 24])
def test_select_windows(values, k):
    scores = torch.randn(3, 4, 24) if values == "random" else dyadic(3, 4, 24, levels=2)
    got = C.select_windows_cpu(scores, 4, 6, 12, 18, k)
    assert got.shape == (3, k * 9) and got.dtype == torch.int64
    assert torch.equal(got, reference.select_windows(scores, (4, 6), (12, 18), k))
    # independent of the reference: windows of the stable top-k cells, cells ascending, pixels row-major
    cells = torch.sort(scores.sum(1), dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
    expected = [
        [
            (cy * 3 + dy) * 18 + cx * 3 + dx
            for c in row.tolist()
            for cy, cx in [divmod(c, 6)]
            for dy in range(3)
            for dx in range(3)
        ]
        for row in cells
    ]
    assert got.tolist() == expected


def test_selection_with_no_queries_and_no_images():
    assert C.select_topk_pixels_cpu(torch.randn(0, 3, 6), 2, 3, 4, 6, 5, True).shape == (0, 3, 5)
    assert C.select_topk_pixels_cpu(torch.randn(2, 0, 6), 2, 3, 4, 6, 5, True).shape == (2, 0, 5)
    # no queries: the summed map is all zeros, every pixel ties, the first k win
    assert C.select_topk_pixels_cpu(torch.randn(2, 0, 6), 2, 3, 4, 6, 5, False).tolist() == [list(range(5))] * 2
    assert C.select_windows_cpu(torch.randn(0, 2, 6), 2, 3, 4, 6, 2).shape == (0, 8)


def test_selection_errors():
    scores = torch.randn(1, 2, 12)
    with pytest.raises(ValueError, match="must be \\[B, N, 6\\]"):
        C.select_topk_pixels_cpu(scores, 2, 3, 4, 6, 3, False)
    with pytest.raises(ValueError, match="between 1 and the 96 pixels"):
        C.select_topk_pixels_cpu(scores, 3, 4, 8, 12, 97, True)
    with pytest.raises(ValueError, match="between 1 and the 12 cells"):
        C.select_windows_cpu(scores, 3, 4, 6, 8, 13)
    with pytest.raises(ValueError, match="integer multiple"):
        C.select_windows_cpu(scores, 3, 4, 6, 12, 2)
    with pytest.raises(TypeError, match="floating"):
        C.select_windows_cpu(scores.long(), 3, 4, 6, 8, 2)


# ---------------------------------------------------------------------------------------------- attention

# name: (B, H, N, L, S, D, per_query)
ATTENTION = {
    "shared_tile_tail": (2, 3, 11, 40, 17, 32, False),
    "shared_odd_head_dim": (1, 2, 9, 30, 13, 20, False),
    "per_query": (2, 2, 5, 30, 9, 16, True),
    "per_query_d7": (1, 3, 4, 25, 6, 7, True),
}


def attention_inputs(b, h, n, length, s, d, per_query, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, rows, d, generator=g).to(dtype) for rows in (n, length, length))
    index = torch.randint(-1, length, (b, n, s) if per_query else (b, s), generator=g)
    if s > 1:
        index[..., 0] = index[..., 1].clamp_min(0)  # a duplicated slot in every set
    return q, k, v, index


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_forward(case, dtype):
    q, k, v, index = attention_inputs(*ATTENTION[case], dtype)
    out, lse = C.sparse_attention_forward_cpu(q, k, v, index.int(), 0.3)
    out_64, lse_64 = reference.attention_with_lse(q.double(), k.double(), v.double(), index, 0.3)
    assert_close(out, out_64, dtype, "out")
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), lse_64.double(), rtol=1e-5, atol=1e-5)


def test_attention_rows_with_nothing_valid():
    q, k, v, index = attention_inputs(1, 2, 4, 10, 5, 8, True, torch.float32)
    index[0, 2] = -1
    out, lse = C.sparse_attention_forward_cpu(q, k, v, index, 1.0)
    assert (out[:, :, 2] == 0).all() and torch.isinf(lse[:, :, 2]).all() and (lse[:, :, 2] > 0).all()
    assert torch.isfinite(out).all()
    shared = torch.full((1, 5), -1)
    out, lse = C.sparse_attention_forward_cpu(q, k, v, shared, 1.0)
    assert (out == 0).all() and torch.isinf(lse).all()


def test_attention_empty_shapes():
    for b, h, n, length, s in [(0, 2, 3, 5, 4), (1, 2, 0, 5, 4), (1, 2, 3, 5, 0), (1, 0, 3, 5, 4)]:
        q, k, v, index = attention_inputs(b, h, n, length, s, 8, False, torch.float32)
        out, lse = C.sparse_attention_forward_cpu(q, k, v, index, 1.0)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        if s == 0:
            assert (out == 0).all()


def test_attention_strided_inputs():
    q, k, v, index = attention_inputs(2, 3, 6, 20, 7, 16, False, torch.float32)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    torch.testing.assert_close(
        C.sparse_attention_forward_cpu(qt, kt, v, index, 0.5)[0],
        C.sparse_attention_forward_cpu(q, k, v, index, 0.5)[0],
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
def test_threads_do_not_change_results(per_query):
    q, k, v, index = attention_inputs(2, 4, 19, 60, 33, 24, per_query, torch.float32)
    scores = torch.randn(1, 5, 32 * 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(
                (
                    C.sparse_attention_forward_cpu(q, k, v, index, 0.2),
                    C.select_topk_pixels_cpu(scores, 32, 64, 256, 512, 700, per_query),
                )
            )
    finally:
        torch.set_num_threads(threads)
    (one, top_one), (two, top_two) = results
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and torch.equal(top_one, top_two)


def test_attention_errors():
    q, k, v, index = attention_inputs(1, 2, 3, 10, 4, 8, False, torch.float32)
    with pytest.raises(IndexError, match="padding"):
        C.sparse_attention_forward_cpu(q, k, v, torch.full_like(index, 10), 1.0)
    with pytest.raises(TypeError, match="Float or BFloat16"):
        C.sparse_attention_forward_cpu(q.half(), k.half(), v.half(), index, 1.0)
    with pytest.raises(TypeError, match="one dtype"):
        C.sparse_attention_forward_cpu(q, k.bfloat16(), v, index, 1.0)
    with pytest.raises(TypeError, match="Int or Long"):
        C.sparse_attention_forward_cpu(q, k, v, index.float(), 1.0)
    with pytest.raises(ValueError, match="must be \\[B, S\\]"):
        C.sparse_attention_forward_cpu(q, k, v, index[None], 1.0)
    with pytest.raises(ValueError, match="\\[B, H, L, D\\]"):
        C.sparse_attention_forward_cpu(q, k[..., :4], v[..., :4], index, 1.0)


# ----------------------------------------------------------------------------------------------- dispatch


def test_public_ops_run_native_on_cpu(monkeypatch):
    """Automatic choice on CPU: the native kernels (counted), the same numbers as the reference; the
    attention kernel for per-query sets only."""
    calls = []
    for name in ("select_windows_cpu", "select_topk_pixels_cpu", "sparse_attention_forward_cpu"):
        fn = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a), raising=False)
    scores = torch.randn(2, 3, 24)
    assert torch.equal(
        lors_kernels.select_windows(scores, (4, 6), (8, 12), 3), reference.select_windows(scores, (4, 6), (8, 12), 3)
    )
    assert torch.equal(
        lors_kernels.select_topk_pixels(scores, (4, 6), (8, 12), 9, per_query=True),
        reference.select_topk_pixels(scores, (4, 6), (8, 12), 9, per_query=True),
    )
    q, k, v, index = attention_inputs(2, 2, 5, 12, 6, 8, True, torch.float32)
    out = lors_kernels.sparse_cross_attention(q, k, v, index)
    assert_close(out, reference.sparse_cross_attention(q.double(), k.double(), v.double(), index), torch.float32)
    assert calls == ["select_windows_cpu", "select_topk_pixels_cpu", "sparse_attention_forward_cpu"]
    # a shared set takes the reference's gather + SDPA (measured faster on CPU), unless forced
    q, k, v, index = attention_inputs(2, 2, 5, 12, 6, 8, False, torch.float32)
    assert_close(
        lors_kernels.sparse_cross_attention(q, k, v, index),
        reference.sparse_cross_attention(q.double(), k.double(), v.double(), index),
        torch.float32,
    )
    assert len(calls) == 3


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
def test_training_on_cpu(per_query):
    """Per-query sets train through the native forward + the written-out backward, shared sets through
    SDPA's autograd: both give the float64 gradients."""
    q, k, v, index = attention_inputs(2, 2, 5, 12, 6, 8, per_query, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn(q.shape)
    (lors_kernels.sparse_cross_attention(*leaves, index) * dout).sum().backward()
    expected = [t.double().requires_grad_() for t in (q, k, v)]
    (reference.sparse_cross_attention(*expected, index) * dout.double()).sum().backward()
    for name, got, want in zip("qkv", leaves, expected):
        assert_close(got.grad, want.grad, torch.float32, f"d{name}")


def test_ops_without_the_extension(monkeypatch):
    """The package falls back to PyTorch when _C is absent."""
    monkeypatch.setattr(backend, "native", lambda: None)
    scores = torch.randn(1, 2, 12)
    assert op.select_topk_pixels_op.route(scores, 3, 4, 6, 8, 5, False).backend == "reference"
    assert torch.equal(
        lors_kernels.select_topk_pixels(scores, (3, 4), (6, 8), 5),
        reference.select_topk_pixels(scores, (3, 4), (6, 8), 5),
    )
    q, k, v, index = attention_inputs(1, 2, 3, 10, 4, 8, False, torch.float32)
    assert_close(
        lors_kernels.sparse_cross_attention(q, k, v, index),
        reference.sparse_cross_attention(q.double(), k.double(), v.double(), index),
        torch.float32,
    )
