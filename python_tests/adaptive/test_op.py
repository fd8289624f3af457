"""adaptive/op.py: the custom ops' gradients and opchecks, leading batch dims, input checks, and the
generator's layout."""

import pytest
import torch
from helpers import KERNEL_DEVICE

import lors_kernels as lk

from .oracle import leaves_of, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_gradcheck_op_float64(use_backend):
    use_backend("reference")
    x, m, s, cp, sp = make_inputs(2, 2, 3, 4, 5, 3, 2, 1, 1, torch.float64)
    leaves = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)]

    def fn(x, m, s, e1, q1, f1, e2, q2, f2):
        return lk.adaptive_mixing(x, m, s, channel_private=(e1, q1, f1), spatial_private=(e2, q2, f2))

    assert torch.autograd.gradcheck(fn, leaves)


def test_leading_batch_dims_and_empty_batch(use_backend):
    use_backend("triton")
    x, m, s, cp, sp = make_inputs(6, 2, 5, 4, 4, 6, 2, 1, 1, torch.float32, KERNEL_DEVICE)
    flat = lk.adaptive_mixing(x, m, s, channel_private=cp, spatial_private=sp)
    split = lk.adaptive_mixing(x.reshape(2, 3, *x.shape[1:]), m, s, channel_private=cp, spatial_private=sp)
    assert split.shape == (2, 3, 2, 6, 4)
    torch.testing.assert_close(split.reshape(flat.shape), flat)
    x, m, s, cp, sp = make_inputs(0, 2, 5, 4, 4, 6, 2, 1, 1, torch.float32, KERNEL_DEVICE)
    leaves = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)]
    out = lk.adaptive_mixing(x, m, s, channel_private=cp, spatial_private=sp)
    assert out.shape == (0, 2, 6, 4)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    assert grads[3].abs().sum() == 0  # E^M gets nothing from an empty batch


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_opcheck(backend_name, use_backend):
    use_backend(backend_name)
    x, m, s, cp, sp = make_inputs(2, 2, 5, 4, 6, 3, 2, 1, 2, torch.float32, KERNEL_DEVICE)
    args = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)] + [1e-5]
    torch.library.opcheck(torch.ops.lors.adaptive_mixing.default, args)
    args_plain = [t.detach().requires_grad_() for t in (x, m, s)] + [None] * 6 + [1e-5]
    torch.library.opcheck(torch.ops.lors.adaptive_mixing.default, args_plain)


BAD = {
    "x_3d": (lambda x, m, s, cp: (x[0], m, s, cp), ValueError, "x must be 4-D"),
    "M_rows": (lambda x, m, s, cp: (x, m[:, :, :-1], s, cp), ValueError, "M .* must be"),
    "S_cols": (lambda x, m, s, cp: (x, m, s[..., :-1], cp), ValueError, "S .* must be"),
    "E_rows": (lambda x, m, s, cp: (x, m, s, (cp[0][:, :-1], cp[1], cp[2])), ValueError, "channel_private"),
    "Q_batch": (lambda x, m, s, cp: (x, m, s, (cp[0], cp[1][:-1], cp[2])), ValueError, "channel_private"),
    "not_tuple": (lambda x, m, s, cp: (x, m, s, cp[0]), TypeError, "tuple of tensors"),
    "dtype_mix": (lambda x, m, s, cp: (x.double(), m, s, cp), TypeError, r"one floating dtype.*M\.to\(x\.dtype\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    make, error, message = BAD[case]
    x, m, s, cp, _ = make_inputs(2, 2, 5, 4, 6, 3, 2, 1, 0, torch.float32)
    x, m, s, cp = make(x, m, s, cp)
    with pytest.raises(error, match=message):
        lk.adaptive_mixing(x, m, s, channel_private=cp)


def test_generation_layout_is_the_official_one():
    torch.manual_seed(0)
    groups, c, p_in, p_out, r, k, d_q = 2, 3, 4, 5, 2, 2, 7
    query = torch.randn(2, 3, d_q)
    gen = torch.nn.Linear(d_q, groups * (c * c + p_in * p_out))
    core = torch.nn.Linear(d_q, 2 * groups * k * r * r)
    m, s, qm, qs = lk.generate_mixing_weights(
        query,
        gen.weight,
        gen.bias,
        core.weight,
        core.bias,
        groups=groups,
        in_channels=c,
        out_channels=c,
        in_points=p_in,
        out_points=p_out,
        rank=r,
    )
    params = gen(query).reshape(6, groups, -1)  # per query: group outer, M (row-major C x C) then S
    for n in range(6):
        for g in range(groups):
            flat = params[n, g]
            torch.testing.assert_close(m[n, g], flat[: c * c].reshape(c, c))
            torch.testing.assert_close(s[n, g], flat[c * c :].reshape(p_out, p_in))
    cores = core(query).reshape(6, 2, groups * k, r, r)
    torch.testing.assert_close(qm, cores[:, 0])
    torch.testing.assert_close(qs, cores[:, 1])


def test_generation_opcheck_and_errors():
    q = torch.randn(5, 8, requires_grad=True)
    gw, gb = torch.randn(2 * (4 + 6), 8, requires_grad=True), torch.randn(20, requires_grad=True)
    cw, cb = torch.randn(2 * 2 * 1 * 4, 8, requires_grad=True), torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.lors.generate_mixing_weights.default, (q, gw, gb, cw, cb))
    torch.library.opcheck(torch.ops.lors.generate_mixing_weights.default, (q, gw, None, None, None))
    shape = dict(groups=2, in_channels=2, out_channels=2, in_points=2, out_points=3, rank=2)
    with pytest.raises(ValueError, match="gen_weight"):
        lk.generate_mixing_weights(q, gw[:-1], gb, **shape)
    with pytest.raises(ValueError, match="core_weight"):
        lk.generate_mixing_weights(q, gw, gb, cw[:-1], cb, **shape)


@pytest.mark.parametrize("with_cores", [False, True], ids=["mixing", "mixing+cores"])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_generation_of_no_queries_is_empty_with_zero_gradients(backend_name, with_cores, use_backend):
    use_backend(backend_name)
    q = torch.randn(0, 16, device=KERNEL_DEVICE, requires_grad=True)
    gen_weight = torch.randn(2 * (4 * 4 + 3 * 5), 16, device=KERNEL_DEVICE, requires_grad=True)
    core_weight = torch.randn(2 * 2 * 3 * 2 * 2, 16, device=KERNEL_DEVICE, requires_grad=True) if with_cores else None
    layout = dict(groups=2, in_channels=4, out_channels=4, in_points=3, out_points=5, rank=2 if with_cores else 0)
    out = lk.generate_mixing_weights(q, gen_weight, None, core_weight, None, **layout)
    shapes = [(0, 2, 4, 4), (0, 2, 5, 3)] + ([(0, 6, 2, 2)] * 2 if with_cores else [])
    assert [tuple(t.shape) for t in out] == shapes
    leaves = [t for t in (q, gen_weight, core_weight) if t is not None]
    grads = torch.autograd.grad(sum(t.sum() for t in out), leaves)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in leaves]
    assert not any(bool(g.any()) for g in grads)


GENERATION_MIXES = {  # (which input, how it is changed, error, message)
    "meta_weight": ("gen_weight", lambda t: t.to("meta"), ValueError, r"one device.*gen_weight=meta"),
    "double_bias": ("gen_bias", torch.Tensor.double, TypeError, r"one floating dtype.*gen_bias=torch.float64"),
    "int_query": ("query", lambda t: t.long(), TypeError, r"one floating dtype.*query=torch.int64"),
}


@pytest.mark.parametrize("case", list(GENERATION_MIXES))
def test_generation_inputs_on_other_devices_or_dtypes_are_named(case):
    name, change, error, message = GENERATION_MIXES[case]
    given = {"query": torch.randn(5, 8), "gen_weight": torch.randn(20, 8), "gen_bias": torch.randn(20)}
    given[name] = change(given[name])
    shape = dict(groups=2, in_channels=2, out_channels=2, in_points=2, out_points=3)
    with pytest.raises(error, match=message):
        lk.generate_mixing_weights(given["query"], given["gen_weight"], given["gen_bias"], **shape)
