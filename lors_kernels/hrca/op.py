"""`lors::select_windows`, `lors::select_topk_pixels`, `lors::sparse_cross_attention`: input checks,
dispatch, autograd and torch.library registration."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import backend
from ..registry import Impl, as_float, define_op, public, require_tensors, shape_str
from . import reference

if backend.triton_available():  # optional: without Triton its rows never run (registry.Impl.runs_on)
    from . import triton as kernels

MAX_HEAD_DIM = 256  # the kernels hold a [BLOCK, D] tile of each operand; wider heads take the reference
# Largest k the fused top-k keeps in registers (its running best list and one block, sorted together).
MAX_FUSED_TOPK = 4096
# The CUDA top-k kernel's limits (csrc/cuda/hrca.h): low-resolution cells in shared memory, int32 pixels.
NATIVE_MAX_LOW_CELLS = 8192
NATIVE_MAX_PIXELS = 2**30


# ------------------------------------------------------------------------------------------- selection


def _check_scores(name, scores, low_hw, high_hw, k, limit, what):
    if not isinstance(scores, Tensor) or scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise ValueError(
            f"{name}: scores must be a floating [B, N, n_low] tensor, got "
            + (shape_str(scores) + f" {scores.dtype}" if isinstance(scores, Tensor) else type(scores).__name__)
        )
    (lh, lw), (hh, hw) = low_hw, high_hw
    if min(lh, lw, hh, hw) <= 0:
        raise ValueError(f"{name}: map sizes must be positive, got low_hw={tuple(low_hw)}, high_hw={tuple(high_hw)}")
    if scores.shape[2] != lh * lw:
        raise ValueError(f"{name}: scores {shape_str(scores)} must have n_low = {lh}*{lw} = {lh * lw} columns")
    if not 1 <= k <= limit:
        raise ValueError(f"{name}: k = {k} must be between 1 and the number of {what} ({limit})")


def _maps(name: str, low_hw, high_hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two map sizes as (height, width) int pairs; anything else is a clear error."""
    for label, hw in (("low_hw", low_hw), ("high_hw", high_hw)):
        if isinstance(hw, (str, bytes)) or not hasattr(hw, "__len__") or len(hw) != 2:
            raise TypeError(f"{name}: {label} must be a (height, width) pair, got {hw!r}")
    return (int(low_hw[0]), int(low_hw[1])), (int(high_hw[0]), int(high_hw[1]))


def check_select_windows(scores: Tensor, lh: int, lw: int, hh: int, hw: int, k: int) -> None:
    _check_scores("select_windows", scores, (lh, lw), (hh, hw), k, lh * lw, "low-resolution cells")
    reference.window_size((lh, lw), (hh, hw))  # raises on a non-integer ratio


def _native_windows(scores, lh, lw, hh, hw, k):
    return backend.native().select_windows_cpu(scores, lh, lw, hh, hw, k)


# A top-k over n_low cells and an index expansion: the native CPU kernel, else PyTorch's own kernels
# (there is no Triton kernel: on CUDA, or with Triton forced, PyTorch runs it).
select_windows_op = define_op(
    "select_windows",
    "(Tensor scores, int lh, int lw, int hh, int hw, int k) -> Tensor",
    check=check_select_windows,
    fake=lambda scores, lh, lw, hh, hw, k: scores.new_empty((scores.shape[0], k * (hh // lh) ** 2), dtype=torch.int64),
    impls=[
        Impl("native", "cpu", _native_windows),
        Impl(
            "reference", None, lambda scores, lh, lw, hh, hw, k: reference.select_windows(scores, (lh, lw), (hh, hw), k)
        ),
    ],
)


@public(select_windows_op)
def select_windows(
    scores: Tensor, low_hw: tuple[int, int] | Sequence[int], high_hw: tuple[int, int] | Sequence[int], k: int
) -> tuple:
    """FASeg's window selection: scores [B, N, n_low] summed over queries, the k best low-resolution
    cells, each expanded to its ws x ws window of the high-resolution map -> int64 [B, k * ws * ws]
    (cells row-major, pixels row-major inside a window). Ties go to the lower cell index."""
    low_hw, high_hw = _maps("select_windows", low_hw, high_hw)
    return scores.detach() if isinstance(scores, Tensor) else scores, *low_hw, *high_hw, int(k)


def check_select_topk_pixels(scores: Tensor, lh: int, lw: int, hh: int, hw: int, k: int, per_query: bool) -> None:
    _check_scores("select_topk_pixels", scores, (lh, lw), (hh, hw), k, hh * hw, "high-resolution pixels")


def _triton_topk(scores, lh, lw, hh, hw, k, per_query):
    b, n, n_low = scores.shape
    maps = scores.float().reshape(b * n, n_low) if per_query else scores.float().sum(1)
    out = kernels.topk_pixels(maps.contiguous(), (lh, lw), (hh, hw), k).sort(-1).values
    return out.reshape(b, n, k) if per_query else out


def _native_cuda_topk(scores, *args):
    maps = scores if scores.dtype in backend.TRITON_DTYPES else scores.float()  # float64: fp32, as Triton reads it
    return backend.native().select_topk_pixels_cuda(maps, *args)


def _native_cpu_topk(scores, lh, lw, hh, hw, k, per_query):
    return backend.native().select_topk_pixels_cpu(scores, lh, lw, hh, hw, k, per_query)


select_topk_pixels_op = define_op(
    "select_topk_pixels",
    "(Tensor scores, int lh, int lw, int hh, int hw, int k, bool per_query) -> Tensor",
    check=check_select_topk_pixels,
    fake=lambda scores, lh, lw, hh, hw, k, per_query: scores.new_empty(
        (scores.shape[0], scores.shape[1], k) if per_query else (scores.shape[0], k), dtype=torch.int64
    ),
    impls=[
        Impl("triton", "cuda", _triton_topk, fits=lambda c: c.k <= MAX_FUSED_TOPK, takes=f"k <= {MAX_FUSED_TOPK}"),
        # The CUDA radix select runs only when forced: nothing has measured it against Triton yet.
        Impl(
            "native",
            "cuda",
            _native_cuda_topk,
            auto=False,
            fits=lambda c: (
                c.lh * c.lw <= NATIVE_MAX_LOW_CELLS and c.hh * c.hw <= NATIVE_MAX_PIXELS and backend.native_has_cuda()
            ),
            takes=f"at most {NATIVE_MAX_LOW_CELLS} low-resolution cells and 2^30 pixels, in CUDA builds",
        ),
        Impl("native", "cpu", _native_cpu_topk),
        Impl(
            "reference",
            None,
            lambda scores, lh, lw, hh, hw, k, per_query: reference.select_topk_pixels(
                scores, (lh, lw), (hh, hw), k, per_query=per_query
            ),
        ),
    ],
)


@public(select_topk_pixels_op)
def select_topk_pixels(
    scores: Tensor,
    low_hw: tuple[int, int] | Sequence[int],
    high_hw: tuple[int, int] | Sequence[int],
    k: int,
    *,
    per_query: bool = False,
) -> tuple:
    """The k best pixels of the bilinearly upsampled scores (F.interpolate, align_corners=False), shared
    per image (scores summed over queries, -> int64 [B, k]) or per query (-> [B, N, k]); sorted
    ascending, ties to the lower index. The upsampled map is never materialized: on CUDA one Triton
    program per map keeps a running top-k (k <= 4096), elsewhere rows are merged a chunk at a time."""
    low_hw, high_hw = _maps("select_topk_pixels", low_hw, high_hw)
    return scores.detach() if isinstance(scores, Tensor) else scores, *low_hw, *high_hw, int(k), bool(per_query)


# ------------------------------------------------------------------------------------------- attention


def check_sparse_cross_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float | None = None) -> None:
    """q [B, H, N, D], k/v [B, H, L, D], index [B, S] or [B, N, S] (int32/int64)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("index", index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"sparse_cross_attention: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"sparse_cross_attention: {name} must be 4-D [B, H, *, D], got {shape_str(t)}")
    b, h, n, d = q.shape
    if tuple(k.shape[:2]) != (b, h) or k.shape[3] != d or tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"sparse_cross_attention: k {shape_str(k)} and v {shape_str(v)} must both be "
            f"[B, H, L, D] = [{b}, {h}, L, {d}] for q {shape_str(q)}"
        )
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sparse_cross_attention: index must be int32 or int64, got {index.dtype}")
    if not (index.dim() == 2 and index.shape[0] == b) and not (index.dim() == 3 and tuple(index.shape[:2]) == (b, n)):
        raise ValueError(
            f"sparse_cross_attention: index {shape_str(index)} must be [B, S] = [{b}, S] (shared) or "
            f"[B, N, S] = [{b}, {n}, S] (per query)"
        )
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"sparse_cross_attention: q, k, v must share one floating dtype, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}; convert k and v first, e.g. k.to(q.dtype)"
        )
    if k.device != q.device or v.device != q.device or index.device != q.device:
        raise ValueError(
            f"sparse_cross_attention: all tensors must be on one device, got q={q.device}, "
            f"k={k.device}, v={v.device}, index={index.device}"
        )


def check_index_range(
    q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float | None = None, *, sync: bool = True
) -> None:
    """Out-of-range entries would read and write outside k/v. With sync, a clear error from one min/max
    reduction (one device sync in eager calls); without (compiled graphs and CUDA-graph capture on a
    GPU), a device-side assert that never stops the host, and that ends the CUDA context if it fails."""
    if not index.numel():
        return
    length = k.shape[2]
    message = f"sparse_cross_attention: index entries must be -1 (padding) or in [0, {length}) (L = {length} keys)"
    if not sync:
        torch._assert_async(((index >= -1) & (index < length)).all(), message)
        return
    low, high = torch.stack(torch.aminmax(index)).tolist()
    if low < -1 or high >= length:
        raise IndexError(f"{message}, got values in [{low}, {high}]")


def _unit_rows(*tensors):
    """The Triton kernels read rows with unit stride (other strides as they are)."""
    return [t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _triton_attention(q, k, v, index, scale):
    return kernels.attention_forward(*_unit_rows(q, k, v, index), scale)


def _triton_attention_backward(c, dout):
    """dk/dv sum by fp32 atomics, or deterministically when torch.use_deterministic_algorithms(True) is on."""
    return kernels.attention_backward(
        dout, *_unit_rows(c.q, c.k, c.v, c.index), c.out, c.lse, c.scale, torch.are_deterministic_algorithms_enabled()
    )


def _native_attention(q, k, v, index, scale):
    return backend.native().sparse_attention_forward_cpu(q, k, v, index, scale)


def _reference_attention_backward(c, dout):
    return reference.sparse_cross_attention_backward(dout, c.q, c.k, c.v, c.index, c.scale)


sparse_cross_attention_op = define_op(
    "sparse_cross_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor index, float scale) -> (Tensor out, Tensor lse)",
    check=check_sparse_cross_attention,
    validate=check_index_range,
    fake=lambda q, k, v, index, scale: (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)),
    returns=1,
    save=("out", "lse"),
    grads=("q", "k", "v"),
    impls=[
        Impl(
            "triton",
            "cuda",
            _triton_attention,
            _triton_attention_backward,
            fits=lambda c: c.q.dtype in backend.TRITON_DTYPES and c.q.shape[-1] <= MAX_HEAD_DIM,
            takes=f"float32, float16, bfloat16, head dims up to {MAX_HEAD_DIM}",
        ),
        # A forward only: it pairs with the reference's written-out backward, faster than autograd through
        # the per-query gathers (ADE size, fwd+bwd: 0.14x top-k + gather + SDPA). It runs automatically for
        # per-query sets only: measured at ADE size (N=100, S=512, 8 heads, D=32, 2 threads, idle machine),
        # a per-query forward takes 4.8 ms native vs 76 ms gathered, but a shared set 1.8 ms native vs
        # 0.77 ms for the reference's one gather + SDPA (a GEMM; the kernel's dot products are not).
        Impl(
            "native",
            "cpu",
            _native_attention,
            _reference_attention_backward,
            fits=lambda c: c.q.dtype in backend.NATIVE_CPU_DTYPES,
            wins=lambda c: c.index.dim() == 3,
            takes="float32, bfloat16",
        ),
        # Recording, the reference's own autograd (gather + SDPA), and no log-sum-exp to compute.
        Impl(
            "reference",
            None,
            reference.attention_with_lse,
            _reference_attention_backward,
            eager=reference.sparse_cross_attention,
        ),
    ],
)


@public(sparse_cross_attention_op)
def sparse_cross_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, scale: float | None = None) -> tuple:
    """softmax(q k_S^T * scale) v_S per (batch, head, query) over the key rows S listed in `index`.

    q [B, H, N, D], k/v [B, H, L, D]; index [B, S] (one set shared by every query of an image) or
    [B, N, S] (a set per query), int32 or int64, -1 = padding. Duplicated entries count once per
    occurrence; a row with no valid entry returns zeros. scale defaults to D ** -0.5. On CUDA the
    kernels read K/V rows by index (no gathered copies) and keep only each row's log-sum-exp."""
    require_tensors("sparse_cross_attention", q=q, k=k, v=v, index=index)
    scale = q.shape[-1] ** -0.5 if scale is None else as_float("sparse_cross_attention", "scale", scale)
    return q, k, v, index, scale
