"""Adaptive mixing (AdaMixer / LORS^A): reference, Triton kernels, custom op, modules, AOT."""

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNEL_DTYPES, RTOL, assert_close, dtype_id, rel_err

import lors_kernels as lk
from lors_kernels.adaptive import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def loops64(x, m, s, channel_private=None, spatial_private=None, eps=1e-5):
    """Independent oracle: per (query, group) loops in float64, explicit sums and LayerNorm."""
    bn, groups = x.shape[:2]
    out = []
    for n in range(bn):
        rows = []
        for g in range(groups):
            mg, sg = m[n, g].double(), s[n, g].double()
            for private, is_channel in ((channel_private, True), (spatial_private, False)):
                if private is None:
                    continue
                e, q, f = (t.double() for t in private)
                k = e.shape[0] // groups
                for kk in range(k):
                    j = g * k + kk
                    delta = e[j] @ q[n, j] @ f[j]
                    if is_channel:
                        mg = mg + delta
                    else:
                        sg = sg + delta
            h = x[n, g].double() @ mg
            h = ((h - h.mean()) / torch.sqrt(h.var(unbiased=False) + eps)).clamp_min(0)
            o = sg @ h
            rows.append(((o - o.mean()) / torch.sqrt(o.var(unbiased=False) + eps)).clamp_min(0))
        out.append(torch.stack(rows))
    return torch.stack(out)


def make_inputs(bn, groups, p_in, c_in, c_out, p_out, r, km, ks, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, fan=1):
        return (torch.randn(*shape, generator=gen) / fan ** 0.5).to(device=device, dtype=dtype)

    x, m, s = rand(bn, groups, p_in, c_in), rand(bn, groups, c_in, c_out, fan=c_in), rand(bn, groups, p_out, p_in, fan=p_in)
    cp = (rand(groups * km, c_in, r, fan=c_in), rand(bn, groups * km, r, r, fan=r), rand(groups * km, r, c_out, fan=r)) \
        if km else None
    sp = (rand(groups * ks, p_out, r, fan=r), rand(bn, groups * ks, r, r, fan=r), rand(groups * ks, r, p_in, fan=p_in)) \
        if ks else None
    return x, m, s, cp, sp


def leaves_of(x, m, s, cp, sp):
    return [x, m, s] + list(cp or ()) + list(sp or ())


# Odd, non-power-of-two shapes; K in {0, 1, 3} per private part.
SHAPES = {
    "plain": (3, 2, 7, 12, 10, 9, 4, 0, 0),
    "K1": (2, 2, 7, 12, 10, 9, 4, 1, 1),
    "K3_channel": (2, 1, 20, 24, 18, 33, 5, 3, 0),
    "K3_spatial": (2, 2, 9, 6, 11, 13, 3, 0, 3),
    "pow2": (2, 2, 16, 16, 16, 32, 16, 1, 2),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_matches_float64_loops(shape):
    x, m, s, cp, sp = make_inputs(*SHAPES[shape], torch.float64)
    assert_close(reference.adaptive_mixing(x, m, s, cp, sp), loops64(x, m, s, cp, sp), torch.float64, "out")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_backward_formulas(shape):
    x, m, s, cp, sp = make_inputs(*SHAPES[shape], torch.float64)
    leaves = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)]
    out = loops64(x, m, s, cp, sp)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, dout)
    dx, dm, ds, dcm, dsp = reference.adaptive_mixing_backward(dout, x, m, s, cp, sp)
    got = [dx, dm, ds, *(dcm or ()), *(dsp or ())]
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, torch.float64, f"grad {i}")


def test_gradcheck_op_float64(use_backend):
    use_backend("reference")
    x, m, s, cp, sp = make_inputs(2, 2, 3, 4, 5, 3, 2, 1, 1, torch.float64)
    leaves = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)]

    def fn(x, m, s, e1, q1, f1, e2, q2, f2):
        return lk.adaptive_mixing(x, m, s, channel_private=(e1, q1, f1), spatial_private=(e2, q2, f2))

    assert torch.autograd.gradcheck(fn, leaves)


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


# -------------------------------------------------------------------------------------------- generation


def test_generation_layout_is_the_official_one():
    torch.manual_seed(0)
    groups, c, p_in, p_out, r, k, d_q = 2, 3, 4, 5, 2, 2, 7
    query = torch.randn(2, 3, d_q)
    gen = torch.nn.Linear(d_q, groups * (c * c + p_in * p_out))
    core = torch.nn.Linear(d_q, 2 * groups * k * r * r)
    m, s, qm, qs = lk.generate_mixing_weights(query, gen.weight, gen.bias, core.weight, core.bias, groups=groups,
                                              in_channels=c, out_channels=c, in_points=p_in, out_points=p_out,
                                              rank=r)
    params = gen(query).reshape(6, groups, -1)  # per query: group outer, M (row-major C x C) then S
    for n in range(6):
        for g in range(groups):
            flat = params[n, g]
            torch.testing.assert_close(m[n, g], flat[: c * c].reshape(c, c))
            torch.testing.assert_close(s[n, g], flat[c * c:].reshape(p_out, p_in))
    cores = core(query).reshape(6, 2, groups * k, r, r)
    torch.testing.assert_close(qm, cores[:, 0])
    torch.testing.assert_close(qs, cores[:, 1])


@pytest.mark.parametrize("with_cores", [True, False], ids=["cores", "no_cores"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=dtype_id)
def test_triton_generation_one_launch(dtype, with_cores, use_backend):
    use_backend("triton")
    groups, c, p_in, p_out, r, k, d_q = 2, 5, 3, 7, 2, 3, 24
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) / d_q ** 0.5).to(device=KERNEL_DEVICE, dtype=dtype)

    query = rand(3, 70, d_q) * d_q ** 0.5
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


# ----------------------------------------------------------------------------------------------- modules


def paper_parameter_count(n_stages=6, d_q=256, c=128, p_in=64, p_out=128, groups=2, r=16, ks=(1, 1, 2, 2, 3, 3),
                          out_rank=8):
    """docs/design.md §1.1 accounting applied to every part: shared parts once, private parts per stage."""
    generator = (d_q + 1) * groups * (c * c + p_in * p_out)
    cores = sum((d_q + 1) * 2 * groups * k * r * r for k in ks)
    factors = sum(groups * k * r * (c + c + p_out + p_in) for k in ks)
    proj_in = groups * p_out * c
    out_proj = proj_in * d_q + n_stages * (out_rank * (proj_in + d_q) + d_q)
    norms = n_stages * 2 * d_q
    return generator + cores + factors + out_proj + norms


def test_lors_adaptive_mixing_parameter_count_at_paper_defaults():
    model = lk.LorsAdaptiveMixing()
    count = sum(p.numel() for p in model.parameters())
    assert count == paper_parameter_count()
    # What LORS^A buys: six private AdaMixer stages would hold 6 generators and 6 projections.
    dense = 6 * ((256 + 1) * 2 * (128 * 128 + 64 * 128) + (2 * 128 * 128 + 1) * 256 + 512)
    print(f"LorsAdaptiveMixing: {count / 1e6:.2f} M parameters vs {dense / 1e6:.2f} M for six AdaMixer stages")
    assert count < 0.25 * dense


def test_zero_private_parts_equal_shared_mixing():
    torch.manual_seed(0)
    model = lk.LorsAdaptiveMixing(n_stages=2, query_dim=32, in_dim=16, in_points=4, out_points=6, n_groups=2,
                                  rank=2, kernel_groups=[1, 2], out_rank=2)
    torch.nn.init.normal_(model.generator.weight, std=0.1)
    x, query = torch.randn(2, 3, 2, 4, 8), torch.randn(2, 3, 32)
    m, s = lk.generate_mixing_weights(query, model.generator.weight, model.generator.bias, groups=2,
                                      in_channels=8, out_channels=8, in_points=4, out_points=6)
    mixed = reference.adaptive_mixing(x.reshape(6, 2, 4, 8), m, s).reshape(2, 3, -1)
    expected = model.norms[1](query + model.out_proj[1](mixed))
    torch.testing.assert_close(model(1, x, query), expected)  # cores are zero at init
    torch.nn.init.normal_(model.cores[1].weight, std=0.1)
    assert not torch.allclose(model(1, x, query), expected)


def test_adaptive_mixing_module_matches_eager_equations():
    torch.manual_seed(0)
    layer = lk.AdaptiveMixing(in_dim=16, in_points=4, out_points=6, n_groups=2, query_dim=12)
    torch.nn.init.normal_(layer.generator.weight, std=0.1)
    x, query = torch.randn(2, 3, 2, 4, 8), torch.randn(2, 3, 12)
    params = layer.generator(query).reshape(6, 2, -1)
    m = params[..., :64].reshape(6, 2, 8, 8)
    s = params[..., 64:].reshape(6, 2, 6, 4)
    mixed = loops64(x.reshape(6, 2, 4, 8), m, s).float().reshape(2, 3, -1)
    expected = layer.norm(query + layer.out_proj(mixed))
    torch.testing.assert_close(layer(x, query), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # stage 0 has K = 0: no core rows
def test_lors_weight_generator_matches_the_formula():
    """W_l(q) = reshape(q Wgen^T + b) + sum_k E_k Q_k(q) F_k, checked with explicit float64 loops."""
    torch.manual_seed(0)
    gen = lk.LorsWeightGenerator(3, 10, rows=5, cols=7, rank=2, kernel_groups=[0, 1, 3], dtype=torch.float64)
    for core in gen.cores:
        torch.nn.init.normal_(core.weight)
        torch.nn.init.normal_(core.bias)
    query = torch.randn(2, 4, 10, dtype=torch.float64, requires_grad=True)
    for stage, k in enumerate([0, 1, 3]):
        out = gen(stage, query)
        assert out.shape == (2, 4, 5, 7)
        for b in range(2):
            for n in range(4):
                q = query[b, n]
                expected = (gen.generator.weight @ q + gen.generator.bias).view(5, 7)
                cores = (gen.cores[stage].weight @ q + gen.cores[stage].bias).view(k, 2, 2)
                for kk in range(k):
                    expected = expected + gen.left[stage][kk] @ cores[kk] @ gen.right[stage][kk]
                torch.testing.assert_close(out[b, n], expected)
    gen(2, query).square().sum().backward()
    assert gen.generator.weight.grad is not None and gen.left[2].grad is not None and query.grad is not None
    assert gen.left[1].grad is None  # other stages' private parts are untouched
    fresh = lk.LorsWeightGenerator(2, 10, rows=5, cols=7, rank=2, kernel_groups=[1, 2])
    q = torch.randn(3, 10)
    torch.testing.assert_close(fresh(1, q), fresh.generator(q).view(3, 5, 7))  # zero cores at init
    with pytest.raises(ValueError, match="2 kernel_groups for 3 stages"):
        lk.LorsWeightGenerator(3, 10, rows=5, cols=7, kernel_groups=[1, 2])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # stage 0 has K = 0: no core rows
def test_compile_fullgraph_lors_adaptive_mixing_cpu():
    torch.manual_seed(0)
    model = lk.LorsAdaptiveMixing(n_stages=2, query_dim=16, in_dim=8, in_points=4, out_points=4, n_groups=2,
                                  rank=2, kernel_groups=[0, 2], out_rank=2)
    for core in model.cores:
        torch.nn.init.normal_(core.weight, std=0.1)
    x, query = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 16)

    def run(x, query):
        for stage in range(2):
            query = model(stage, x, query)
        return query

    eager = run(x, query)
    compiled = torch.compile(run, fullgraph=True)(x, query)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    compiled.sum().backward()
    assert model.channel_left[1].grad is not None and model.generator.weight.grad is not None


# ------------------------------------------------------------------------------ ahead-of-time compiling


def aot_cases():
    """The paper's shapes (LORS^A: C=128, P_in=64, P_out=128, r=16; AdaMixer: C=64, P_in=32) per dtype."""
    from lors_kernels.adaptive import triton as kernels

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((2, 2, 64, 128, 128, 128, 16, 3, 3), (2, 4, 32, 64, 64, 128, 16, 0, 0)):
            x, m, s, cp, sp = make_inputs(*shape, dtype, "meta")
            kernels.mixing_forward(x, m, s, cp, sp, 1e-5)
            if kernels.backward_fits(dtype, shape[5], shape[4]):  # else the op takes the reference's backward
                kernels.mixing_backward(torch.empty(2, shape[1], shape[5], shape[4], device="meta", dtype=dtype),
                                        x, m, s, cp, sp, 1e-5)
        # The generator at the paper's shapes: 256 -> 2*(128*128 + 64*128), cores 2*2*3*16*16; and B*N = 1600.
        q = torch.empty(1600, 256, device="meta", dtype=dtype)
        gen = [torch.empty(*size, device="meta", dtype=dtype) for size in ((49152, 256), (49152,), (3072, 256), (3072,))]
        kernels.generate(q, *gen)
        kernels.generate(q[:40], gen[0], gen[1], None, None)


def test_aot_compiles_for_sm80_and_sm90():
    from aot import SHARED_LIMIT, compile_cases

    report = compile_cases(__name__.rsplit(".", 1)[-1])
    errors = [f"{e['launch']} sm_{e['capability']}: {e['error']}" for e in report if "error" in e]
    assert not errors, "\n".join(errors)
    # 6 forwards + 6 backwards (but the fp32 backward at the LORS paper's shape takes the reference,
    # see backward_fits) + 2 generator launches per dtype
    assert len(report) == 2 * (11 + 6)
    for entry in report:
        assert entry["shared"] <= SHARED_LIMIT[entry["capability"]], entry
