"""`lors::adaptive_mixing` and `lors::generate_mixing_weights`: input checks, the tables of
implementations, the public functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import backend
from ..registry import Impl, as_float, as_rows, define_op, public, require_tensors, shape_str
from . import reference

if backend.triton_available():  # optional: without Triton its rows never run (registry.Impl.runs_on)
    from . import triton as kernels

EPS = 1e-5


class Private(NamedTuple):
    """A LORS^A private part, sum_k E_k Q_k F_k added to a generated matrix [rows, cols]."""

    E: Tensor  # [G*K, rows, r], shared by every query
    Q: Tensor  # [BN, G*K, r, r], generated per query
    F: Tensor  # [G*K, r, cols], shared by every query


def as_private(value: Sequence[Tensor] | None, label: str) -> Private | None:
    """The user's (E, Q, F) as a Private, or None; anything else is a clear error."""
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(t, Tensor) for t in value)):
        raise TypeError(f"adaptive_mixing: {label} must be a tuple of tensors (E, Q, F)")
    return Private(*value)


def _joined(e, q, f, label: str) -> Private | None:
    """The op's three inputs of one private part back as one (all given or none)."""
    if e is None and q is None and f is None:
        return None
    if e is None or q is None or f is None:
        raise ValueError(f"adaptive_mixing: the {label} part needs E, Q and F together")
    return Private(e, q, f)


def _privates(c):
    return _joined(c.em, c.qm, c.fm, "channel_private"), _joined(c.es, c.qs, c.fs, "spatial_private")


def check_adaptive_mixing(
    x: Tensor,
    m: Tensor,
    s: Tensor,
    em: Tensor | None,
    qm: Tensor | None,
    fm: Tensor | None,
    es: Tensor | None,
    qs: Tensor | None,
    fs: Tensor | None,
    eps: float = EPS,
) -> None:
    """x [BN, G, P_in, C_in], M [BN, G, C_in, C_out], S [BN, G, P_out, P_in], privates (E, Q, F)."""
    channel, spatial = _joined(em, qm, fm, "channel_private"), _joined(es, qs, fs, "spatial_private")
    for name, t in (("x", x), ("M", m), ("S", s)):
        if not isinstance(t, Tensor):
            raise TypeError(f"adaptive_mixing: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"adaptive_mixing: {name} must be 4-D, got {shape_str(t)}")
    bn, groups, p_in, c_in = x.shape
    if tuple(m.shape[:3]) != (bn, groups, c_in):
        raise ValueError(
            f"adaptive_mixing: M {shape_str(m)} must be [BN, G, C_in, C_out] = [{bn}, {groups}, {c_in}, *] "
            f"for x {shape_str(x)}"
        )
    if tuple(s.shape[:2]) != (bn, groups) or s.shape[3] != p_in:
        raise ValueError(
            f"adaptive_mixing: S {shape_str(s)} must be [BN, G, P_out, P_in] = [{bn}, {groups}, *, {p_in}] "
            f"for x {shape_str(x)}"
        )
    c_out, p_out = m.shape[3], s.shape[2]
    ranks = []  # a list: symbolic sizes are not hashable
    for label, private, rows, cols in (
        ("channel_private", channel, c_in, c_out),
        ("spatial_private", spatial, p_out, p_in),
    ):
        if private is None:
            continue
        e, q, f = private
        if e.dim() != 3 or q.dim() != 4 or f.dim() != 3:
            raise ValueError(
                f"adaptive_mixing: {label} must be E [G*K, {rows}, r], Q [BN, G*K, r, r], "
                f"F [G*K, r, {cols}]; got {shape_str(e)}, {shape_str(q)}, {shape_str(f)}"
            )
        gk, r = e.shape[0], e.shape[2]
        if (
            (gk % groups if groups else gk)  # G*K rows: none without groups
            or tuple(e.shape) != (gk, rows, r)
            or tuple(q.shape) != (bn, gk, r, r)
            or tuple(f.shape) != (gk, r, cols)
        ):
            raise ValueError(
                f"adaptive_mixing: {label} must be E [G*K, {rows}, r], Q [{bn}, G*K, r, r], "
                f"F [G*K, r, {cols}] with G = {groups}; got {shape_str(e)}, {shape_str(q)}, {shape_str(f)}"
            )
        ranks.append(r)
    if len(ranks) == 2 and ranks[0] != ranks[1]:
        raise ValueError(f"adaptive_mixing: channel and spatial private parts must share one rank, got {sorted(ranks)}")
    tensors = {"x": x, "M": m, "S": s}
    for label, private in (("channel_private", channel), ("spatial_private", spatial)):
        if private is not None:
            tensors.update({f"{label}.{n}": t for n, t in zip(Private._fields, private)})
    _check_one_dtype_and_device("adaptive_mixing", tensors, "M.to(x.dtype)")


def _check_one_dtype_and_device(op: str, tensors: dict[str, Tensor], example: str) -> None:
    """Every tensor in the first one's dtype (a float the kernels take) and on its device; else an error
    listing them all, with an `example` of the conversion."""
    first = next(iter(tensors.values()))
    if any(t.dtype != first.dtype for t in tensors.values()) or first.dtype not in backend.FLOAT_DTYPES:
        raise TypeError(
            f"{op}: all tensors must share one floating dtype, got "
            + ", ".join(f"{n}={t.dtype}" for n, t in tensors.items())
            + f"; convert them first, e.g. {example}"
        )
    if any(t.device != first.device for t in tensors.values()):
        raise ValueError(
            f"{op}: all tensors must be on one device, got " + ", ".join(f"{n}={t.device}" for n, t in tensors.items())
        )


# ---------------------------------------------------------------------------------- implementations


def _no_pre1(x: Tensor) -> Tensor:
    """pre1 where nothing was saved: the backward recomputes it."""
    return x.new_empty(0, dtype=torch.float32)


def _dense(*tensors):
    """The Triton kernels index every input as a dense tensor."""
    return [None if t is None else t.contiguous() for t in tensors]


def _empty_tile(x, m, s) -> bool:
    """A zero-size point or channel dim: every output and gradient is zero (the LayerNorm of an empty or an
    all-zero tile is 0), and the kernels, whose LayerNorms would divide by a zero count, do not run."""
    return 0 in (x.shape[2], x.shape[3], m.shape[3], s.shape[2])


def _triton_forward(x, m, s, em, qm, fm, es, qs, fs, eps):
    if _empty_tile(x, m, s):
        return x.new_zeros((*x.shape[:2], s.shape[2], m.shape[3])), _no_pre1(x)
    x, m, s, em, qm, fm, es, qs, fs = _dense(x, m, s, em, qm, fm, es, qs, fs)
    return kernels.mixing_forward(x, m, s, _joined(em, qm, fm, ""), _joined(es, qs, fs, ""), eps), _no_pre1(x)


def _triton_backward(c, dout):
    """The Triton backward, or the reference's for the one case whose tiles exceed shared memory."""
    if _empty_tile(c.x, c.m, c.s):
        return tuple(None if t is None else torch.zeros_like(t) for t in _inputs(c))
    if not kernels.backward_fits(c.x.dtype, c.s.shape[2], c.m.shape[3]):
        return _reference_backward(c, dout)
    x, m, s, em, qm, fm, es, qs, fs = _dense(*_inputs(c))
    return _flat_grads(
        kernels.mixing_backward(dout.contiguous(), x, m, s, _joined(em, qm, fm, ""), _joined(es, qs, fs, ""), c.eps)
    )


def _inputs(c):
    """The nine tensor inputs of a saved call, in the schema's order."""
    return c.x, c.m, c.s, c.em, c.qm, c.fm, c.es, c.qs, c.fs


def _native_forward(*args):
    return backend.native().adaptive_mixing_forward_cpu(*args), _no_pre1(args[0])


def _native_train(*args):
    """The forward of a training step also saves pre1 = x @ M_eff (fp32), which the backward reads
    instead of recomputing: 8% of a CPU step at B=2, N=100 (64 -> 59 ms), for BN*G*P_in*C_out*4 bytes
    held until the backward (13 MB there). Compiled graphs cannot tell training from inference: their
    forward saves nothing and their backward recomputes."""
    x, m = args[:2]
    pre1 = x.new_empty((*x.shape[:3], m.shape[3]), dtype=torch.float32)
    return backend.native().adaptive_mixing_forward_cpu(*args, pre1), pre1


def _native_backward(c, dout):
    saved = c.pre1 if c.pre1.numel() else None
    return backend.native().adaptive_mixing_backward_cpu(dout, *_inputs(c), c.eps, saved)


def _reference_forward(x, m, s, em, qm, fm, es, qs, fs, eps):
    return _reference_eager(x, m, s, em, qm, fm, es, qs, fs, eps), _no_pre1(x)


def _reference_eager(x, m, s, em, qm, fm, es, qs, fs, eps):
    return reference.adaptive_mixing(x, m, s, _joined(em, qm, fm, ""), _joined(es, qs, fs, ""), eps)


def _reference_backward(c, dout):
    return _flat_grads(reference.adaptive_mixing_backward(dout, c.x, c.m, c.s, *_privates(c), c.eps))


def _flat_grads(grads):
    """(dx, dM, dS, channel (dE, dQ, dF) or None, spatial ... or None) -> the nine input gradients."""
    dx, dm, ds, channel, spatial = grads
    return (dx, dm, ds, *(channel or (None,) * 3), *(spatial or (None,) * 3))


adaptive_mixing_op = define_op(
    "adaptive_mixing",
    "(Tensor x, Tensor m, Tensor s, Tensor? em, Tensor? qm, Tensor? fm, Tensor? es, Tensor? qs, Tensor? fs, "
    "float eps) -> (Tensor out, Tensor pre1)",
    check=check_adaptive_mixing,
    fake=lambda x, m, s, *_: (x.new_empty((*x.shape[:2], s.shape[2], m.shape[3])), _no_pre1(x)),
    returns=1,
    save=("pre1",),
    grads=("x", "m", "s", "em", "qm", "fm", "es", "qs", "fs"),
    impls=[
        Impl(
            "triton",
            "cuda",
            _triton_forward,
            _triton_backward,
            fits=lambda c: c.x.dtype in backend.TRITON_DTYPES,
            takes="float32, float16, bfloat16",
        ),
        # Measured on 2 cores against the eager reference: fp32 is 2.3-3.3x faster forward and 1.65-1.9x
        # forward+backward; bf16 is even forward and 0.74-0.84x forward+backward (eager's bf16 matmuls use
        # AVX512-BF16 at twice the fp32 rate, the kernels compute in fp32): fp32 only, unless forced.
        Impl(
            "native",
            "cpu",
            _native_forward,
            _native_backward,
            train=_native_train,
            fits=lambda c: c.x.dtype in backend.NATIVE_CPU_DTYPES,
            wins=lambda c: c.x.dtype == torch.float32,
            takes="float32, bfloat16",
        ),
        # Recording, the reference's own autograd keeps what it needs, as the eager code it replaces does.
        Impl("reference", None, _reference_forward, _reference_backward, eager=_reference_eager),
    ],
)


def _with_leading_dims(out: Tensor, x: Tensor, *args, **kwargs) -> Tensor:
    """The op's output [BN, ...] with x's leading dims ([B, N] for a 5-D x)."""
    return out.reshape(*x.shape[:-3], *out.shape[1:])


@public(adaptive_mixing_op, finish=_with_leading_dims)
def adaptive_mixing(
    x: Tensor,
    M: Tensor,
    S: Tensor,
    *,
    channel_private: Sequence[Tensor] | None = None,
    spatial_private: Sequence[Tensor] | None = None,
    eps: float = EPS,
) -> tuple:
    """AdaMixer's adaptive mixing with LORS^A private parts, fused.

    x [BN, G, P_in, C_in] or [B, N, G, P_in, C_in]; M [BN, G, C_in, C_out]; S [BN, G, P_out, P_in];
    channel_private = (E [G*K, C_in, r], Q [BN, G*K, r, r], F [G*K, r, C_out]) and spatial_private =
    (E [G*K, P_out, r], Q [BN, G*K, r, r], F [G*K, r, P_in]) add sum_k E_k Q_k F_k to M and S.
    Returns relu(LN(S_eff @ relu(LN(x @ M_eff)))) with x's leading dims: [..., G, P_out, C_out].
    """
    require_tensors("adaptive_mixing", x=x, M=M, S=S)
    if x.dim() == 5:
        x = x.flatten(0, 1)  # not reshape(-1, ...): with a zero-size dim the -1 is ambiguous
    channel = as_private(channel_private, "channel_private") or (None,) * 3
    spatial = as_private(spatial_private, "spatial_private") or (None,) * 3
    return x, M, S, *channel, *spatial, as_float("adaptive_mixing", "eps", eps)


# ------------------------------------------------------------------------------------------- generation


def check_generate_mixing_weights(
    q: Tensor, gen_weight: Tensor, gen_bias: Tensor | None, core_weight: Tensor | None, core_bias: Tensor | None
) -> None:
    for name, t in (("gen_weight", gen_weight), ("core_weight", core_weight)):
        if t is not None and (t.dim() != 2 or t.shape[1] != q.shape[1]):
            raise ValueError(
                f"generate_mixing_weights: {name} {shape_str(t)} must be [*, {q.shape[1]}] for query "
                f"rows {shape_str(q)}"
            )
    for name, bias, weight in (("gen_bias", gen_bias, gen_weight), ("core_bias", core_bias, core_weight)):
        if bias is not None and (weight is None or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(
                f"generate_mixing_weights: {name} {shape_str(bias)} must be one value per row of its weight"
            )
    given = {
        n: t
        for n, t in (
            ("query", q),
            ("gen_weight", gen_weight),
            ("gen_bias", gen_bias),
            ("core_weight", core_weight),
            ("core_bias", core_bias),
        )
        if t is not None
    }
    _check_one_dtype_and_device("generate_mixing_weights", given, "gen_weight.to(query.dtype)")


def _generated(q, gen_weight, gen_bias, core_weight, core_bias):
    """(q @ W_gen^T + b_gen, q @ W_core^T + b_core): cores empty when absent (ops return tensors)."""
    mixing = torch.nn.functional.linear(q, gen_weight, gen_bias)
    cores = q.new_empty(0) if core_weight is None else torch.nn.functional.linear(q, core_weight, core_bias)
    return mixing, cores


def _triton_generate(q, gen_weight, gen_bias, core_weight, core_bias):
    mixing, cores = kernels.generate(q, gen_weight, gen_bias, core_weight, core_bias)
    return mixing, (q.new_empty(0) if cores is None else cores)


def _generation_backward(c, dmixing, dcores):
    """Two linear layers sharing their input: plain GEMMs, which torch.compile traces as they are."""
    dq = dmixing @ c.gen_weight
    grads = [dmixing.t() @ c.q, dmixing.sum(0) if c.gen_bias is not None else None, None, None]
    if c.core_weight is not None:
        dq = dq + dcores @ c.core_weight
        grads[2:] = [dcores.t() @ c.q, dcores.sum(0) if c.core_bias is not None else None]
    return (dq, *grads)


generate_op = define_op(
    "generate_mixing_weights",
    "(Tensor q, Tensor gen_weight, Tensor? gen_bias, Tensor? core_weight, Tensor? core_bias) "
    "-> (Tensor mixing, Tensor cores)",
    check=check_generate_mixing_weights,
    fake=lambda q, gen_weight, gen_bias, core_weight, core_bias: (
        q.new_empty((q.shape[0], gen_weight.shape[0])),
        q.new_empty(0) if core_weight is None else q.new_empty((q.shape[0], core_weight.shape[0])),
    ),
    grads=("q", "gen_weight", "gen_bias", "core_weight", "core_bias"),
    impls=[
        Impl(
            "triton",
            "cuda",
            _triton_generate,
            _generation_backward,
            fits=lambda c: c.q.dtype in backend.TRITON_DTYPES,
            takes="float32, float16, bfloat16",
        ),
        Impl("reference", None, _generated, _generation_backward, eager=_generated),
    ],
)


def _split(outputs, query, gen_weight, gen_bias=None, core_weight=None, core_bias=None, **layout):
    """The generated rows in the official layout (reference.split_generated); layout: groups, ..., rank."""
    mixing, cores = outputs
    return reference.split_generated(mixing, None if core_weight is None else cores, **layout)


@public(generate_op, finish=_split)
def generate_mixing_weights(
    query: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor | None = None,
    core_weight: Tensor | None = None,
    core_bias: Tensor | None = None,
    *,
    groups: int,
    in_channels: int,
    out_channels: int,
    in_points: int,
    out_points: int,
    rank: int = 0,
) -> tuple:
    """AdaMixer's per-query weight generation, batched over every query and group.

    query [..., d_q]; gen_weight [G*(C_in*C_out + P_in*P_out), d_q] -> M [BN, G, C_in, C_out] and
    S [BN, G, P_out, P_in] in the official layout (group outer; M row-major C_in x C_out, then S row-major
    P_out x P_in). With core_weight [2*G*K*r*r, d_q] also the private cores Q^M, Q^S [BN, G*K, r, r].
    On CUDA both GEMMs run in one Triton launch.
    """
    require_tensors(
        "generate_mixing_weights",
        query=query,
        gen_weight=gen_weight,
        gen_bias=gen_bias,
        core_weight=core_weight,
        core_bias=core_bias,
    )
    q = as_rows(query)
    if gen_weight.shape[0] != groups * (in_channels * out_channels + in_points * out_points):
        raise ValueError(
            f"generate_mixing_weights: gen_weight {shape_str(gen_weight)} must have G*(C_in*C_out + "
            f"P_in*P_out) = {groups * (in_channels * out_channels + in_points * out_points)} rows"
        )
    if core_weight is not None and (rank <= 0 or core_weight.shape[0] % (2 * groups * rank * rank)):
        raise ValueError(
            f"generate_mixing_weights: core_weight {shape_str(core_weight)} must have 2*G*K*r*r rows "
            f"(G = {groups}, r = {rank})"
        )
    return q, gen_weight, gen_bias, core_weight, core_bias
