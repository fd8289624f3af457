"""The native extension lors_kernels._C (csrc/cpu/adaptive.cpp): CPU adaptive mixing, forward and
every gradient, against the PyTorch reference evaluated in float64 on the same inputs."""

import pytest
import torch
from helpers import dtype_id, rel_err

from lors_kernels import backend
from lors_kernels.adaptive import reference

C = backend.native()
pytestmark = [
    pytest.mark.skipif(
        C is None or not hasattr(C, "adaptive_mixing_backward_cpu"),
        reason="lors_kernels._C is not built, or built without the CPU adaptive mixing kernels",
    ),
    # The reference's LayerNorm of an empty batch: torch warns about var() over no elements.
    pytest.mark.filterwarnings(r"ignore:var\(\).*degrees of freedom:UserWarning"),
]

EPS = 1e-5
DTYPES = [torch.float32, torch.bfloat16]
# Relative-norm error against float64: fp32 accumulation, and bf16 outputs rounded once.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
GRADS = ("dx", "dM", "dS", "dE^M", "dQ^M", "dF^M", "dE^S", "dQ^S", "dF^S")

# (BN, G, P_in, C_in, C_out, P_out, r, K_channel, K_spatial); K None: that private part absent.
SHAPES = {
    "paper-small-K0": (3, 2, 8, 16, 16, 16, 4, 0, 0),
    "paper-small-K1": (3, 2, 8, 16, 16, 16, 4, 1, 1),
    "paper-small-K3": (3, 2, 8, 16, 16, 16, 4, 3, 3),
    "odd-sizes": (2, 2, 5, 7, 9, 11, 3, 2, 1),
    "ragged-blocks": (2, 1, 20, 24, 18, 33, 5, 3, 2),  # 8 x 8 transposes with ragged edges, 16-column panel tails
    "channel-only": (3, 2, 8, 16, 16, 16, 4, 2, None),
    "spatial-only": (3, 2, 8, 16, 16, 16, 4, None, 2),
    "no-privates": (3, 4, 8, 16, 16, 32, 0, None, None),
    "empty-batch": (0, 2, 8, 16, 16, 16, 4, 1, 1),
}


def make(bn, groups, p_in, c_in, c_out, p_out, r, km, ks, dtype, seed=0):
    """x, M, S, channel private or None, spatial private or None, d out; scaled so that every stage is O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, fan=1):
        return (torch.randn(*shape, generator=gen) / max(fan, 1) ** 0.5).to(dtype)

    x = rand(bn, groups, p_in, c_in)
    m, s = rand(bn, groups, c_in, c_out, fan=c_in), rand(bn, groups, p_out, p_in, fan=p_in)
    cp = (
        None
        if km is None
        else (
            rand(groups * km, c_in, r, fan=c_in),
            rand(bn, groups * km, r, r, fan=r),
            rand(groups * km, r, c_out, fan=r),
        )
    )
    sp = (
        None
        if ks is None
        else (
            rand(groups * ks, p_out, r, fan=r),
            rand(bn, groups * ks, r, r, fan=r),
            rand(groups * ks, r, p_in, fan=p_in),
        )
    )
    return x, m, s, cp, sp, rand(bn, groups, p_out, c_out)


def flat(cp, sp):
    return [*(cp or (None,) * 3), *(sp or (None,) * 3)]


def forward(x, m, s, cp, sp):
    return C.adaptive_mixing_forward_cpu(x, m, s, *flat(cp, sp), EPS)


def backward(dout, x, m, s, cp, sp):
    return C.adaptive_mixing_backward_cpu(dout, x, m, s, *flat(cp, sp), EPS)


def oracle(x, m, s, cp, sp, dout):
    """The reference's forward and gradient formulas in float64, on the same (rounded) inputs."""
    d64 = [t.double() for t in (x, m, s, dout)]
    cp64, sp64 = (None if p is None else tuple(t.double() for t in p) for p in (cp, sp))
    out = reference.adaptive_mixing(*d64[:3], cp64, sp64, EPS)
    dx, dm, ds, dcp, dsp = reference.adaptive_mixing_backward(d64[3], *d64[:3], cp64, sp64, EPS)
    return out, [dx, dm, ds, *(dcp or (None,) * 3), *(dsp or (None,) * 3)]


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    assert actual.is_contiguous(), f"{what}: not contiguous"
    if expected.numel() and expected.abs().max() == 0:
        assert torch.equal(actual.double(), expected), f"{what}: not exactly zero"
        return
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.2e} > {RTOL[dtype]:.0e} ({dtype_id(dtype)})"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_and_gradients_match_float64(dtype, shape):
    x, m, s, cp, sp, dout = make(*SHAPES[shape], dtype)
    out64, grads64 = oracle(x, m, s, cp, sp, dout)
    assert_close(forward(x, m, s, cp, sp), out64, dtype, "out")
    grads = backward(dout, x, m, s, cp, sp)
    assert len(grads) == 9
    for name, grad, expected in zip(GRADS, grads, grads64):
        if expected is None:
            assert grad is None, f"{name}: a gradient for an absent private part"
        else:
            assert_close(grad, expected, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_non_contiguous_inputs(dtype):
    x, m, s, cp, sp, dout = make(2, 2, 8, 12, 10, 9, 4, 2, 1, dtype)

    def strided(t):  # the same values through a transposed (last two dims) view
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not view.is_contiguous() or t.shape[-1] == 1
        return view

    def sliced(t):  # every other element of a wider tensor
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]

    views = (strided(x), sliced(m), strided(s), tuple(map(strided, cp)), tuple(map(sliced, sp)), strided(dout))
    assert torch.equal(forward(*views[:5]), forward(x, m, s, cp, sp)), "forward differs from dense inputs"
    for name, a, b in zip(GRADS, backward(views[5], *views[:5]), backward(dout, x, m, s, cp, sp)):
        assert torch.equal(a, b), f"{name} differs from dense inputs"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bitwise_independent_of_thread_count(dtype):
    # 40 queries: 20 chunks of dE, dF partial sums per group, shared out differently by 1, 2 or 3 threads.
    x, m, s, cp, sp, dout = make(40, 2, 8, 16, 16, 16, 4, 2, 3, dtype)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append([forward(x, m, s, cp, sp), *backward(dout, x, m, s, cp, sp)])
    finally:
        torch.set_num_threads(saved)
    for name, *runs in zip(("out",) + GRADS, *results):
        assert all(torch.equal(runs[0], r) for r in runs[1:]), f"{name} depends on the thread count"


def test_empty_private_parts_give_empty_gradients():
    x, m, s, cp, sp, dout = make(2, 2, 5, 6, 7, 8, 3, 0, 0, torch.float32)
    grads = backward(dout, x, m, s, cp, sp)
    for name, grad, like in zip(GRADS[3:], grads[3:], flat(cp, sp)):
        assert grad.shape == like.shape and grad.numel() == 0, name
    # K = 0 adds nothing: the result is the shared mixing's.
    assert torch.equal(forward(x, m, s, cp, sp), forward(x, m, s, None, None))


def _bad_inputs():
    x, m, s, cp, sp, dout = make(2, 2, 5, 6, 7, 8, 3, 2, 1, torch.float32)
    em, qm, fm = cp
    es, qs, fs = sp
    ok = dict(x=x, M=m, S=s, em=em, qm=qm, fm=fm, es=es, qs=qs, fs=fs)

    def case(name, error, match, **changes):
        return name, {**ok, **changes}, error, match

    yield case("x-3d", ValueError, r"x must be 4-D", x=x[0])
    yield case(
        "M-c_in", ValueError, r"M \[2, 2, 5, 7\] must be \[BN, G, C_in, C_out\] = \[2, 2, 6, \*\]", M=m[:, :, :5]
    )
    yield case("M-groups", ValueError, r"M \[2, 1, 6, 7\]", M=m[:, :1])
    yield case("S-p_in", ValueError, r"S \[2, 2, 8, 4\] must be \[BN, G, P_out, P_in\] = \[2, 2, \*, 5\]", S=s[..., :4])
    yield case("E-rows", ValueError, r"channel private part must be E \[G\*K, 6, r\]", em=em[:, :5])
    yield case("Q-batch", ValueError, r"channel private part .* Q \[2, G\*K, r, r\]", qm=qm[:1])
    yield case("F-cols", ValueError, r"spatial private part must be .* F \[G\*K, r, 5\]", fs=fs[..., :4])
    yield case("GK-not-multiple-of-G", ValueError, r"with G = 2", em=em[:3], qm=qm[:, :3], fm=fm[:3])
    yield case(
        "rank-mismatch",
        ValueError,
        r"must share one rank, got 3 and 2",
        es=es[..., :2],
        qs=qs[..., :2, :2],
        fs=fs[:, :2],
    )
    yield case("incomplete-part", ValueError, r"channel private part needs E, Q and F together, got 2", fm=None)
    yield case("mixed-dtype", TypeError, r"M has dtype BFloat16 but x has Float", M=m.bfloat16())
    yield case("private-dtype", TypeError, r"Q\^S has dtype Double", qs=qs.double())
    yield case(
        "float16", TypeError, r"x has dtype Half; expected Float or BFloat16", **{k: v.half() for k, v in ok.items()}
    )
    yield case("meta-device", ValueError, r"x must be a CPU tensor", x=x.to("meta"))


@pytest.mark.parametrize("kwargs,error,match", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        C.adaptive_mixing_forward_cpu(**kwargs, eps=EPS)
    dout = torch.zeros(2, 2, 8, 7)
    with pytest.raises(error, match=match):
        C.adaptive_mixing_backward_cpu(dout.to(kwargs["x"].dtype), **kwargs, eps=EPS)


def test_bad_dout_raises_clear_error():
    x, m, s, cp, sp, dout = make(2, 2, 5, 6, 7, 8, 3, 1, 1, torch.float32)
    with pytest.raises(ValueError, match=r"dout \[2, 2, 8, 6\] must be \[BN, G, P_out, C_out\] = \[2, 2, 8, 7\]"):
        backward(dout[..., :6], x, m, s, cp, sp)
    with pytest.raises(TypeError, match=r"dout has dtype BFloat16 but x has Float"):
        backward(dout.bfloat16(), x, m, s, cp, sp)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_saved_pre1(dtype, shape):
    """A training forward saves pre1 = x @ M_eff (fp32; checked against float64) and the same output;
    the backward reading it gives gradients bitwise equal to the one that recomputes it."""
    x, m, s, cp, sp, dout = make(*SHAPES[shape], dtype)
    pre1 = torch.full((*x.shape[:3], m.shape[3]), float("nan"))
    out = C.adaptive_mixing_forward_cpu(x, m, s, *flat(cp, sp), EPS, pre1)
    assert torch.equal(out, forward(x, m, s, cp, sp))
    m_eff = m.double() + (
        reference.private_delta(tuple(t.double() for t in cp), x.shape[0], x.shape[1]) if cp is not None else 0
    )
    torch.testing.assert_close(pre1.double(), x.double() @ m_eff, rtol=1e-5, atol=1e-5)
    recomputed = backward(dout, x, m, s, cp, sp)
    read = C.adaptive_mixing_backward_cpu(dout, x, m, s, *flat(cp, sp), EPS, pre1)
    for name, a, b in zip(GRADS, read, recomputed):
        assert (a is None and b is None) or torch.equal(a, b), name
    # and it is read, not recomputed: another pre1 changes the gradients
    shifted = C.adaptive_mixing_backward_cpu(dout, x, m, s, *flat(cp, sp), EPS, pre1 * 2 + 1)
    assert x.numel() == 0 or not torch.equal(shifted[0], recomputed[0])


def test_bad_pre1_raises_clear_error():
    x, m, s, cp, sp, dout = make(*SHAPES["paper-small-K1"], torch.float32)
    for bad in (
        torch.empty(3, 2, 8, 15),
        torch.empty(3, 2, 8, 16, dtype=torch.float64),
        torch.empty(3, 2, 16, 8).transpose(2, 3),
    ):
        with pytest.raises(ValueError, match=r"pre1 must be a contiguous float32 CPU tensor \[3, 2, 8, 16\]"):
            C.adaptive_mixing_forward_cpu(x, m, s, *flat(cp, sp), EPS, bad)
        with pytest.raises(ValueError, match=r"pre1 must be a contiguous float32 CPU tensor"):
            C.adaptive_mixing_backward_cpu(dout, x, m, s, *flat(cp, sp), EPS, bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_public_op_dispatch_on_cpu(dtype, monkeypatch):
    """fp32 runs the native kernels automatically (forward and backward, counted); bf16 stays on the
    reference (measured slower there), unless the native backend is forced."""
    calls = []
    for name in ("adaptive_mixing_forward_cpu", "adaptive_mixing_backward_cpu"):
        fn = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _fn=fn, _name=name: calls.append((_name, a)) or _fn(*a))
    import lors_kernels

    x, m, s, cp, sp, dout = make(*SHAPES["paper-small-K1"], dtype)
    leaves = [t.requires_grad_() for t in (x, m, s)]
    out = lors_kernels.adaptive_mixing(*leaves, channel_private=cp, spatial_private=sp)
    torch.autograd.backward(out, dout)
    if dtype == torch.float32:  # (bf16 runs the eager reference: its bf16 matmuls are its own accuracy)
        expected_out, expected_grads = oracle(x.detach(), m.detach(), s.detach(), cp, sp, dout)
        assert_close(out.detach().contiguous(), expected_out, dtype, "out")
        for name, leaf, want in zip(GRADS, leaves, expected_grads):
            assert_close(leaf.grad, want, dtype, name)
    native = ["adaptive_mixing_forward_cpu", "adaptive_mixing_backward_cpu"]
    assert [name for name, _ in calls] == (native if dtype == torch.float32 else [])
    if dtype == torch.float32:  # the training forward saved pre1 and the backward read it
        assert all(isinstance(args[-1], torch.Tensor) and args[-1].shape == (3, 2, 8, 16) for _, args in calls)
    previous = backend.set_backend("native")
    try:
        lors_kernels.adaptive_mixing(x.detach(), m.detach(), s.detach(), channel_private=cp, spatial_private=sp)
    finally:
        backend.set_backend(previous)
    assert calls[-1][0] == "adaptive_mixing_forward_cpu" and len(calls[-1][1]) == 10  # inference: nothing saved
