"""hrca/module.py: HighResCrossAttention against FASeg's layer and masked dense attention, its
arguments and state_dict names, and compiled with fullgraph."""

import pytest
import torch
import torch.nn.functional as F

import lors_kernels as lk

from .oracle import brute_topk


def faseg_layer(mha, query, memory, pos, query_pos, low_scores, low_hw, high_hw, ratio=32):
    """FASeg's high-resolution cross-attention as its released code runs it: pick the windows, gather
    memory and positions there, and run nn.MultiheadAttention (sequence-first) on what was gathered."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    ws = hh // lh
    cells = low_scores.sum(1).topk(max(1, lh * lw // ratio), dim=-1).indices.sort(-1).values
    outs = []
    for b in range(query.shape[0]):
        pixels = [
            (int(c) // lw * ws + dy) * hw + int(c) % lw * ws + dx
            for c in cells[b]
            for dy in range(ws)
            for dx in range(ws)
        ]
        mem, p = memory[b, pixels][:, None], pos[b, pixels][:, None]
        out = mha((query[b] + query_pos[b])[:, None], mem + p, mem, need_weights=False)[0]
        outs.append(out[:, 0])
    return torch.stack(outs)


def module_inputs(b=2, n=5, c=32, low_hw=(4, 8), high_hw=(16, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    length, n_low = high_hw[0] * high_hw[1], low_hw[0] * low_hw[1]
    return (
        torch.randn(b, n, c, generator=g),
        torch.randn(b, length, c, generator=g),
        torch.randn(b, length, c, generator=g),
        torch.randn(b, n, c, generator=g),
        torch.rand(b, n, n_low, generator=g).softmax(-1),
    )


def test_window_mode_reproduces_faseg_layer():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4)
    layer = lk.HighResCrossAttention(32, 4, mode="window", ratio=8)
    layer.load_state_dict(mha.state_dict())
    query, memory, pos, query_pos, scores = module_inputs()
    got = layer(query, memory, pos, query_pos, scores, (4, 8), (16, 32))
    expected = faseg_layer(mha, query, memory, pos, query_pos, scores, (4, 8), (16, 32), ratio=8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bilinear_per_query_module_matches_masked_dense_attention():
    torch.manual_seed(1)
    layer = lk.HighResCrossAttention(32, 4, mode="bilinear", ratio=8, per_query=True)
    query, memory, pos, query_pos, scores = module_inputs(seed=1)
    got = layer(query, memory, pos, query_pos, scores, (4, 8), (16, 32))
    index = brute_topk(scores, (4, 8), (16, 32), 4 * 16, True)  # 32 // 8 cells of 4 x 4 pixels
    mask = torch.zeros(2, 5, 16 * 32, dtype=torch.bool).scatter_(2, index, True)
    w_q, w_k, w_v = layer.in_proj_weight.chunk(3)
    b_q, b_k, b_v = layer.in_proj_bias.chunk(3)
    heads = lambda x: x.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
    q = heads(F.linear(query + query_pos, w_q, b_q))
    k, v = heads(F.linear(memory + pos, w_k, b_k)), heads(F.linear(memory, w_v, b_v))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    expected = layer.out_proj(dense.transpose(1, 2).flatten(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_module_arguments_and_state_dict_names():
    layer = lk.HighResCrossAttention(32, 4)
    assert set(layer.state_dict()) == set(torch.nn.MultiheadAttention(32, 4).state_dict())
    with pytest.raises(ValueError, match="per_query needs mode='bilinear'"):
        lk.HighResCrossAttention(32, 4, mode="window", per_query=True)
    with pytest.raises(ValueError, match="not divisible"):
        lk.HighResCrossAttention(30, 4)


@pytest.mark.parametrize("mode", ["window", "bilinear-per_query"])
def test_compile_fullgraph_module_cpu(mode):
    torch.manual_seed(2)
    layer = lk.HighResCrossAttention(32, 4, mode=mode.split("-")[0], ratio=8, per_query="per_query" in mode)
    inputs = module_inputs(seed=2)
    eager = layer(*inputs, (4, 8), (16, 32))
    compiled = torch.compile(lambda *a: layer(*a, (4, 8), (16, 32)), fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    compiled.sum().backward()
    assert layer.in_proj_weight.grad is not None and layer.in_proj_weight.grad.abs().sum() > 0
