"""Parameter accounting: shared tensors counted once, per-stack averages, the LORS paper's Table 1."""

import json

import pytest
from torch import nn

import lors_kernels as lk
from lors_kernels.convert import count_parameters, lorsify

from .models import Net

PAPER_STATIC = {4: 1.53, 8: 1.66, 16: 1.93, 32: 2.46}  # LORS paper, Table 1, W/ LORS^T (M per layer)
PAPER_ADAPTIVE = {4: 0.36, 8: 0.39, 16: 0.49, 32: 0.89}  # W/ LORS^A
PAPER_PERCENT = {"static": {4: 18.3, 8: 19.8, 16: 23.0, 32: 29.3}, "adaptive": {4: 17.2, 8: 18.6, 16: 23.3, 32: 42.4}}


@pytest.mark.parametrize("rank", [4, 8, 16, 32], ids=lambda r: f"r{r}")
def test_paper_parameter_table(rank):
    """Table 1 of the LORS paper, counted from built modules: W_o [256 x 32768] over six layers (LORS^T)
    and the spatial generator 256 -> 64*128 (LORS^A, K = 1,1,2,2,3,3). The paper counts W_o's bias
    (r=32 gives 2.455M per layer with it, 2.4549M without: the table says 2.46) and the generator's
    weight only (2.10M without its bias, 2.11M with). Its percentages are its rounded millions divided
    (two of eight differ by 0.06 from the exact ratios), so they are checked from the rounded numbers."""
    dense_static = count_parameters(nn.Linear(32768, 256, device="meta")).total
    dense_adaptive = count_parameters(nn.Linear(256, 64 * 128, bias=False, device="meta")).total
    assert round(dense_static / 1e6, 2) == 8.39 and round(dense_adaptive / 1e6, 2) == 2.10

    static = count_parameters(lk.make_lors_stack(6, 32768, 256, rank=rank, device="meta"))
    (stack,) = static.stacks
    assert stack.layers == 6 and stack.shared == 32768 * 256 and stack.private == [rank * (32768 + 256) + 256] * 6
    assert static.total == stack.total and static.other == 0
    adaptive = count_parameters(
        lk.LorsWeightGenerator(6, 256, 128, 64, rank=rank, kernel_groups=[1, 1, 2, 2, 3, 3], bias=False, device="meta")
    )
    (gen,) = adaptive.stacks
    assert gen.shared == 256 * 8192
    assert gen.private == [k * (256 * rank * rank + rank * (128 + 64)) for k in (1, 1, 2, 2, 3, 3)]

    for kind, count, dense, table in (
        ("static", stack, dense_static, PAPER_STATIC),
        ("adaptive", gen, dense_adaptive, PAPER_ADAPTIVE),
    ):
        millions = round(count.per_layer / 1e6, 2)
        assert millions == table[rank], kind
        assert abs(100 * millions / round(dense / 1e6, 2) - PAPER_PERCENT[kind][rank]) < 0.07, kind
        assert abs(100 * count.per_layer / dense - PAPER_PERCENT[kind][rank]) < 0.25, kind


def test_count_parameters_counts_shared_once():
    stack = lk.make_lors_stack(3, 8, 4, rank=2, groups=[1, 2, 1])
    count = count_parameters(stack)
    assert count.total == 32 + sum(2 * g * (8 + 4) + 4 for g in (1, 2, 1)) == 32 + 28 + 52 + 28
    assert len(stack.state_dict()) == 10  # the shared weight once, then each layer's down, up, bias
    (s,) = count.stacks
    assert s.name == "*" and s.shared == 32 and s.private == [28, 52, 28] and s.per_layer == pytest.approx(140 / 3)
    assert "per layer" in str(count) and "140" in str(count)


def test_count_parameters_tensor_shared_within_a_stack():
    """Layers of one stack that also share their bias: the bias counts once, where it first appears."""
    stack = lk.make_lors_stack(3, 8, 4, rank=2)
    for layer in stack[1:]:
        layer.bias = stack[0].bias
    count = count_parameters(stack)
    assert count.total == sum(p.numel() for p in stack.parameters()) == 32 + 3 * 24 + 4
    assert count.stacks[0].private == [28, 24, 24] and count.other == 0


def test_count_parameters_stacks_and_other():
    model = Net()
    lorsify(model, ["blocks.*.mlp.fc1", "blocks.*.proj"], rank=2)
    count = count_parameters(model)
    assert [s.name for s in count.stacks] == ["blocks.*.proj", "blocks.*.mlp.fc1"]
    assert count.total == sum(p.numel() for p in model.parameters())
    plain = sum(p.numel() for n, p in model.named_parameters() if ".proj." not in n and ".fc1." not in n)
    assert count.other == plain


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # stage 0 has K = 0: no core rows
def test_count_parameters_adaptive_mixing():
    mixer = lk.LorsAdaptiveMixing(
        n_stages=3,
        query_dim=16,
        in_dim=16,
        in_points=4,
        out_points=6,
        n_groups=2,
        rank=2,
        kernel_groups=[0, 1, 2],
        out_rank=3,
    )
    count = count_parameters(mixer)
    by_name = {s.name: s for s in count.stacks}
    assert set(by_name) == {"mixing", "out_proj.*"}
    gen = 16 * 2 * (8 * 8 + 4 * 6) + 2 * (8 * 8 + 4 * 6)
    assert by_name["mixing"].shared == gen
    cores = [17 * 2 * 2 * k * 4 + 2 * k * 2 * (8 + 8 + 6 + 4) for k in (0, 1, 2)]
    assert by_name["mixing"].private == cores
    assert by_name["out_proj.*"].shared == 16 * 2 * 6 * 8 and by_name["out_proj.*"].layers == 3
    assert count.other == 3 * 2 * 16  # the per-stage LayerNorms
    assert count.total == sum(p.numel() for p in mixer.parameters())


def test_count_parameters_is_an_int():
    count = count_parameters(lk.make_lors_stack(3, 8, 4, rank=2))
    total = 32 + 3 * (2 * 12 + 4)
    assert int(count) == count == count.total == total and isinstance(count, int)
    assert count + 1 == total + 1 and 2 * count == 2 * total and count / 2 == total / 2 and count > total - 1
    assert f"{count:,}" == f"{total:,}" and f"{count:>6d}" == f"{total:>6d}" and f"{count}" == f"{total}"
    assert f"{count}" == str(total) and "%d" % count == str(total)  # noqa: UP031 (the % operator is what is tested)
    assert "per layer" in count.table() and count.table() == str(count)
    assert count.stacks[0].layers == 3 and count.other == 0
    assert sum([count, count]) == 2 * total and json.dumps({"n": count}) == f'{{"n": {total}}}'
