"""adaptive/module.py: AdaptiveMixing, LorsAdaptiveMixing and LorsWeightGenerator against their equations,
the paper's parameter count, and compiled with fullgraph."""

import pytest
import torch

import lors_kernels as lk
from lors_kernels.adaptive import reference

from .oracle import loops64


def paper_parameter_count(
    n_stages=6, d_q=256, c=128, p_in=64, p_out=128, groups=2, r=16, ks=(1, 1, 2, 2, 3, 3), out_rank=8
):
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
    model = lk.LorsAdaptiveMixing(
        n_stages=2,
        query_dim=32,
        in_dim=16,
        in_points=4,
        out_points=6,
        n_groups=2,
        rank=2,
        kernel_groups=[1, 2],
        out_rank=2,
    )
    torch.nn.init.normal_(model.generator.weight, std=0.1)
    x, query = torch.randn(2, 3, 2, 4, 8), torch.randn(2, 3, 32)
    m, s = lk.generate_mixing_weights(
        query,
        model.generator.weight,
        model.generator.bias,
        groups=2,
        in_channels=8,
        out_channels=8,
        in_points=4,
        out_points=6,
    )
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
    model = lk.LorsAdaptiveMixing(
        n_stages=2,
        query_dim=16,
        in_dim=8,
        in_points=4,
        out_points=4,
        n_groups=2,
        rank=2,
        kernel_groups=[0, 2],
        out_rank=2,
    )
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


@pytest.mark.parametrize("stage", [-1, 6])
def test_lors_adaptive_mixing_names_a_stage_out_of_range(stage):
    mixer = lk.LorsAdaptiveMixing(query_dim=32, in_dim=32, in_points=4, out_points=4, n_groups=2, rank=2, out_rank=2)
    with pytest.raises(IndexError, match=f"stage {stage} is out of range for 6 stages"):
        mixer(stage, torch.randn(1, 2, 2, 4, 16), torch.randn(1, 2, 32))
