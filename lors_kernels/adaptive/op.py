"""`lors::adaptive_mixing`: input checks, dispatch, autograd and torch.library registration."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, custom_op
from ..custom_op import shape_str
from . import reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-5



def check_inputs(x, m, s, channel_private, spatial_private) -> None:
    """x [BN, G, P_in, C_in], M [BN, G, C_in, C_out], S [BN, G, P_out, P_in], privates (E, Q, F)."""
    for name, t in (("x", x), ("M", m), ("S", s)):
        if not isinstance(t, Tensor):
            raise TypeError(f"adaptive_mixing: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"adaptive_mixing: {name} must be 4-D, got {shape_str(t)}")
    bn, groups, p_in, c_in = x.shape
    if tuple(m.shape[:3]) != (bn, groups, c_in):
        raise ValueError(f"adaptive_mixing: M {shape_str(m)} must be [BN, G, C_in, C_out] = [{bn}, {groups}, {c_in}, *] "
                         f"for x {shape_str(x)}")
    if tuple(s.shape[:2]) != (bn, groups) or s.shape[3] != p_in:
        raise ValueError(f"adaptive_mixing: S {shape_str(s)} must be [BN, G, P_out, P_in] = [{bn}, {groups}, *, {p_in}] "
                         f"for x {shape_str(x)}")
    c_out, p_out = m.shape[3], s.shape[2]
    ranks = []  # a list: symbolic sizes are not hashable
    for label, private, rows, cols in (("channel_private", channel_private, c_in, c_out),
                                       ("spatial_private", spatial_private, p_out, p_in)):
        if private is None:
            continue
        if not (isinstance(private, (tuple, list)) and len(private) == 3
                and all(isinstance(t, Tensor) for t in private)):
            raise TypeError(f"adaptive_mixing: {label} must be a tuple of tensors (E, Q, F)")
        e, q, f = private
        if e.dim() != 3 or q.dim() != 4 or f.dim() != 3:
            raise ValueError(f"adaptive_mixing: {label} must be E [G*K, {rows}, r], Q [BN, G*K, r, r], "
                             f"F [G*K, r, {cols}]; got {shape_str(e)}, {shape_str(q)}, {shape_str(f)}")
        gk, r = e.shape[0], e.shape[2]
        if (gk % max(groups, 1) or tuple(e.shape) != (gk, rows, r) or tuple(q.shape) != (bn, gk, r, r)
                or tuple(f.shape) != (gk, r, cols)):
            raise ValueError(f"adaptive_mixing: {label} must be E [G*K, {rows}, r], Q [{bn}, G*K, r, r], "
                             f"F [G*K, r, {cols}] with G = {groups}; got {shape_str(e)}, {shape_str(q)}, {shape_str(f)}")
        ranks.append(r)
    if len(ranks) == 2 and ranks[0] != ranks[1]:
        raise ValueError(f"adaptive_mixing: channel and spatial private parts must share one rank, got {sorted(ranks)}")
    tensors = {"x": x, "M": m, "S": s}
    for label, private in (("channel_private", channel_private), ("spatial_private", spatial_private)):
        if private is not None:
            tensors.update({f"{label}.{n}": t for n, t in zip("EQF", private)})
    if any(t.dtype != x.dtype for t in tensors.values()) or x.dtype not in (*KERNEL_DTYPES, torch.float64):
        raise TypeError("adaptive_mixing: all tensors must share one floating dtype, got "
                        + ", ".join(f"{n}={t.dtype}" for n, t in tensors.items()))
    if any(t.device != x.device for t in tensors.values()):
        raise ValueError("adaptive_mixing: all tensors must be on one device, got "
                         + ", ".join(f"{n}={t.device}" for n, t in tensors.items()))


def _private(e, q, f):
    return None if e is None else (e, q, f)


NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # the C++ CPU kernels'


def _route(x: Tensor) -> str:
    """Which backend mixes tensors like x. The native CPU kernels run automatically in fp32 only:
    measured on 2 cores against the eager reference, fp32 is 2.3-3.3x faster forward and 1.65-1.9x
    forward+backward; bf16 is even forward and 0.74-0.84x forward+backward (eager's bf16 matmuls use
    AVX512-BF16 at twice the fp32 rate, the kernels compute in fp32)."""
    fits = x.is_cpu and x.dtype in NATIVE_DTYPES and hasattr(backend.native(), "adaptive_mixing_forward_cpu")
    return backend.choose(x, native_fits=fits, native_wins=fits and x.dtype == torch.float32,
                          triton_fits=x.dtype in KERNEL_DTYPES)


def forward(x, m, s, em, qm, fm, es, qs, fs, eps):
    which = _route(x)
    if which == "triton":
        from . import triton as kernels

        parts = [t if t is None else t.contiguous() for t in (x, m, s, em, qm, fm, es, qs, fs)]
        return kernels.mixing_forward(*parts[:3], _private(*parts[3:6]), _private(*parts[6:9]), eps)
    if which == "native":
        return backend.native().adaptive_mixing_forward_cpu(x, m, s, em, qm, fm, es, qs, fs, eps)
    return reference.adaptive_mixing(x, m, s, _private(em, qm, fm), _private(es, qs, fs), eps)


def forward_saving(x, m, s, em, qm, fm, es, qs, fs, eps):
    """The forward of a training step: (out, pre1). On the native CPU path pre1 = x @ M_eff (fp32), which
    the backward reads instead of recomputing: 8% of a CPU step at B=2, N=100 (64 -> 59 ms), for
    BN*G*P_in*C_out*4 bytes held until the backward (13 MB there). Elsewhere pre1 is empty."""
    if _route(x) != "native":
        return forward(x, m, s, em, qm, fm, es, qs, fs, eps), x.new_empty(0, dtype=torch.float32)
    pre1 = x.new_empty((*x.shape[:3], m.shape[3]), dtype=torch.float32)
    return backend.native().adaptive_mixing_forward_cpu(x, m, s, em, qm, fm, es, qs, fs, eps, pre1), pre1


def backward(dout, x, m, s, em, qm, fm, es, qs, fs, eps, pre1=None):
    """(dx, dM, dS, dE^M, dQ^M, dF^M, dE^S, dQ^S, dF^S); private gradients are None when absent.
    pre1: what forward_saving saved (used on the native path)."""
    which = _route(x)
    if which == "native":
        saved = pre1 if pre1 is not None and pre1.numel() else None
        return tuple(backend.native().adaptive_mixing_backward_cpu(dout, x, m, s, em, qm, fm, es, qs, fs, eps, saved))
    if which == "triton":
        from . import triton as kernels

        parts = [t if t is None else t.contiguous() for t in (x, m, s, em, qm, fm, es, qs, fs)]
        grads = kernels.mixing_backward(dout, *parts[:3], _private(*parts[3:6]), _private(*parts[6:9]), eps)
    else:
        grads = reference.adaptive_mixing_backward(dout, x, m, s, _private(em, qm, fm), _private(es, qs, fs), eps)
    dx, dm, ds, dcm, dsp = grads
    return (dx, dm, ds, *(dcm or (None,) * 3), *(dsp or (None,) * 3))



@torch.library.custom_op("lors::adaptive_mixing", mutates_args=())
def _adaptive_mixing_op(x: Tensor, m: Tensor, s: Tensor, em: Optional[Tensor], qm: Optional[Tensor],
                        fm: Optional[Tensor], es: Optional[Tensor], qs: Optional[Tensor], fs: Optional[Tensor],
                        eps: float) -> Tensor:
    check_inputs(x, m, s, _private(em, qm, fm), _private(es, qs, fs))
    return forward(x, m, s, em, qm, fm, es, qs, fs, eps)


@_adaptive_mixing_op.register_fake
def _(x, m, s, em, qm, fm, es, qs, fs, eps):
    check_inputs(x, m, s, _private(em, qm, fm), _private(es, qs, fs))
    return x.new_empty((*x.shape[:2], s.shape[2], m.shape[3]))


@torch.library.custom_op("lors::adaptive_mixing_backward", mutates_args=())
def _adaptive_mixing_backward_op(dout: Tensor, x: Tensor, m: Tensor, s: Tensor, em: Optional[Tensor],
                                 qm: Optional[Tensor], fm: Optional[Tensor], es: Optional[Tensor],
                                 qs: Optional[Tensor], fs: Optional[Tensor], eps: float) -> list[Tensor]:
    """Every gradient, an empty tensor for each absent private input (ops return tensors)."""
    grads = backward(dout, x, m, s, em, qm, fm, es, qs, fs, eps)
    return [x.new_empty(0) if g is None else g.contiguous() for g in grads]


@_adaptive_mixing_backward_op.register_fake
def _(dout, x, m, s, em, qm, fm, es, qs, fs, eps):
    return [x.new_empty(0) if t is None else t.new_empty(t.shape) for t in (x, m, s, em, qm, fm, es, qs, fs)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.eps = inputs[9]


def _setup_saving(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs[:9], output[1])
    ctx.eps = inputs[9]


def _gradients(backward_fn):
    def grads(ctx, dout, *_):  # forward_saving's pre1 gets no gradient
        inputs, pre1 = ctx.saved_tensors[:9], ctx.saved_tensors[9:]
        result = backward_fn(dout, *inputs, ctx.eps, *pre1)
        return (*[None if t is None else g for g, t in zip(result, inputs)], None)

    return grads


# The compiled op recomputes pre1 in the backward: it cannot tell a training forward from inference.
_adaptive_mixing_op.register_autograd(_gradients(torch.ops.lors.adaptive_mixing_backward),
                                      setup_context=_setup_context)
_AdaptiveMixingFunction = custom_op.eager_twin(forward_saving, _setup_saving, _gradients(backward))


def _recorded(x, m, s, em, qm, fm, es, qs, fs, eps):
    """With autograd recording: the kernels' Function, or on the reference its own autograd, which
    keeps what it needs as the eager code it replaces does."""
    if _route(x) != "reference":
        return _AdaptiveMixingFunction.apply(x, m, s, em, qm, fm, es, qs, fs, eps)[0]
    return reference.adaptive_mixing(x, m, s, _private(em, qm, fm), _private(es, qs, fs), eps)


def adaptive_mixing(x: Tensor, M: Tensor, S: Tensor, *, channel_private=None, spatial_private=None,
                    eps: float = EPS) -> Tensor:
    """AdaMixer's adaptive mixing with LORS^A private parts, fused.

    x [BN, G, P_in, C_in] or [B, N, G, P_in, C_in]; M [BN, G, C_in, C_out]; S [BN, G, P_out, P_in];
    channel_private = (E [G*K, C_in, r], Q [BN, G*K, r, r], F [G*K, r, C_out]) and spatial_private =
    (E [G*K, P_out, r], Q [BN, G*K, r, r], F [G*K, r, P_in]) add sum_k E_k Q_k F_k to M and S.
    Returns relu(LN(S_eff @ relu(LN(x @ M_eff)))) with x's leading dims: [..., G, P_out, C_out].
    """
    lead = x.shape[:-3]
    if x.dim() == 5:
        x = x.reshape(-1, *x.shape[2:])
    compiling = torch.compiler.is_compiling()
    if not compiling:
        check_inputs(x, M, S, channel_private, spatial_private)
    em, qm, fm = channel_private if channel_private is not None else (None,) * 3
    es, qs, fs = spatial_private if spatial_private is not None else (None,) * 3
    args = (x, M, S, em, qm, fm, es, qs, fs, float(eps))
    if compiling:
        out = torch.ops.lors.adaptive_mixing(*args)
    else:
        out = custom_op.eager(forward, _recorded, *args)
    return out.reshape(*lead, *out.shape[1:])


# ------------------------------------------------------------------------------------------- generation


def generate(q, gen_weight, gen_bias, core_weight, core_bias):
    """(q @ W_gen^T + b_gen, q @ W_core^T + b_core): one Triton launch on CUDA; cores empty when absent."""
    if _route(q) == "triton":
        from . import triton as kernels

        mixing, cores = kernels.generate(q, gen_weight, gen_bias, core_weight, core_bias)
    else:
        mixing = torch.nn.functional.linear(q, gen_weight, gen_bias)
        cores = None if core_weight is None else torch.nn.functional.linear(q, core_weight, core_bias)
    return mixing, (q.new_empty(0) if cores is None else cores)


@torch.library.custom_op("lors::generate_mixing_weights", mutates_args=())
def _generate_op(q: Tensor, gen_weight: Tensor, gen_bias: Optional[Tensor], core_weight: Optional[Tensor],
                 core_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return generate(q, gen_weight, gen_bias, core_weight, core_bias)


@_generate_op.register_fake
def _(q, gen_weight, gen_bias, core_weight, core_bias):
    cores = q.new_empty(0) if core_weight is None else q.new_empty((q.shape[0], core_weight.shape[0]))
    return q.new_empty((q.shape[0], gen_weight.shape[0])), cores


def _generate_setup(ctx, inputs, output):
    q, gen_weight, gen_bias, core_weight, core_bias = inputs
    ctx.save_for_backward(q, gen_weight, core_weight)
    ctx.biases = (gen_bias is not None, core_bias is not None)


def _generate_backward(ctx, dmixing, dcores):
    """Two linear layers sharing their input: plain GEMMs, which torch.compile traces as they are."""
    q, gen_weight, core_weight = ctx.saved_tensors
    dq = dmixing @ gen_weight
    grads = [dmixing.t() @ q, dmixing.sum(0) if ctx.biases[0] else None, None, None]
    if core_weight is not None:
        dq = dq + dcores @ core_weight
        grads[2:] = [dcores.t() @ q, dcores.sum(0) if ctx.biases[1] else None]
    return (dq, *grads)


_generate_op.register_autograd(_generate_backward, setup_context=_generate_setup)
_GenerateFunction = custom_op.eager_twin(generate, _generate_setup, _generate_backward)


def generate_mixing_weights(query: Tensor, gen_weight: Tensor, gen_bias: Optional[Tensor] = None,
                            core_weight: Optional[Tensor] = None, core_bias: Optional[Tensor] = None, *,
                            groups: int, in_channels: int, out_channels: int, in_points: int, out_points: int,
                            rank: int = 0):
    """AdaMixer's per-query weight generation, batched over every query and group.

    query [..., d_q]; gen_weight [G*(C_in*C_out + P_in*P_out), d_q] -> M [BN, G, C_in, C_out] and
    S [BN, G, P_out, P_in] in the official layout (group outer; M row-major C_in x C_out, then S row-major
    P_out x P_in). With core_weight [2*G*K*r*r, d_q] also the private cores Q^M, Q^S [BN, G*K, r, r].
    On CUDA both GEMMs run in one Triton launch.
    """
    q = query.reshape(-1, query.shape[-1])
    for name, t in (("gen_weight", gen_weight), ("core_weight", core_weight)):
        if t is not None and (t.dim() != 2 or t.shape[1] != q.shape[1]):
            raise ValueError(f"generate_mixing_weights: {name} {shape_str(t)} must be [*, {q.shape[1]}] for query "
                             f"{shape_str(query)}")
    if gen_weight.shape[0] != groups * (in_channels * out_channels + in_points * out_points):
        raise ValueError(f"generate_mixing_weights: gen_weight {shape_str(gen_weight)} must have G*(C_in*C_out + "
                         f"P_in*P_out) = {groups * (in_channels * out_channels + in_points * out_points)} rows")
    if core_weight is not None and (rank <= 0 or core_weight.shape[0] % (2 * groups * rank * rank)):
        raise ValueError(f"generate_mixing_weights: core_weight {shape_str(core_weight)} must have 2*G*K*r*r rows "
                         f"(G = {groups}, r = {rank})")
    args = (q, gen_weight, gen_bias, core_weight, core_bias)
    if torch.compiler.is_compiling():
        mixing, cores = torch.ops.lors.generate_mixing_weights(*args)
    else:
        mixing, cores = custom_op.eager(generate, _GenerateFunction.apply, *args)
    return reference.split_generated(mixing, None if core_weight is None else cores, groups=groups,
                                     in_channels=in_channels, out_channels=out_channels, in_points=in_points,
                                     out_points=out_points, rank=rank)
