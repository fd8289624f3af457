"""Conversion of dense stacks to LORS (SVD / feature PCA) and the kappa rank rule."""

import copy
import math
import warnings
from collections import UserDict

import pytest
import torch
from helpers import RTOL, dtype_id, rel_err
from torch import nn

import lors_kernels as lk
from lors_kernels.convert import count_parameters, lorsify, rank_for_ratio

from .models import Net


def calibration_data(n=4, rows=64, dim=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g) for _ in range(n)]


def layer_inputs(model, names, batches):
    """Each named layer's inputs over the batches, captured by hooks on the dense model (independent of lorsify)."""
    seen = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach())) for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


# ---------------------------------------------------------------------------------------------------
# The kappa rule


@pytest.mark.parametrize(
    "inp,out,kappa,rank",
    [
        (768, 3072, 4, 153),  # 768*3072 / (4*3840) = 153.6
        (4096, 4096, 8, 256),  # exact quotient: must not round down to 255
        (256, 256, 2, 64),
        (32768, 256, 1, 254),  # 254.01
        (100, 100, 2.5, 20),  # fractional kappa, exact quotient
        (64, 64, 3, 10),  # 10.67
        (16, 16, 100, 0),
        (88, 88, 1.1, 40),  # 7744 / 193.6 = 40 exactly: float division gives 39.99...
        (300, 200, 0.5, 240),
    ],
    ids=lambda v: str(v),
)
def test_rank_for_ratio(inp, out, kappa, rank):
    assert rank_for_ratio(inp, out, kappa) == rank


@pytest.mark.parametrize("kappa", [0, -1.5])
def test_rank_for_ratio_rejects_non_positive(kappa):
    with pytest.raises(ValueError, match="kappa must be > 0"):
        rank_for_ratio(8, 8, kappa)


def test_lorsify_kappa_sets_each_pattern_rank():
    model = Net(hidden=36)
    reports = lorsify(model, ["blocks.*.mlp.fc1", "blocks.*.proj"], kappa=2, groups=[1, 2, 3, 1])
    # the rule gives each layer's total rank (12*36 / (2*48) = 4.5 -> 4; 12*12 / (2*24) = 3); groups split it
    assert [b.mlp.fc1.rank for b in model.blocks] == [4, 2, 1, 4]
    assert reports["blocks.*.mlp.fc1"].ranks == [4, 4, 3, 4]
    assert [b.proj.rank for b in model.blocks] == [3, 1, 1, 3]
    assert reports["blocks.*.proj"].ranks == [3, 2, 3, 3]


# ---------------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_lorsify_exact_when_rank_fits(method):
    """Residuals W_l - mean have rank <= 2*depth: that rank reproduces the model to fp32 precision."""
    model = Net(residual_rank=2)
    dense = copy.deepcopy(model)
    batches = calibration_data()
    reports = lorsify(
        model, ["blocks.*.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2"], rank=8, method=method, calibration=batches
    )
    for report in reports.values():
        assert max(report.weight_error) < 1e-6, report
        assert max(report.output_error) < 1e-6, report
    x = torch.randn(32, 12)
    assert rel_err(model(x), dense(x)) < RTOL[torch.float32]
    # truly converted: one shared weight per pattern, the mean of the dense weights
    for pattern, pick in (("proj", lambda b: b.proj), ("fc1", lambda b: b.mlp.fc1)):
        layers = [pick(b) for b in model.blocks]
        assert all(isinstance(layer, lk.LorsLinear) and layer.shared is layers[0].shared for layer in layers)
        mean = torch.stack([pick(b).weight for b in dense.blocks]).double().mean(0)
        assert rel_err(layers[0].shared.weight, mean) < 1e-7, pattern
    assert model.blocks[0].proj.shared is not model.blocks[0].mlp.fc1.shared
    assert type(model.head) is nn.Linear


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_lorsify_error_decreases_with_rank(method):
    dense = Net(seed=3)
    batches = calibration_data()
    errors = []
    for rank in (0, 1, 2, 4, 8, 12):
        reports = lorsify(copy.deepcopy(dense), "blocks.*.mlp.fc1", rank=rank, method=method, calibration=batches)
        r = reports["blocks.*.mlp.fc1"]
        # SVD is optimal for the weight, PCA for the features on the calibration data
        errors.append(r.weight_error if method == "svd" else r.output_error)
    for layer in range(4):
        curve = [e[layer] for e in errors]
        assert all(b <= a + 1e-9 for a, b in zip(curve, curve[1:])), curve
        assert curve[0] > 0.1 and curve[-1] < 1e-6, curve  # rank 12 = min(in, out) is exact


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dim_out", [6, 20], ids=["out<in", "out>in"])
def test_pca_is_the_optimal_fit_of_the_residual_features(bias, dim_out):
    """Against an SVD of the features themselves: with a bias, PCA's error is that of the best rank-k
    fit of the centered residual features (the mean goes to the bias); without one, of the features
    uncentered. Inputs far from zero-mean make the two differ. Both input/output space branches."""
    torch.manual_seed(0)

    class Parallel(nn.ModuleList):
        def forward(self, x):
            return sum(layer(x) for layer in self)

    model = Parallel(nn.Linear(12, dim_out, bias=bias) for _ in range(3))
    batches = [torch.randn(64, 12) * torch.linspace(0.1, 2, 12) + 3 for _ in range(4)]
    x = torch.cat(batches).double()
    dense = copy.deepcopy(model)
    report = lorsify(model, "*", rank=2, method="pca", calibration=batches)["*"]
    shared = model[0].shared.weight.double()
    for i, layer in enumerate(dense):
        z = x @ (layer.weight.double() - shared).t()
        if bias:
            z = z - z.mean(0)
        sigma = torch.linalg.svdvals(z)
        y = layer(x.float()).double()
        best = (sigma[2:].square().sum() / y.square().sum()).sqrt().item()
        assert report.output_error[i] == pytest.approx(best, rel=1e-5, abs=1e-7)
    svd = lorsify(copy.deepcopy(dense), "*", rank=2, calibration=batches)["*"]
    assert all(p <= s + 1e-9 for p, s in zip(report.output_error, svd.output_error))


def test_pca_beats_svd_on_the_calibration_features():
    """Inputs in a low-dimensional subspace: PCA of the residual features is the best rank-k affine fit of
    them, so its output error is at most the weight-SVD's (and much smaller here)."""
    dense = Net(seed=4)
    g = torch.Generator().manual_seed(5)
    basis = torch.randn(3, 12, generator=g)
    batches = [torch.randn(64, 3, generator=g) @ basis + 0.5 for _ in range(4)]
    pca = lorsify(copy.deepcopy(dense), "blocks.*.mlp.fc1", rank=2, method="pca", calibration=batches)
    svd = lorsify(copy.deepcopy(dense), "blocks.*.mlp.fc1", rank=2, method="svd", calibration=batches)
    for p, s in zip(pca["blocks.*.mlp.fc1"].output_error, svd["blocks.*.mlp.fc1"].output_error):
        assert p <= s + 1e-9
    assert max(pca["blocks.*.mlp.fc1"].output_error) < 0.5 * min(svd["blocks.*.mlp.fc1"].output_error)


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_lorsify_report(method):
    dense = Net(seed=6)
    model = copy.deepcopy(dense)
    batches = calibration_data()
    names = [f"blocks.{i}.mlp.fc2" for i in range(4)]
    report = lorsify(model, "blocks.*.mlp.fc2", rank=3, groups=[1, 1, 2, 2], method=method, calibration=batches)[
        "blocks.*.mlp.fc2"
    ]
    assert (report.pattern, report.layers, report.in_features, report.out_features, report.method) == (
        "blocks.*.mlp.fc2",
        names,
        20,
        12,
        method,
    )
    assert report.ranks == [3, 3, 6, 6]
    assert report.params_before == 4 * (12 * 20 + 12)
    assert report.params_after == 12 * 20 + sum(r * (12 + 20) + 12 for r in report.ranks)
    assert report.params_after == count_parameters(model).stacks[0].total
    inputs = layer_inputs(dense, names, batches)
    for i, name in enumerate(names):
        old, new = dense.get_submodule(name), model.get_submodule(name)
        assert isinstance(new, lk.LorsLinear) and (new.rank, new.groups) == (3, [1, 1, 2, 2][i])
        w = old.weight.double()
        assert report.weight_error[i] == pytest.approx(((new.weight.double() - w).norm() / w.norm()).item(), rel=1e-6)
        with torch.no_grad():
            y, y_new = old(inputs[name]).double(), new(inputs[name]).double()
        assert report.output_error[i] == pytest.approx(((y_new - y).norm() / y.norm()).item(), rel=1e-4)
    text = str(report)
    assert "blocks.*.mlp.fc2" in text and "blocks.3.mlp.fc2" in text and "output error" in text


@pytest.mark.parametrize("method", ["svd", "pca"])
def test_lorsify_scaling(method):
    """A scaling other than 1 divides up: the function is kept exactly."""
    model = Net(residual_rank=2)
    dense = copy.deepcopy(model)
    batches = calibration_data()
    lorsify(model, "blocks.*.mlp.fc1", rank=8, method=method, calibration=batches, scaling=0.25)
    assert model.blocks[1].mlp.fc1.scaling == 0.25
    x = torch.randn(16, 12)
    assert rel_err(model(x), dense(x)) < RTOL[torch.float32]


def test_lorsify_keeps_modes_freezing_and_aliases():
    """Submodules keep their own train/eval mode; frozen layers stay frozen; a layer reachable under
    two names is replaced under both; a layer called with input= works."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.alias = self.layers[1]
            self.norm = nn.BatchNorm1d(8)

        def forward(self, x):
            for layer in self.layers:
                x = layer(input=self.norm(x))
            return x

    model = Model().train()
    model.norm.eval()
    model.layers[0].requires_grad_(False)
    reports = lorsify(model, "layers.*", rank=2, method="pca", calibration=torch.randn(32, 8))
    assert reports["layers.*"].layers == ["layers.0", "layers.1", "layers.2"]
    assert model.training and not model.norm.training
    assert model.alias is model.layers[1] and isinstance(model.alias, lk.LorsLinear)
    first, second = model.layers[0], model.layers[1]
    assert not first.down.requires_grad and not first.up.requires_grad and not first.bias.requires_grad
    assert second.down.requires_grad and first.shared.weight.requires_grad  # used by trainable layers too


def test_lorsify_without_calibration_reports_no_output_error():
    report = lorsify(Net(), "blocks.*.proj", rank=2)["blocks.*.proj"]
    assert report.output_error is None and len(report.weight_error) == 4
    assert report.params_before == 4 * 144 and report.params_after == 144 + 4 * 2 * 24


def test_lorsify_pca_layer_without_bias_and_backward():
    """proj has no bias: PCA keeps none (no mean correction); the converted model trains."""
    model = Net(seed=7)
    batches = calibration_data()
    lorsify(model, "blocks.*.proj", rank=4, method="pca", calibration=batches)
    assert all(b.proj.bias is None for b in model.blocks)
    model(torch.randn(8, 12)).square().sum().backward()
    shared = model.blocks[0].proj.shared.weight
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert all(b.proj.down.grad is not None and b.proj.up.grad is not None for b in model.blocks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_lorsify_low_precision(dtype):
    """16-bit models: computed in float64, stored in the model's dtype, exact up to that dtype's rounding."""
    model = Net(residual_rank=1).to(dtype)
    dense = copy.deepcopy(model)
    reports = lorsify(model, "blocks.*.mlp.fc1", rank=4)
    layer = model.blocks[2].mlp.fc1
    assert layer.shared.weight.dtype == layer.down.dtype == layer.up.dtype == dtype
    assert max(reports["blocks.*.mlp.fc1"].weight_error) < 4 * RTOL[dtype]
    assert rel_err(layer.weight, dense.blocks[2].mlp.fc1.weight) < 4 * RTOL[dtype]


def test_calibration_batch_forms():
    """A Tensor, a list of Tensors, tuples of positional args, dicts of keyword args, a generator (read
    twice: to fit, then to measure), one tuple and one Mapping (a tokenizer's BatchEncoding is one)."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net(seed=8)

        def forward(self, x, shift=0.0):
            return self.net(x + shift)

    x = torch.randn(64, 12)
    results = []
    for calibration in (
        x,
        [x[:32], x[32:]],
        [(x[:32], 0.0), (x[32:],)],
        {"x": x},
        (b for b in x.split(16)),
        (x, 0.0),
        UserDict(x=x),
    ):
        model = TwoInputs()
        report = lorsify(model, "net.blocks.*.mlp.fc1", rank=3, method="pca", calibration=calibration)
        results.append(report["net.blocks.*.mlp.fc1"].output_error)
    for other in results[1:]:
        assert other == pytest.approx(results[0], rel=1e-6)


def test_hf_style_names_and_globs():
    """Hugging Face-like trees (encoder.layer.N.attention.self.query) and the glob rules."""

    class SelfAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key = nn.Linear(8, 8), nn.Linear(8, 8)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = SelfAttn()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(3))

    model = nn.Module()
    model.encoder = Encoder()
    reports = lorsify(model, ["encoder.layer.*.attention.self.query", "**.key"], rank=2)
    assert reports["**.key"].layers == [f"encoder.layer.{i}.attention.self.key" for i in range(3)]
    assert all(isinstance(model.encoder.layer[i].attention.self.query, lk.LorsLinear) for i in range(3))
    # `*` stays within one name component
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        lorsify(Net(), "blocks.*.fc1", rank=2)
    assert lorsify(Net(), "**.fc1", rank=2)["**.fc1"].layers == [f"blocks.{i}.mlp.fc1" for i in range(4)]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(targets="blocks.*.nothing", rank=2), ValueError, "matches no nn.Linear.*blocks.0.proj"),
        (dict(targets="blocks.*.mlp", rank=2), ValueError, r"not nn.Linear"),
        (dict(targets="blocks.*.mlp.*", rank=2), ValueError, r"different weights.*\[20, 12\].*fc1.*\[12, 20\].*fc2"),
        (dict(targets=["blocks.*.proj", "**.proj"], rank=2), ValueError, "blocks.0.proj is matched by two patterns"),
        (dict(targets=[], rank=2), ValueError, "no target patterns"),
        (dict(targets="blocks.*.proj"), ValueError, "exactly one of rank and kappa"),
        (dict(targets="blocks.*.proj", rank=2, kappa=4), ValueError, "exactly one of rank and kappa"),
        (dict(targets="blocks.*.proj", rank=2, method="qr"), ValueError, "method must be"),
        (dict(targets="blocks.*.proj", rank=2, method="pca"), ValueError, "needs calibration"),
        (
            dict(targets="blocks.*.proj", rank=2, groups=[1, 2]),
            ValueError,
            r"groups must be .* one per matched layer \(4\)",
        ),
        (dict(targets="blocks.*.proj", rank=-1), ValueError, "rank must be"),
        (dict(targets="blocks.*.proj", rank=7, groups=2), ValueError, r"rank\*groups 14 for blocks.0.proj exceeds min"),
        (dict(targets="blocks.*.proj", rank=2, scaling=0.0), ValueError, "scaling must be non-zero"),
    ],
    ids=[
        "no-match",
        "non-linear",
        "mixed-shapes",
        "two-patterns",
        "no-patterns",
        "no-rank",
        "rank-and-kappa",
        "bad-method",
        "pca-no-calibration",
        "groups-length",
        "negative-rank",
        "rank-too-big",
        "zero-scaling",
    ],
)
def test_lorsify_errors(kwargs, error, match):
    model = Net()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(error, match=match):
        lorsify(model, **kwargs)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing replaced


def test_lorsify_mixed_dtypes_in_a_pattern():
    model = Net()
    model.blocks[1].proj.to(torch.float64)
    with pytest.raises(ValueError, match="torch.float64.*blocks.1.proj"):
        lorsify(model, "blocks.*.proj", rank=2)


def test_lorsify_layer_missed_by_calibration():
    model = Net()
    model.spare = nn.Linear(12, 12)  # never called by forward
    with pytest.raises(RuntimeError, match="never ran on the calibration data"):
        lorsify(model, "spare", rank=2, method="pca", calibration=calibration_data(1))
    report = lorsify(model, "spare", rank=2, calibration=calibration_data(1))["spare"]  # SVD needs no data
    assert math.isnan(report.output_error[0]) and isinstance(model.spare, lk.LorsLinear)


def test_lorsify_reports_a_stack_larger_than_dense():
    """Shared (one dense weight) + L pairs of at most 1/kappa each: kappa > L / (L - 1) always saves, and
    a stack that saves nothing has kappa <= L / (L - 1); not the converse, the rank being rounded down."""

    def stack(n):
        model = nn.Sequential(*(nn.Linear(12, 12, bias=False) for _ in range(n)))
        return model

    with pytest.warns(UserWarning, match=r"no smaller than the dense one.*kappa = 1.2 <= L / \(L - 1\) = 1.333"):
        report = lorsify(stack(4), "*", kappa=1.2)["*"]  # rank 5: 144 + 4 * 120 = 624 >= 576
    assert not report.saves and "warning" in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = lorsify(stack(4), "*", kappa=2)["*"]  # rank 3: 144 + 4 * 72 = 432 < 576
        assert report.saves and "warning" not in str(report)
        report = lorsify(stack(4), "*", kappa=1.3)["*"]  # 1.3 < 4/3, yet rank 4: 144 + 4 * 96 = 528 < 576
        assert report.saves and report.params_after == 528
