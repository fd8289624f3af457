"""`lors::select_windows`, `lors::select_topk_pixels`, `lors::sparse_cross_attention`: input checks,
dispatch, autograd and torch.library registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend, custom_op
from ..custom_op import shape_str
from . import reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # the kernels hold a [BLOCK, D] tile of each operand; wider heads take the reference
# Largest k the fused top-k keeps in registers (its running best list and one block, sorted together).
MAX_FUSED_TOPK = 4096
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # the C++ CPU attention's
# The CUDA top-k kernel's limits (csrc/cuda/hrca.h): low-resolution cells in shared memory, int32 pixels.
NATIVE_MAX_LOW_CELLS = 8192
NATIVE_MAX_PIXELS = 2**30


# ------------------------------------------------------------------------------------------- selection


def _check_scores(name, scores, low_hw, high_hw, k, limit, what):
    if not isinstance(scores, Tensor) or scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise ValueError(f"{name}: scores must be a floating [B, N, n_low] tensor, got "
                         + (shape_str(scores) + f" {scores.dtype}" if isinstance(scores, Tensor) else type(scores).__name__))
    (lh, lw), (hh, hw) = low_hw, high_hw
    if min(lh, lw, hh, hw) <= 0:
        raise ValueError(f"{name}: map sizes must be positive, got low_hw={tuple(low_hw)}, high_hw={tuple(high_hw)}")
    if scores.shape[2] != lh * lw:
        raise ValueError(f"{name}: scores {shape_str(scores)} must have n_low = {lh}*{lw} = {lh * lw} columns")
    if not 1 <= k <= limit:
        raise ValueError(f"{name}: k = {k} must be between 1 and the number of {what} ({limit})")


def _native_fits(x: Tensor, name: str) -> bool:
    """The extension has the CPU function `name` for tensors like x (its kernels take CPU tensors, and
    were measured at least as fast as the PyTorch path wherever they fit)."""
    return x.is_cpu and hasattr(backend.native(), name)


def _maps(low_hw, high_hw):
    return (int(low_hw[0]), int(low_hw[1])), (int(high_hw[0]), int(high_hw[1]))


@torch.library.custom_op("lors::select_windows", mutates_args=())
def _select_windows_op(scores: Tensor, lh: int, lw: int, hh: int, hw: int, k: int) -> Tensor:
    # A top-k over n_low cells and an index expansion: the native CPU kernel, else PyTorch's own kernels
    # (there is no Triton kernel: on CUDA, or with Triton forced, PyTorch runs it).
    if backend.choose(scores, native_fits=_native_fits(scores, "select_windows_cpu")) == "native":
        return backend.native().select_windows_cpu(scores, lh, lw, hh, hw, k)
    return reference.select_windows(scores, (lh, lw), (hh, hw), k)


@_select_windows_op.register_fake
def _(scores, lh, lw, hh, hw, k):
    ws = hh // lh
    return scores.new_empty((scores.shape[0], k * ws * ws), dtype=torch.int64)


def select_windows(scores: Tensor, low_hw, high_hw, k: int) -> Tensor:
    """FASeg's window selection: scores [B, N, n_low] summed over queries, the k best low-resolution
    cells, each expanded to its ws x ws window of the high-resolution map -> int64 [B, k * ws * ws]
    (cells row-major, pixels row-major inside a window). Ties go to the lower cell index."""
    low_hw, high_hw = _maps(low_hw, high_hw)
    _check_scores("select_windows", scores, low_hw, high_hw, k, low_hw[0] * low_hw[1], "low-resolution cells")
    reference.window_size(low_hw, high_hw)  # raises on a non-integer ratio
    return torch.ops.lors.select_windows(scores.detach(), *low_hw, *high_hw, k)


def _topk_pixels(scores, low_hw, high_hw, k, per_query):
    b, n, n_low = scores.shape
    cpu = _native_fits(scores, "select_topk_pixels_cpu")
    # The CUDA kernel runs only when forced: nothing has measured it against Triton yet, so the
    # automatic choice stays Triton, and the extension is looked up only when it can be chosen.
    cuda = (backend.forced_backend() == "native" and scores.is_cuda and n_low <= NATIVE_MAX_LOW_CELLS
            and high_hw[0] * high_hw[1] <= NATIVE_MAX_PIXELS and backend.native_cuda_built())
    which = backend.choose(scores, native_fits=cpu or cuda, native_wins=cpu, triton_fits=k <= MAX_FUSED_TOPK)
    if which == "native" and cuda:
        maps = scores if scores.dtype in KERNEL_DTYPES else scores.float()  # float64: fp32, as Triton reads it
        return backend.native().select_topk_pixels_cuda(maps, *low_hw, *high_hw, k, per_query)
    if which == "native":
        return backend.native().select_topk_pixels_cpu(scores, *low_hw, *high_hw, k, per_query)
    if which == "triton":
        from . import triton as kernels

        maps = scores.float().reshape(b * n, n_low) if per_query else scores.float().sum(1)
        out = kernels.topk_pixels(maps.contiguous(), low_hw, high_hw, k).sort(-1).values
        return out.reshape(b, n, k) if per_query else out
    return reference.select_topk_pixels(scores, low_hw, high_hw, k, per_query=per_query)


@torch.library.custom_op("lors::select_topk_pixels", mutates_args=())
def _select_topk_pixels_op(scores: Tensor, lh: int, lw: int, hh: int, hw: int, k: int, per_query: bool) -> Tensor:
    return _topk_pixels(scores, (lh, lw), (hh, hw), k, per_query)


@_select_topk_pixels_op.register_fake
def _(scores, lh, lw, hh, hw, k, per_query):
    shape = (scores.shape[0], scores.shape[1], k) if per_query else (scores.shape[0], k)
    return scores.new_empty(shape, dtype=torch.int64)


def select_topk_pixels(scores: Tensor, low_hw, high_hw, k: int, *, per_query: bool = False) -> Tensor:
    """The k best pixels of the bilinearly upsampled scores (F.interpolate, align_corners=False), shared
    per image (scores summed over queries, -> int64 [B, k]) or per query (-> [B, N, k]); sorted
    ascending, ties to the lower index. The upsampled map is never materialized: on CUDA one Triton
    program per map keeps a running top-k (k <= 4096), elsewhere rows are merged a chunk at a time."""
    low_hw, high_hw = _maps(low_hw, high_hw)
    _check_scores("select_topk_pixels", scores, low_hw, high_hw, k, high_hw[0] * high_hw[1],
                  "high-resolution pixels")
    args = (scores.detach(), *low_hw, *high_hw, k, bool(per_query))
    if torch.compiler.is_compiling():
        return torch.ops.lors.select_topk_pixels(*args)
    return _topk_pixels(args[0], low_hw, high_hw, k, per_query)


# ------------------------------------------------------------------------------------------- attention


def check_inputs(q, k, v, index) -> None:
    """q [B, H, N, D], k/v [B, H, L, D], index [B, S] or [B, N, S] (int32/int64)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("index", index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"sparse_cross_attention: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"sparse_cross_attention: {name} must be 4-D [B, H, *, D], got {shape_str(t)}")
    b, h, n, d = q.shape
    if tuple(k.shape[:2]) != (b, h) or k.shape[3] != d or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"sparse_cross_attention: k {shape_str(k)} and v {shape_str(v)} must both be "
                         f"[B, H, L, D] = [{b}, {h}, L, {d}] for q {shape_str(q)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sparse_cross_attention: index must be int32 or int64, got {index.dtype}")
    if not (index.dim() == 2 and index.shape[0] == b) and not (index.dim() == 3 and tuple(index.shape[:2]) == (b, n)):
        raise ValueError(f"sparse_cross_attention: index {shape_str(index)} must be [B, S] = [{b}, S] (shared) or "
                         f"[B, N, S] = [{b}, {n}, S] (per query)")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"sparse_cross_attention: q, k, v must share one floating dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or index.device != q.device:
        raise ValueError(f"sparse_cross_attention: all tensors must be on one device, got q={q.device}, "
                         f"k={k.device}, v={v.device}, index={index.device}")


def check_index_range(index: Tensor, length: int) -> None:
    """Out-of-range entries would read and write outside k/v: one min/max reduction (one device sync)."""
    if index.numel():
        low, high = torch.stack(torch.aminmax(index)).tolist()
        if low < -1 or high >= length:
            raise IndexError(f"sparse_cross_attention: index entries must be -1 (padding) or in [0, {length}) "
                             f"(L = {length} keys), got values in [{low}, {high}]")


def _route(q, index) -> str:
    """Which backend computes the attention. The native CPU kernel has a forward only: its backward is
    the reference's (which recomputes what it needs from q, k, v and index). It runs automatically for
    per-query sets only: measured at ADE size (N=100, S=512, 8 heads, D=32, 2 threads, idle machine), a
    per-query forward takes 4.8 ms native vs 76 ms gathered, but a shared set 1.8 ms native vs 0.77 ms
    for the reference's one gather + SDPA (a GEMM; the kernel's dot products are not)."""
    fits = q.dtype in KERNEL_DTYPES and q.shape[-1] <= MAX_HEAD_DIM
    native = q.dtype in NATIVE_DTYPES and _native_fits(q, "sparse_attention_forward_cpu")
    which = backend.choose(q, native_fits=native, native_wins=native and index.dim() == 3, triton_fits=fits)
    if which == "triton" and not (q.numel() > 0 and index.shape[-1] > 0):
        return "reference"  # nothing to launch: the reference handles the empty cases
    return which


def _rows_contiguous(*tensors):
    """The kernels index rows by stride and read each row's D values contiguously."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def attend(q, k, v, index, scale):
    """(out, lse): the attention and each row's fp32 log-sum-exp (+inf for a row with no valid key)."""
    which = _route(q, index)
    if which == "triton":
        from . import triton as kernels

        return kernels.attention_forward(*_rows_contiguous(q, k, v), index.contiguous(), scale)
    if which == "native":
        return backend.native().sparse_attention_forward_cpu(q, k, v, index, scale)
    return reference.attention_with_lse(q, k, v, index, scale)


def backward(dout, q, k, v, index, out, lse, scale):
    """(dq, dk, dv). On CUDA, dk/dv sum by fp32 atomics, or deterministically when
    torch.use_deterministic_algorithms(True) is on."""
    if _route(q, index) == "triton":
        from . import triton as kernels

        return kernels.attention_backward(dout, *_rows_contiguous(q, k, v), index.contiguous(), out, lse, scale,
                                          torch.are_deterministic_algorithms_enabled())
    return reference.sparse_cross_attention_backward(dout, q, k, v, index, scale)


@torch.library.custom_op("lors::sparse_cross_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    check_inputs(q, k, v, index)
    check_index_range(index, k.shape[2])  # compiled graphs reach here without the eager wrapper's check
    out, lse = attend(q, k, v, index, scale)
    return out.contiguous(), lse


@_attention_op.register_fake
def _(q, k, v, index, scale):
    check_inputs(q, k, v, index)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("lors::sparse_cross_attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, out: Tensor, lse: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(g.contiguous() for g in backward(dout, q, k, v, index, out, lse, scale))


@_attention_backward_op.register_fake
def _(dout, q, k, v, index, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, index, scale = inputs
    ctx.save_for_backward(q, k, v, index, *output)
    ctx.scale = scale


def _gradients(backward_fn):
    def grads(ctx, dout, _dlse):  # lse is internal: the public function never returns it
        q, k, v, index, out, lse = ctx.saved_tensors
        return (*backward_fn(dout, q, k, v, index, out, lse, ctx.scale), None, None)

    return grads


_attention_op.register_autograd(_gradients(torch.ops.lors.sparse_cross_attention_backward),
                                setup_context=_setup_context)
_AttentionFunction = custom_op.eager_twin(attend, _setup_context, _gradients(backward))


def _forward(q, k, v, index, scale):
    if _route(q, index) != "reference":
        return attend(q, k, v, index, scale)[0]
    return reference.sparse_cross_attention(q, k, v, index, scale)  # no log-sum-exp to compute


def _recorded(q, k, v, index, scale):
    """With autograd recording: the kernels' Function, or on the reference its own autograd. On CPU the
    native forward (per-query sets, see _route) pairs with the written-out PyTorch backward: faster
    than autograd through the per-query gathers (ADE size, fwd+bwd: 0.14x top-k + gather + SDPA)."""
    if _route(q, index) != "reference":
        return _AttentionFunction.apply(q, k, v, index, scale)[0]
    return reference.sparse_cross_attention(q, k, v, index, scale)


def sparse_cross_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, scale: float | None = None) -> Tensor:
    """softmax(q k_S^T * scale) v_S per (batch, head, query) over the key rows S listed in `index`.

    q [B, H, N, D], k/v [B, H, L, D]; index [B, S] (one set shared by every query of an image) or
    [B, N, S] (a set per query), int32 or int64, -1 = padding. Duplicated entries count once per
    occurrence; a row with no valid entry returns zeros. scale defaults to D ** -0.5. On CUDA the
    kernels read K/V rows by index (no gathered copies) and keep only each row's log-sum-exp."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return torch.ops.lors.sparse_cross_attention(q, k, v, index, scale)[0]
    check_inputs(q, k, v, index)
    check_index_range(index, k.shape[2])
    return custom_op.eager(_forward, _recorded, q, k, v, index, scale)
