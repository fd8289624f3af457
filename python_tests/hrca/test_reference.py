"""hrca/reference.py: window and top-k selection against brute force, sparse attention against float64
loops over the listed positions."""

import pytest
import torch
from helpers import assert_close

from lors_kernels.hrca import reference

from .oracle import brute_topk


def brute_windows(scores, low_hw, high_hw, k):
    (lh, lw), (hh, hw) = low_hw, high_hw
    ws = hh // lh
    out = []
    for b in range(scores.shape[0]):
        total = scores[b].sum(0).tolist()
        cells = sorted(sorted(range(len(total)), key=lambda c: (-total[c], c))[:k])
        out.append(
            [
                (cy * ws + dy) * hw + cx * ws + dx
                for cy, cx in ((c // lw, c % lw) for c in cells)
                for dy in range(ws)
                for dx in range(ws)
            ]
        )
    return torch.tensor(out)


@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
def test_select_windows_matches_brute_force(tied):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (2, 5, 4 * 6), generator=g).double() if tied else torch.rand(2, 5, 24, generator=g)
    got = reference.select_windows(scores, (4, 6), (16, 24), 5)
    assert got.shape == (2, 5 * 16)
    assert torch.equal(got, brute_windows(scores, (4, 6), (16, 24), 5))


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
