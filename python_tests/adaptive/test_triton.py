"""adaptive/triton.py: the mixing and generation kernels against float64 (under the interpreter without a
GPU), and their ahead-of-time compile for sm_80 and sm_90."""

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNEL_DTYPES, RTOL, assert_close, dtype_id, rel_err

import lors_kernels as lk
from lors_kernels.adaptive import reference

from .oracle import SHAPES, leaves_of, loops64, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_triton_forward_backward(dtype, shape, use_backend):
    use_backend("triton")
    x, m, s, cp, sp = make_inputs(*SHAPES[shape], dtype, KERNEL_DEVICE)
    leaves = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)]
    out = lk.adaptive_mixing(x, m, s, channel_private=cp, spatial_private=sp)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, dout)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, m64, s64, rest = leaves64[0], leaves64[1], leaves64[2], leaves64[3:]
    cp64 = tuple(rest[:3]) if cp else None
    sp64 = tuple(rest[-3:]) if sp else None
    out64 = loops64(x64, m64, s64, cp64, sp64)
    assert_close(out, out64, dtype, "out")
    names = ["dx", "dM", "dS"] + (["dE_M", "dQ_M", "dF_M"] if cp else []) + (["dE_S", "dQ_S", "dF_S"] if sp else [])
    # LayerNorm's backward subtracts means of the incoming gradient: 16-bit gradients get 4x the room.
    slack = 1 if dtype == torch.float32 else 4
    for name, grad, expected in zip(names, grads, torch.autograd.grad(out64, leaves64, dout.double())):
        err = rel_err(grad, expected)
        assert err <= slack * RTOL[dtype], f"{name}: relative error {err:.2e} ({dtype_id(dtype)})"


@pytest.mark.parametrize("programs", [1, 3])
def test_triton_backward_programs_loop_over_tiles(programs, use_backend, monkeypatch):
    """Fewer persistent programs than (query, group) tiles: 14 tiles on 3 programs (5, 5, 4) or one; the
    E/F partial sums of each program add up to the float64 gradients, the same bits on every run."""
    from lors_kernels import triton_utils

    use_backend("triton")
    monkeypatch.setattr(triton_utils, "sm_count", lambda device: programs)
    x, m, s, cp, sp = make_inputs(7, 2, 5, 6, 6, 7, 3, 2, 1, torch.float32, KERNEL_DEVICE)
    leaves = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)]
    dout = torch.randn(7, 2, 7, 6, generator=torch.Generator().manual_seed(2)).to(KERNEL_DEVICE)

    def grads():
        return torch.autograd.grad(lk.adaptive_mixing(x, m, s, channel_private=cp, spatial_private=sp), leaves, dout)

    first, second = grads(), grads()
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = loops64(*leaves64[:3], tuple(leaves64[3:6]), tuple(leaves64[6:]))
    for i, (a, b, e) in enumerate(zip(first, second, torch.autograd.grad(out64, leaves64, dout.double()))):
        assert torch.equal(a, b)
        assert_close(a, e, torch.float32, f"grad {i}")


@pytest.mark.parametrize("with_cores", [True, False], ids=["cores", "no_cores"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_triton_generation_one_launch(dtype, with_cores, use_backend):
    use_backend("triton")
    groups, c, p_in, p_out, r, k, d_q = 2, 5, 3, 7, 2, 3, 24
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) / d_q**0.5).to(device=KERNEL_DEVICE, dtype=dtype)

    query = rand(3, 70, d_q) * d_q**0.5
    weights = [rand(groups * (c * c + p_in * p_out), d_q), rand(groups * (c * c + p_in * p_out))]
    weights += [rand(2 * groups * k * r * r, d_q), rand(2 * groups * k * r * r)] if with_cores else [None, None]
    leaves = [t.requires_grad_() for t in [query] + weights if t is not None]
    shape = dict(groups=groups, in_channels=c, out_channels=c, in_points=p_in, out_points=p_out, rank=r)
    from lors_kernels.adaptive import triton as kernels

    launched = []
    original = kernels.triton_utils.launch
    kernels.triton_utils.launch = lambda kernel, *a, **kw: (launched.append(kernel), original(kernel, *a, **kw))
    try:
        outs = lk.generate_mixing_weights(query, *weights, **shape)
    finally:
        kernels.triton_utils.launch = original
    assert len(launched) == 1  # M, S and the cores from one launch
    douts = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, douts)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    full64 = leaves64 if with_cores else leaves64 + [None, None]
    expected = reference.generate_mixing_weights(*full64, **shape)
    for name, out, e in zip(["M", "S", "Q_M", "Q_S"], outs, expected):
        assert_close(out, e, dtype, name)
    for i, (g, e) in enumerate(zip(grads, torch.autograd.grad(expected, leaves64, [d.double() for d in douts]))):
        assert_close(g, e, dtype, f"grad {i}")


def test_triton_generation_strided_biases(use_backend):
    use_backend("triton")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 16, generator=g).to(KERNEL_DEVICE)
    gen_w, core_w = torch.randn(2 * (4 + 6), 16, generator=g) / 4, torch.randn(2 * 2 * 1 * 4, 16, generator=g) / 4
    gen_b, core_b = torch.randn(2 * 20, generator=g)[::2], torch.randn(3 * 16, generator=g)[::3]
    shape = dict(groups=2, in_channels=2, out_channels=2, in_points=2, out_points=3, rank=2)
    tensors = [t.to(KERNEL_DEVICE) for t in (gen_w, gen_b, core_w, core_b)]
    got = lk.generate_mixing_weights(q, *tensors, **shape)
    want = reference.generate_mixing_weights(q.double(), *[t.double() for t in tensors], **shape)
    for name, a, e in zip(["M", "S", "Q_M", "Q_S"], got, want):
        assert_close(a, e, torch.float32, name)


def aot_cases():
    """The paper's shapes (LORS^A: C=128, P_in=64, P_out=128, r=16; AdaMixer: C=64, P_in=32) per dtype."""
    from lors_kernels.adaptive import triton as kernels

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((2, 2, 64, 128, 128, 128, 16, 3, 3), (2, 4, 32, 64, 64, 128, 16, 0, 0)):
            x, m, s, cp, sp = make_inputs(*shape, dtype, "meta")
            kernels.mixing_forward(x, m, s, cp, sp, 1e-5)
            if kernels.backward_fits(dtype, shape[5], shape[4]):  # else the op takes the reference's backward
                kernels.mixing_backward(
                    torch.empty(2, shape[1], shape[5], shape[4], device="meta", dtype=dtype), x, m, s, cp, sp, 1e-5
                )
        # The generator at the paper's shapes: 256 -> 2*(128*128 + 64*128), cores 2*2*3*16*16; and B*N = 1600.
        q = torch.empty(1600, 256, device="meta", dtype=dtype)
        gen = [
            torch.empty(*size, device="meta", dtype=dtype) for size in ((49152, 256), (49152,), (3072, 256), (3072,))
        ]
        kernels.generate(q, *gen)
        kernels.generate(q[:40], gen[0], gen[1], None, None)


def test_aot_compiles_for_sm80_and_sm90():
    from aot import SHARED_LIMIT, compile_cases

    report = compile_cases(__name__)
    errors = [f"{e['launch']} sm_{e['capability']}: {e['error']}" for e in report if "error" in e]
    assert not errors, "\n".join(errors)
    # 6 forwards + 6 backwards (but the fp32 backward at the LORS paper's shape takes the reference,
    # see backward_fits) + 2 generator launches per dtype
    assert len(report) == 2 * (11 + 6)
    for entry in report:
        assert entry["shared"] <= SHARED_LIMIT[entry["capability"]], entry
