"""hrca/op.py: the custom ops' gradient and opchecks, input checks (index range in compiled graphs too),
and selection ties on every route."""

import pytest
import torch
from helpers import KERNEL_DEVICE, route_device

import lors_kernels as lk
from lors_kernels.hrca import reference

from .oracle import attention_inputs, dyadic_scores, exact_topk, masked_attention64


def test_attention_op_gradcheck_float64(use_backend):
    use_backend("reference")  # the op's explicit backward formula, not the reference's autograd
    q, k, v, index = attention_inputs(1, 2, 3, 6, 5, 4, True, torch.float64, "cpu")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.lors.sparse_cross_attention(q, k, v, index, 0.5)[0], leaves
    )


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_attention_opcheck(backend_name, per_query, use_backend):
    use_backend(backend_name)
    q, k, v, index = attention_inputs(1, 2, 3, 10, 6, 16, per_query, torch.float32)
    args = [t.requires_grad_() for t in (q, k, v)] + [index, 0.25]
    torch.library.opcheck(torch.ops.lors.sparse_cross_attention.default, args)


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


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_topk_pixels_border_plateau_ties_go_to_the_lower_index(backend_name, use_backend):
    """Clamped border taps repeat one cell: those pixels are equal and the lower index wins (a
    (1 - w) a + w a interpolation would order them by rounding instead)."""
    use_backend(backend_name)
    scores = torch.tensor([[[0.1, 0.2, 0.3, 0.7]]]).to(KERNEL_DEVICE)
    got = lk.select_topk_pixels(scores, (2, 2), (16, 16), 5)
    assert got.tolist() == [[204, 205, 206, 207, 220]]


@pytest.mark.parametrize("special", ["+inf", "-inf", "+inf,-inf", "nan"])
@pytest.mark.parametrize("backend_name", ["reference", "native", "triton"])
def test_topk_pixels_follow_the_bilinear_sum_through_infinities(backend_name, special, use_backend):
    """Every pixel a +inf cell weighs is +inf (a tie: lower index first), not NaN as a + w (b - a) made
    it; +inf meeting -inf is NaN, and NaN ranks first (oracle.exact_topk, the definition)."""
    use_backend(backend_name)
    scores = dyadic_scores(1, 2, 16, seed=3)
    for cell, value in zip((5, 6), special.split(",")):
        scores[0, 0, cell] = float(value)
    for per_query in (False, True):
        got = lk.select_topk_pixels(scores.to(KERNEL_DEVICE), (4, 4), (16, 16), 40, per_query=per_query)
        assert torch.equal(got.cpu(), exact_topk(scores, (4, 4), (16, 16), 40, per_query))


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


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("backend_name", ["auto", "reference", "native", "triton"])
def test_rows_no_index_selects_cannot_reach_the_result(backend_name, per_query, use_backend):
    """NaN and inf in key/value rows that no index entry lists (row 0 among them, which padding slots
    read before they are masked) leave the output and the gradients of q, k, v finite and exact."""
    use_backend(None if backend_name == "auto" else backend_name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 2, 4, 8, generator=g),
        torch.randn(2, 2, 6, 8, generator=g),
        torch.randn(2, 2, 6, 8, generator=g),
    )
    index = torch.tensor([[3, 1, -1, 4, 1], [5, -1, -1, 2, 3]])
    if per_query:
        index = index[:, None].expand(2, 4, 5).contiguous()
    k[:, :, 0], v[:, :, 0] = float("nan"), float("inf")  # row 0: never listed
    device = route_device(backend_name)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = lk.sparse_cross_attention(*leaves, index.to(device))
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    expected = masked_attention64(q, k, v, index)
    torch.testing.assert_close(out.double().cpu(), expected.detach(), atol=1e-5, rtol=1e-5)
    assert all(bool(torch.isfinite(t).all()) for t in grads)
    assert not bool(grads[1][:, :, 0].any()) and not bool(grads[2][:, :, 0].any())  # row 0: zero gradient


EMPTY_ATTENTION = {  # (B, L keys, S slots): every index entry padding when there are no keys
    "no_images": (0, 6, 4),
    "no_keys": (2, 0, 4),
    "no_slots": (2, 6, 0),
}


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("case", list(EMPTY_ATTENTION))
@pytest.mark.parametrize("backend_name", ["auto", "reference", "native", "triton"])
def test_attention_of_empty_sets_gives_zeros_and_zero_gradients(backend_name, case, per_query, use_backend):
    use_backend(None if backend_name == "auto" else backend_name)
    b, length, slots = EMPTY_ATTENTION[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, 2, 3, 8, generator=g), *(torch.randn(b, 2, length, 8, generator=g) for _ in "kv"))
    shape = (b, 3, slots) if per_query else (b, slots)
    index = torch.randint(0, length, shape, generator=g) if length else torch.full(shape, -1)
    device = route_device(backend_name)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out = lk.sparse_cross_attention(*leaves, index.to(device))
    assert out.shape == q.shape and not bool(out.any())
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert [g.shape for g in grads] == [t.shape for t in leaves] and not any(bool(g.any()) for g in grads)


@pytest.mark.parametrize("backend_name", ["reference", "native", "triton"])
def test_window_selection_of_no_images_is_empty(backend_name, use_backend):
    use_backend(backend_name)
    assert lk.select_windows(torch.randn(0, 5, 16), (4, 4), (8, 8), 2).shape == (0, 2 * 2 * 2)


BAD_MAPS = {
    "high_hw_3": ((4, 4), (8, 8, 1), "high_hw must be a .height, width. pair, got \\(8, 8, 1\\)"),
    "low_hw_int": (4, (8, 8), "low_hw must be a .height, width. pair, got 4"),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
@pytest.mark.parametrize("select", ["select_windows", "select_topk_pixels"])
def test_map_sizes_that_are_not_pairs_are_named(select, case):
    low_hw, high_hw, message = BAD_MAPS[case]
    with pytest.raises(TypeError, match=f"{select}: {message}"):
        getattr(lk, select)(torch.randn(1, 2, 16), low_hw, high_hw, 2)
