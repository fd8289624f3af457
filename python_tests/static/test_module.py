"""static/module.py: LorsLinear (init, drop-in for nn.Linear, from_linear, from_peft, merge, dropout,
pickles of earlier versions) and stacks of them."""

import io
import math
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_DEVICE, Mlp, assert_close, own_layer, peft_model, random_pairs, route_device

import lors_kernels as lk
from lors_kernels import backend
from lors_kernels.static.module import LorsLinear

from .oracle import dense64

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_lors_linear_init_follows_the_paper():
    torch.manual_seed(0)
    layer = lk.LorsLinear(64, 32, rank=4, groups=2)
    assert layer.down.shape == (8, 64) and layer.up.shape == (32, 8) and layer.bias.shape == (32,)
    assert layer.up.abs().sum() == 0 and layer.bias.abs().sum() == 0
    bound = math.sqrt(6 / 64)  # the official kaiming_uniform_(a=0) on fan_in 64
    assert layer.down.abs().max() <= bound and layer.down.abs().max() > 0.9 * bound
    assert abs(layer.down.std() / (bound / math.sqrt(3)) - 1) < 0.1  # U(-b, b) has std b / sqrt(3)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.shared.weight))  # zero residual at init


def test_lors_linear_is_a_drop_in_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    layer = lk.LorsLinear.from_linear(linear, rank=4)
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(layer(x), linear(x))
    assert (layer.in_features, layer.out_features) == (24, 16)
    torch.nn.init.normal_(layer.up)
    assert layer.weight.shape == linear.weight.shape
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert "rank=4" in repr(layer) and "in_features=24" in repr(layer)
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = linear.weight  # the effective weight is read-only


def test_from_linear_with_a_shared_weight_absorbs_the_residual():
    torch.manual_seed(0)
    shared = lk.SharedWeight(20, 12)
    residual = torch.randn(12, 3) @ torch.randn(3, 20)  # rank 3
    linear = torch.nn.Linear(20, 12)
    with torch.no_grad():
        linear.weight.copy_(shared.weight + residual)
    layer = lk.LorsLinear.from_linear(linear, shared=shared, rank=3, scaling=0.5)
    assert layer.shared is shared
    x = torch.randn(6, 20)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_and_dtype_moves():
    torch.manual_seed(0)
    stack = lk.make_lors_stack(2, 8, 8, rank=2)
    for layer in stack:
        torch.nn.init.normal_(layer.up)
    clone = lk.make_lors_stack(2, 8, 8, rank=2)
    clone.load_state_dict(stack.state_dict())
    x = torch.randn(3, 8)
    for a, b in zip(stack, clone):
        torch.testing.assert_close(a(x), b(x))
    assert clone[0].shared is clone[1].shared
    half = clone.to(torch.float64)
    assert half[0].shared.weight.dtype == torch.float64 and half[1].down.dtype == torch.float64
    assert half[0](x.double()).dtype == torch.float64
    # The shared weight is one parameter of the stack, counted once.
    assert sum(p.numel() for p in stack.parameters()) == 64 + 2 * (2 * 8 + 8 * 2 + 8)


def test_make_lors_stack_groups_and_errors():
    stack = lk.make_lors_stack(3, 10, 6, rank=2, groups=[1, 2, 4], bias=False)
    assert [layer.down.shape[0] for layer in stack] == [2, 4, 8]
    assert all(layer.bias is None for layer in stack)
    with pytest.raises(ValueError, match="2 group counts given for 3 layers"):
        lk.make_lors_stack(3, 10, 6, groups=[1, 2])
    with pytest.raises(ValueError, match="shared weight"):
        lk.LorsLinear(10, 7, shared=stack[0].shared)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_shared_weight_gradient_is_sum_over_layers(backend_name, use_backend):
    use_backend(backend_name)
    torch.manual_seed(0)
    stack = lk.make_lors_stack(3, 16, 16, rank=4, groups=[1, 2, 3]).to(KERNEL_DEVICE)
    for layer in stack:
        torch.nn.init.normal_(layer.up)
    x = torch.randn(5, 16, device=KERNEL_DEVICE)
    h = x
    for layer in stack:
        h = torch.tanh(layer(h))
    h.square().sum().backward()
    shared = stack[0].shared.weight

    # The same network with three independent float64 copies of the shared weight.
    copies = [shared.detach().double().clone().requires_grad_() for _ in stack]
    h = x.double()
    for w, layer in zip(copies, stack):
        h = torch.tanh(dense64(h, w, layer.down, layer.up, layer.bias, layer.scaling))
    h.square().sum().backward()
    expected = sum(w.grad for w in copies)
    assert all(layer.shared is stack[0].shared for layer in stack)
    assert_close(shared.grad, expected, torch.float32, "dshared")


@pytest.mark.parametrize("state", ["pair", "rank0", "merged"])
@pytest.mark.parametrize("backend_name", ["reference", "native", "triton"])
def test_outputs_are_no_views_and_take_in_place_ops(backend_name, state, use_backend):
    """A [B, T, in] input gives an output of its own (no view of the kernels' [rows, out]: autograd refused
    in-place ops on it, "Output 0 of LorsLinearFunction is a view"; FSDP2 warns of views), and an in-place
    op on it in training has the gradients of the same op out of place."""
    use_backend(backend_name)
    torch.manual_seed(0)
    layer = lk.LorsLinear(8, 6, rank=0 if state == "rank0" else 2)
    torch.nn.init.normal_(layer.up)
    if state == "merged":
        layer.merge()
    x = torch.randn(2, 3, 8, device=KERNEL_DEVICE, requires_grad=True)
    layer = layer.to(KERNEL_DEVICE)
    out = layer(x)
    assert out._base is None
    out.mul_(0.5).sum().backward()
    expected = torch.autograd.grad((layer(x) * 0.5).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_merge_unmerge_to_linear():
    layer = own_layer()
    x = torch.randn(3, 6)
    y = layer(x)
    shared = layer.shared.weight.detach().clone()
    layer.merge()
    assert layer.merged and "merged" in repr(layer)
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.shared.weight, shared + layer.get_delta_weight())
    with pytest.raises(RuntimeError, match="is merged"):
        layer.state_dict()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.shared.weight, shared)
    torch.testing.assert_close(layer.to_linear()(x), y)
    stack = lk.make_lors_stack(2, 6, 4)
    with pytest.raises(RuntimeError, match="merge.. would change the shared weight of 2 layers"):
        stack[0].merge()


def test_loading_into_a_merged_layer_gives_the_checkpoint():
    layer = own_layer()
    x = torch.randn(3, 6)
    checkpoint = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    with torch.no_grad():
        layer.up.mul_(2)
    layer.merge()
    layer.load_state_dict(checkpoint)  # a checkpoint holds an unmerged layer: it is unmerged first
    assert not layer.merged
    torch.testing.assert_close(layer(x), y)


def test_modules_pickled_before_merge_dropout_and_init_still_run():
    """A stack pickled by an earlier version: its layers have no merged, dropout or hooks, its shared
    weight no init (nor the count of the version after)."""
    torch.manual_seed(0)
    stack = random_pairs(lk.make_lors_stack(2, 6, 4, rank=2))
    x = torch.randn(3, 6)
    expected = [layer(x) for layer in stack]
    for layer in stack:
        for name in ("merged", "dropout"):
            layer.__dict__.pop(name, None)
        layer._state_dict_pre_hooks.clear()
    stack[0].shared.__dict__.pop("init", None)
    stack[0].shared.__dict__["n_layers"] = 7  # what a pickle of the version counting in place holds
    buffer = io.BytesIO()
    torch.save(stack, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    assert "merged" not in vars(old[0]) and "init" not in vars(old[0].shared)
    for layer, y in zip(old, expected):
        torch.testing.assert_close(layer(x), y)
        torch.testing.assert_close(layer.weight, layer.effective_weight())
    assert old[0].shared.n_layers == 2 and "merged" not in repr(old) and old[0].shared.init == "default"
    assert lk.make_lors_stack(2, 6, 4, rank=2).load_state_dict(old.state_dict(), strict=False) == ([], [])
    with pytest.raises(RuntimeError, match="shared weight of 2 layers"):
        old[0].merge()
    solo = old[0]
    del old, layer
    solo.merge()
    with pytest.raises(RuntimeError, match="is merged"):
        solo.state_dict()


# ------------------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("variant", ["lora", "rslora", "lora_bias"])
@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # fc2 has no bias: PEFT warns, as it should
def test_from_peft_equals_peft(variant):
    peft = peft_model(Mlp(), use_rslora=variant == "rslora", lora_bias=variant == "lora_bias").eval()
    for name in ("fc1", "fc2"):
        lora_layer = peft.base_model.model.get_submodule(name)
        layer = lk.LorsLinear.from_peft(lora_layer)
        expected_scaling = 6 / (math.sqrt(4) if variant == "rslora" else 4)
        assert layer.scaling == lora_layer.scaling["default"] == expected_scaling
        h = torch.randn(5, lora_layer.in_features)
        torch.testing.assert_close(layer.eval()(h), lora_layer(h))
        torch.testing.assert_close(layer.get_delta_weight(), lora_layer.get_delta_weight("default"))
        assert not layer.shared.weight.requires_grad and layer.down.requires_grad  # PEFT's base is frozen
        if variant == "lora_bias" and name == "fc2":
            continue  # PEFT cannot merge a lora_bias into a layer without bias
        layer.merge()  # PEFT's merge against ours: the same dense layer
        lora_layer.merge()
        base = lora_layer.get_base_layer()
        dense = layer.to_linear()
        torch.testing.assert_close(layer.shared.weight, base.weight)
        torch.testing.assert_close((dense.weight, dense.bias), (base.weight, base.bias))
        torch.testing.assert_close(layer(h), lora_layer(h))


def test_dropout_on_the_low_rank_path_equals_peft():
    peft = peft_model(Mlp(), lora_dropout=0.5).train()
    lora_layer = peft.base_model.model.fc1
    layer = lk.LorsLinear.from_peft(lora_layer)
    assert layer.training and layer.dropout == 0.5
    x = torch.randn(64, 10)
    torch.manual_seed(3)
    expected = lora_layer(x)
    torch.manual_seed(3)
    got = layer(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, layer.eval()(x))  # dropout was active
    torch.testing.assert_close(layer(x), lora_layer.eval()(x))  # and is not in eval


def test_models_pickled_under_the_former_module_name_load(monkeypatch):
    """Earlier releases defined the layers in lors_kernels.lors_linear.module; their pickles name it."""
    torch.manual_seed(0)
    for cls in (lk.LorsLinear, lk.SharedWeight):
        monkeypatch.setattr(cls, "__module__", "lors_kernels.lors_linear.module")
    stack = random_pairs(lk.make_lors_stack(2, 6, 4, rank=2))
    data = pickle.dumps(stack)
    monkeypatch.undo()
    assert b"lors_kernels.lors_linear.module" in data and b"lors_kernels.static" not in data
    old, x = pickle.loads(data), torch.randn(3, 6)
    assert type(old[0]) is lk.LorsLinear and old[0].shared is old[1].shared
    torch.testing.assert_close(old[1](x), stack[1](x))


@pytest.mark.skipif(backend.native() is None, reason="the native extension is not built")
def test_forward_reaches_the_native_launcher_in_five_frames():
    """LorsLinear.forward -> lors_linear (registry.public) -> Op.__call__ -> registry._run -> the op's
    native forward, which calls the extension: the path a reader follows by imports (docs/design.md)."""
    launcher, stacks = backend.native().lors_linear_forward_cpu, []

    def profile(frame, event, arg):
        if event == "c_call" and arg is launcher:
            names = []
            while frame.f_code is not LorsLinear.forward.__code__:
                names.append(frame.f_code.co_name)
                frame = frame.f_back
            stacks.append(["forward", *reversed(names)])

    layer = lk.LorsLinear(64, 64, rank=4)
    with torch.no_grad():
        sys.setprofile(profile)
        try:
            layer(torch.randn(2, 64))
        finally:
            sys.setprofile(None)
    assert stacks == [["forward", "function", "__call__", "_run", "_native_cpu_forward"]]


# ------------------------------------------------------------------------------------------ stack_linear


def mixed_stack(seed=0):
    """Three layers of one stack with ranks 4, 2, 6 (groups 1, 1, 2), random pairs and biases."""
    torch.manual_seed(seed)
    stack = lk.make_lors_stack(3, 24, 16, rank=[4, 2, 3], groups=[1, 1, 2], scaling=0.5)
    random_pairs(stack, seed)
    with torch.no_grad():
        for i, layer in enumerate(stack):
            layer.bias.normal_()
            layer.scaling = 0.5 + i
    return stack


@pytest.mark.parametrize("route", ["reference", "native", "triton"])
def test_stack_linear_is_each_row_through_its_layer(route, use_backend):
    use_backend(route)
    device = route_device(route)
    stack = mixed_stack().to(device)
    x = torch.randn(2, 7, 24, device=device, requires_grad=True)
    index = torch.tensor([[2, -1, 0, 1, 1, 2, 0], [0, 0, -1, 2, 1, 2, 2]], device=device)
    y = lk.stack_linear(stack, x, index)
    grad = torch.randn(y.shape, device=device)
    got = torch.autograd.grad(y, [x, *stack.parameters()], grad)
    rows = [
        stack[i](x[b, t]) if i >= 0 else F.linear(x[b, t], stack[0].shared.weight)
        for (b, t), i in zip(((b, t) for b in range(2) for t in range(7)), index.flatten().tolist())
    ]
    expected = torch.stack(rows).view(2, 7, 16)
    want = torch.autograd.grad(expected, [x, *stack.parameters()], grad)
    assert_close(y, expected.double(), torch.float32, "y")
    for name, g, w in zip(["dx", *dict(stack.named_parameters())], got, want):
        assert_close(g, w.double(), torch.float32, name)


def test_stack_linear_one_layer_per_sample_and_dropout_in_training():
    """index [B, 1] picks one layer per sample; a layer with dropout in training runs its rows itself."""
    stack = mixed_stack()
    x = torch.randn(3, 5, 24)
    index = torch.tensor([[1], [-1], [0]])
    expected = torch.stack([stack[1](x[0]), F.linear(x[1], stack[0].shared.weight), stack[0](x[2])])
    assert_close(lk.stack_linear(stack, x, index), expected.double(), torch.float32, "per sample")
    stack[2].dropout = 0.5
    stack.train()
    full = torch.tensor([[2] * 5, [0] * 5, [2] * 5])
    torch.manual_seed(3)
    y = lk.stack_linear(stack, x, full)
    torch.manual_seed(3)
    rows = stack[2](x[[0, 2]])
    assert_close(y[[0, 2]], rows.double(), torch.float32, "dropout rows")
    assert_close(y[1], stack[0](x[1]).double(), torch.float32, "other rows")
    with pytest.raises(IndexError, match=r"index entries must be -1 .* \[0, 3\)"):
        lk.stack_linear(stack, x, full + 1)


def test_stack_linear_refuses_layers_of_different_stacks():
    a, b = lk.make_lors_stack(2, 8, 8), lk.make_lors_stack(1, 8, 8)
    with pytest.raises(ValueError, match=r"layers\[2\] does not use layers\[0\]'s SharedWeight"):
        lk.stack_linear([*a, b[0]], torch.randn(2, 8), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="sequence of LorsLinear"):
        lk.stack_linear([torch.nn.Linear(8, 8)], torch.randn(2, 8), torch.tensor([0, 0]))
