"""The modules against the official code's math (LORS, AdaMixer, FASeg), written out here from the
released sources: same weights, float64, forward and every gradient; and the official initializations,
checked against their formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lors_kernels as lk

TOL = dict(rtol=1e-10, atol=1e-12)


def assert_same_function(ours, official, leaves, seed=0):
    """ours() and official() compute one function of ``leaves``: equal outputs and gradients."""
    out, ref = ours(), official()
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    expected = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
    for i, (leaf, g, e) in enumerate(zip(leaves, got, expected)):  # no gradient: zero (an unused, empty core)
        g, e = (torch.zeros_like(leaf) if t is None else t for t in (g, e))
        torch.testing.assert_close(g, e, **TOL, msg=lambda m, i=i, leaf=leaf: f"leaf {i} {tuple(leaf.shape)}: {m}")


def randomize(module, std=0.2, seed=0):
    """Every parameter random, so that no zero init hides a term or a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def assert_uniform(t, bound, what):
    """t looks like U(-bound, bound): inside it, reaching near it, with the uniform's std."""
    t = t.detach().double()
    assert t.abs().max() <= bound, f"{what}: {t.abs().max():.4g} > bound {bound:.4g}"
    assert t.abs().max() > 0.9 * bound, f"{what}: max {t.abs().max():.4g} far below bound {bound:.4g}"
    assert abs(t.std().item() / (bound / math.sqrt(3)) - 1) < 0.1, f"{what}: std {t.std():.4g}, bound {bound:.4g}"


# ------------------------------------------------------------------------------------------- LORS^A


def official_factorized_mixing(p, stage, x, query, kernel_sizes, kernel_groups, out_points):
    """LORS's FactorizedAdaptiveMixing.forward: common M/S from one generator, each stage's private
    sum of E @ Q @ F with Q generated per query, mixing, low-rank output projection, LayerNorm."""
    b, n, g, pts, c = x.shape
    m_common, s_common = (
        F.linear(query, p["common_w"], p["common_b"]).reshape(b * n, g, -1).split([c * c, pts * out_points], 2)
    )
    k, groups = kernel_sizes[stage], kernel_groups[stage]
    cores = F.linear(query, p["private_w"][stage], p["private_b"][stage]).reshape(b * n, 2, g * groups, k, k)
    m_private = (p["ml"][stage][None] @ cores[:, 0] @ p["mr"][stage][None]).view(b * n, g, groups, c, c)
    s_private = (p["sl"][stage][None] @ cores[:, 1] @ p["sr"][stage][None]).view(b * n, g, groups, out_points, pts)
    m = m_common.reshape(b * n, g, c, c) + m_private.sum(2)
    s = s_common.reshape(b * n, g, out_points, pts) + s_private.sum(2)
    out = torch.relu(F.layer_norm(x.reshape(b * n, g, pts, c) @ m, [pts, c]))
    out = torch.relu(F.layer_norm(s @ out, [out_points, c]))
    weight = p["base_out"] + p["out_B"][stage] @ p["out_A"][stage]
    out = F.linear(out.reshape(b, n, -1), weight, p["out_bias"][stage])
    return F.layer_norm(query + out, [query.shape[-1]], p["norm_w"][stage], p["norm_b"][stage])


def official_names(mixer):
    """The official module's parameters, by its names, as tensors of ``mixer``."""
    stages = range(mixer.n_stages)
    return {
        "common_w": mixer.generator.weight,
        "common_b": mixer.generator.bias,
        "private_w": [mixer.cores[s].weight for s in stages],
        "private_b": [mixer.cores[s].bias for s in stages],
        "ml": list(mixer.channel_left),
        "mr": list(mixer.channel_right),
        "sl": list(mixer.spatial_left),
        "sr": list(mixer.spatial_right),
        "base_out": mixer.out_proj[0].shared.weight,
        "out_A": [mixer.out_proj[s].down for s in stages],
        "out_B": [mixer.out_proj[s].up for s in stages],
        "out_bias": [mixer.out_proj[s].bias for s in stages],
        "norm_w": [mixer.norms[s].weight for s in stages],
        "norm_b": [mixer.norms[s].bias for s in stages],
    }


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # a K = 0 stage has no core rows
def test_lors_adaptive_mixing_is_the_official_factorized_mixing():
    """Per-stage ranks (the config's kernel_sizes) and output ranks (mix_out_proj_ranks), a stage with
    K = 0, every parameter random: forward and all gradients equal the official computation."""
    kernel_sizes, kernel_groups, out_ranks = [2, 3, 4], [1, 0, 2], [3, 1, 2]
    mixer = lk.LorsAdaptiveMixing(
        n_stages=3,
        query_dim=12,
        in_dim=8,
        in_points=3,
        out_points=5,
        n_groups=2,
        rank=kernel_sizes,
        kernel_groups=kernel_groups,
        out_rank=out_ranks,
        dtype=torch.float64,
    )
    randomize(mixer)
    p = official_names(mixer)
    for stage, (k, groups) in enumerate(zip(kernel_sizes, kernel_groups)):  # the official shapes
        assert p["ml"][stage].shape == (2 * groups, 4, k) and p["mr"][stage].shape == (2 * groups, k, 4)
        assert p["sl"][stage].shape == (2 * groups, 5, k) and p["sr"][stage].shape == (2 * groups, k, 3)
        assert p["private_w"][stage].shape == (2 * 2 * groups * k * k, 12)
        assert p["out_A"][stage].shape == (out_ranks[stage], 2 * 5 * 4) and p["out_B"][stage].shape == (
            12,
            out_ranks[stage],
        )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    query = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = [x, query, *mixer.parameters()]
    for stage in range(3):
        assert_same_function(
            lambda stage=stage: mixer(stage, x, query),
            lambda stage=stage: official_factorized_mixing(p, stage, x, query, kernel_sizes, kernel_groups, 5),
            leaves,
            seed=stage,
        )


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_lors_adaptive_mixing_init_is_the_official():
    """Generator weight and cores zero; E/F kaiming_uniform_ on the 3-D tensors (fan-in = size(1)*size(2));
    the output projection's down kaiming_uniform_ (fan-in = its input), up and biases zero."""
    torch.manual_seed(0)
    mixer = lk.LorsAdaptiveMixing(
        n_stages=2,
        query_dim=32,
        in_dim=64,
        in_points=16,
        out_points=24,
        n_groups=2,
        rank=[8, 12],
        kernel_groups=[2, 3],
        out_rank=[4, 6],
    )
    assert mixer.generator.weight.abs().sum() == 0
    for stage in range(2):
        assert mixer.cores[stage].weight.abs().sum() == 0 and mixer.cores[stage].bias.abs().sum() == 0
        for factor in (mixer.channel_left, mixer.channel_right, mixer.spatial_left, mixer.spatial_right):
            t = factor[stage]
            assert_uniform(t, math.sqrt(6 / (t.shape[1] * t.shape[2])), f"factor {tuple(t.shape)}")
        proj = mixer.out_proj[stage]
        assert_uniform(proj.down, math.sqrt(6 / proj.in_features), "out_proj down")
        assert proj.up.abs().sum() == 0 and proj.bias.abs().sum() == 0
    generator = lk.LorsWeightGenerator(2, 16, rows=40, cols=30, rank=6, kernel_groups=[1, 2])
    for stage in range(2):
        assert_uniform(generator.left[stage], math.sqrt(6 / (40 * 6)), "generator E")
        assert_uniform(generator.right[stage], math.sqrt(6 / (6 * 30)), "generator F")


def test_lors_adaptive_mixing_per_stage_rank_errors():
    with pytest.raises(ValueError, match="2 ranks for 3 stages"):
        lk.LorsAdaptiveMixing(n_stages=3, rank=[4, 4], kernel_groups=[1, 1, 1])
    with pytest.raises(ValueError, match="4 out_ranks for 3 stages"):
        lk.LorsAdaptiveMixing(n_stages=3, out_rank=[1, 2, 3, 4], kernel_groups=[1, 1, 1])


def test_adaptive_mixing_is_the_official_adamixer_operator_then_layernorm():
    """AdaMixer's AdaptiveMixing returns query + out_proj(mixed); the decoder stage norms it after."""
    mixer = randomize(
        lk.AdaptiveMixing(in_dim=8, in_points=3, out_points=5, n_groups=2, query_dim=10, dtype=torch.float64)
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    query = torch.randn(2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)

    def official():
        params = mixer.generator(query).reshape(6, 2, -1)
        m, s = params.split([16, 15], 2)
        out = torch.relu(F.layer_norm(torch.matmul(x.reshape(6, 2, 3, 4), m.reshape(6, 2, 4, 4)), [3, 4]))
        out = torch.relu(F.layer_norm(torch.matmul(s.reshape(6, 2, 5, 3), out), [5, 4]))
        return mixer.norm(query + mixer.out_proj(out.reshape(2, 3, -1)))

    assert_same_function(lambda: mixer(x, query), official, [x, query, *mixer.parameters()])


# ------------------------------------------------------------------------------------- LORS ViT (LORS^T)


def test_lors_stack_is_the_official_vit_ffn():
    """FFN_LORS: every layer l computes x + fc2_l(gelu(fc1_l(x))) with fc_l's weight base + B_l @ A_l and
    its own bias; per-layer ranks kernel_size * group."""
    ranks = [2, 4, 6]
    fc1 = randomize(lk.make_lors_stack(3, 6, 10, rank=ranks, init="xavier", dtype=torch.float64), seed=1)
    fc2 = randomize(lk.make_lors_stack(3, 10, 6, rank=ranks, init="xavier", dtype=torch.float64), seed=2)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    leaves = [x, *fc1.parameters(), *fc2.parameters()]

    def official_layer(fc, l, h):
        return F.linear(h, fc[0].shared.weight + fc[l].up @ fc[l].down, fc[l].bias)

    def run(layer):
        h = x
        for l in range(3):
            h = h + layer(fc2, l, F.gelu(layer(fc1, l, h)))
        return h

    assert_same_function(lambda: run(lambda fc, l, h: fc[l](h)), lambda: run(official_layer), leaves)


def test_lors_stack_is_the_official_vit_attention():
    """MultiheadAttention_LORS: qkv and proj are LORS stacks (private rank per layer, own biases)."""
    heads, dim = 2, 8
    qkv = randomize(lk.make_lors_stack(2, dim, 3 * dim, rank=[3, 5], dtype=torch.float64), seed=1)
    proj = randomize(lk.make_lors_stack(2, dim, dim, rank=[3, 5], dtype=torch.float64), seed=2)
    x = torch.randn(2, 7, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    leaves = [x, *qkv.parameters(), *proj.parameters()]

    def ours(l):
        q, k, v = qkv[l](x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        return proj[l](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def official(l):
        w = qkv[0].shared.weight + qkv[l].up @ qkv[l].down
        q, k, v = F.linear(x, w, qkv[l].bias).reshape(2, 7, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(2, 7, dim)
        return F.linear(out, proj[0].shared.weight + proj[l].up @ proj[l].down, proj[l].bias)

    for l in range(2):
        assert_same_function(lambda l=l: ours(l), lambda l=l: official(l), leaves, seed=l)


def test_shared_weight_inits():
    """init="default" is nn.Linear's (bound 1/sqrt(in)); "xavier" the official FFN's (sqrt(6/(in+out)))."""
    torch.manual_seed(0)
    assert_uniform(lk.SharedWeight(300, 200).weight, 1 / math.sqrt(300), "default")
    assert_uniform(lk.SharedWeight(300, 200, init="xavier").weight, math.sqrt(6 / 500), "xavier")
    stack = lk.make_lors_stack(2, 300, 200, init="xavier")
    assert_uniform(stack[0].shared.weight, math.sqrt(6 / 500), "stack xavier")
    assert_uniform(lk.LorsLinear(300, 200, init="xavier").shared.weight, math.sqrt(6 / 500), "layer xavier")
    with pytest.raises(ValueError, match="init must be one of"):
        lk.SharedWeight(3, 2, init="kaiming")


def test_shared_weight_trunc_normal_is_the_official_vit_attention_init():
    """timm's trunc_normal_(std=.02), cut at -2 and 2 (100 std: a normal in practice), which the LORS ViT's
    shared attention weights keep from the classifier's init: its moments and the normal's mass within
    one and two std (torch and timm draw it by different algorithms, so the bits are not compared)."""
    torch.manual_seed(3)
    weight = lk.make_lors_stack(3, 600, 500, init="trunc_normal")[0].shared.weight.detach().double()
    assert weight.abs().max() <= 2
    assert abs(weight.mean().item()) < 2e-4 and abs(weight.std().item() - 0.02) < 2e-4
    for sigmas, mass in ((1, math.erf(1 / math.sqrt(2))), (2, math.erf(2 / math.sqrt(2)))):
        assert abs((weight.abs() < sigmas * 0.02).double().mean().item() - mass) < 5e-3


@pytest.mark.parametrize("module", ["AdaptiveMixing", "LorsAdaptiveMixing"])
def test_adamixer_stage_xavier_init_of_the_output_projection(module):
    """init="xavier": the decoder stage's xavier_uniform_ of out_proj (bound sqrt(6 / (fan_in + fan_out))),
    drawn as the official draws it; the generator still starts at zero. Anything else is named."""
    dims = dict(in_dim=64, in_points=8, out_points=16, n_groups=2, query_dim=48)
    if module == "LorsAdaptiveMixing":
        dims.update(n_stages=2, rank=2, kernel_groups=[1, 1])
    cls = getattr(lk, module)
    default, xavier = cls(**dims), cls(**dims, init="xavier")
    shared = lambda m: m.out_proj.weight if module == "AdaptiveMixing" else m.out_proj[0].shared.weight  # noqa: E731
    fan_in, fan_out = 2 * 16 * 32, 48
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert_uniform(shared(xavier), bound, f"{module} xavier out_proj")
    assert_uniform(shared(default), 1 / math.sqrt(fan_in), f"{module} default out_proj")
    assert xavier.generator.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="init must be one of"):
        cls(**dims, init="kaiming")


# ------------------------------------------------------------------------------------------------ FASeg


def faseg_window_partition(x, ws):
    """FASeg's window_partition: [B, C, H, W] -> [B * windows, ws, ws, C], windows row-major."""
    b, c, h, w = x.shape
    return x.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws, ws, c)


def faseg_high_resolution_layer(mha, norm, output, fg_src, fg_pos, cg_attn, query_embed, n_low, omega_rate, order=None):
    """FASeg's sparse high-resolution branch (sequence-first): sort the query-summed low-res attention, take
    the n_low // omega_rate best windows of the stride-4 map and its positions, run
    CrossAttentionLayerFASeg (nn.MultiheadAttention, residual, LayerNorm) on them."""
    bs, c = fg_src.shape[:2]
    indexes = cg_attn.sum(1).sort(dim=-1, descending=True).indices if order is None else order
    ws = int((fg_src.shape[-1] * fg_src.shape[-2] // n_low) ** 0.5)
    keep = indexes[..., : n_low // omega_rate][..., None, None].expand(-1, -1, ws * ws, c)
    src = torch.gather(faseg_window_partition(fg_src, ws).view(bs, -1, ws * ws, c), 1, keep).view(bs, -1, c)
    pos = torch.gather(faseg_window_partition(fg_pos, ws).view(bs, -1, ws * ws, c), 1, keep).view(bs, -1, c)
    src, pos = src.permute(1, 0, 2), pos.permute(1, 0, 2)
    attended = mha(query=output + query_embed, key=src + pos, value=src)[0]
    return norm(output + attended)


def faseg_inputs(bs=2, n=5, c=16, low_hw=(2, 4), ws=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    high_hw = (low_hw[0] * ws, low_hw[1] * ws)
    leaf = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return dict(
        output=leaf(n, bs, c),
        fg_src=leaf(bs, c, *high_hw),
        fg_pos=leaf(bs, c, *high_hw),
        cg_attn=torch.rand(bs, n, low_hw[0] * low_hw[1], generator=g, dtype=torch.float64).softmax(-1),
        query_embed=leaf(n, bs, c),
    ), high_hw


def ours_as_faseg(layer, norm, inputs, low_hw, high_hw):
    """The module in FASeg's place: seq-first tensors, residual and LayerNorm outside."""
    memory = inputs["fg_src"].flatten(2).permute(2, 0, 1)  # [H*W, B, C], row-major
    pos = inputs["fg_pos"].flatten(2).permute(2, 0, 1)
    out = layer(inputs["output"], memory, pos, inputs["query_embed"], inputs["cg_attn"], low_hw, high_hw)
    return norm(inputs["output"] + out)


@pytest.mark.parametrize("omega_rate", [2, 4], ids=lambda r: f"omega{r}")
def test_high_res_cross_attention_is_fasegs_branch(omega_rate):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dtype=torch.float64)
    norm = nn.LayerNorm(16, dtype=torch.float64)
    randomize(mha, seed=1)
    randomize(norm, seed=2)
    layer = lk.HighResCrossAttention(16, 4, mode="window", ratio=omega_rate, batch_first=False, dtype=torch.float64)
    layer.load_state_dict(mha.state_dict())
    inputs, high_hw = faseg_inputs()
    assert {n for n, _ in mha.named_parameters()} == {n for n, _ in layer.named_parameters()}
    for name, p in layer.named_parameters():  # one set of leaves: FASeg's module holds ours
        module, _, attr = name.rpartition(".")
        setattr(mha.get_submodule(module), attr, p)
    leaves = [inputs[k] for k in ("output", "fg_src", "fg_pos", "query_embed")] + [
        *layer.parameters(),
        *norm.parameters(),
    ]
    assert_same_function(
        lambda: ours_as_faseg(layer, norm, inputs, (2, 4), high_hw),
        lambda: faseg_high_resolution_layer(mha, norm, **inputs, n_low=8, omega_rate=omega_rate),
        leaves,
    )


def test_faseg_ties_and_empty_selection():
    """Ties: the lower-index cell wins, FASeg's rule with a stable sort (its own sort is unstable, so it
    leaves such ties unspecified); where ties do not straddle the k-th cell, FASeg's own sort picks the
    same set. n_low < omega_rate: FASeg selects no window and attends to nothing: out_proj's bias."""
    torch.manual_seed(0)
    mha = randomize(nn.MultiheadAttention(16, 4, dtype=torch.float64), seed=1)
    norm = nn.LayerNorm(16, dtype=torch.float64)
    layer = lk.HighResCrossAttention(16, 4, mode="window", ratio=4, batch_first=False, dtype=torch.float64)
    layer.load_state_dict(mha.state_dict())
    inputs, high_hw = faseg_inputs(low_hw=(2, 8))
    tied = torch.tensor([0.0, 3, 1, 3, 0, 3, 2, 3, 0, 0, 1, 2, 3, 0, 1, 1], dtype=torch.float64)
    for scores, straddles in (
        (tied, True),
        (tied.clone().index_put_((torch.tensor([5, 7]),), torch.tensor([2.0, 2.5], dtype=torch.float64)), False),
    ):
        inputs["cg_attn"] = (scores / 5).expand(2, 5, 16)  # k = 16 // 4 = 4 cells
        ours = ours_as_faseg(layer, norm, inputs, (2, 8), high_hw)
        stable = inputs["cg_attn"].sum(1).sort(dim=-1, descending=True, stable=True).indices
        expected = faseg_high_resolution_layer(mha, norm, **inputs, n_low=16, omega_rate=4, order=stable)
        torch.testing.assert_close(ours, expected, **TOL)
        if not straddles:
            faseg = faseg_high_resolution_layer(mha, norm, **inputs, n_low=16, omega_rate=4)
            torch.testing.assert_close(ours, faseg, **TOL)

    small = lk.HighResCrossAttention(16, 4, ratio=32, batch_first=False, dtype=torch.float64)
    small.load_state_dict(mha.state_dict())
    inputs["cg_attn"] = torch.rand(2, 5, 16, dtype=torch.float64)  # 16 // 32 = 0 windows
    ours = ours_as_faseg(small, norm, inputs, (2, 8), high_hw)
    faseg = faseg_high_resolution_layer(mha, norm, **inputs, n_low=16, omega_rate=32)
    torch.testing.assert_close(ours, faseg, **TOL)
    torch.testing.assert_close(ours, norm(inputs["output"] + mha.out_proj.bias), **TOL)
    assert small.select(inputs["cg_attn"], (2, 8), high_hw).shape == (2, 0)


def test_high_res_cross_attention_inits():
    """init="default" draws exactly what nn.MultiheadAttention draws; "xavier" (FASeg's layers) also
    gives out_proj xavier_uniform_."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4)
    torch.manual_seed(0)
    layer = lk.HighResCrossAttention(64, 4)
    for (name, a), (_, b) in zip(sorted(mha.state_dict().items()), sorted(layer.state_dict().items())):
        assert torch.equal(a, b), name
    xavier = lk.HighResCrossAttention(64, 4, init="xavier")
    assert_uniform(xavier.out_proj.weight, math.sqrt(6 / 128), "out_proj")
    assert_uniform(xavier.in_proj_weight, math.sqrt(6 / (64 + 192)), "in_proj")
    assert xavier.out_proj.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="init must be one of"):
        lk.HighResCrossAttention(64, 4, init="kaiming")
