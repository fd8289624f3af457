"""static/effective_weight.py: writes to LorsLinear.weight reach the layer, or raise; reads stay plain
tensors (and where writes cannot be followed, .weight is one)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import own_layer, random_pairs
from torch import nn

import lors_kernels as lk

WRITES = {  # name -> (write(layer, w, delta), the weight expected after)
    "data+=": (lambda l, w, d: l.weight.data.__iadd__(d), lambda w, d: w + d),
    "data=": (lambda l, w, d: setattr(l.weight, "data", d), lambda w, d: d),
    "data.copy_": (lambda l, w, d: l.weight.data.copy_(d), lambda w, d: d),
    "nn.init": (lambda l, w, d: nn.init.zeros_(l.weight), lambda w, d: torch.zeros_like(w)),
    "view": (lambda l, w, d: l.weight.data[1].fill_(2.0), lambda w, d: w.index_fill(0, torch.tensor([1]), 2.0)),
    "no_grad mul_": (lambda l, w, d: torch.no_grad()(lambda: l.weight.mul_(3))(), lambda w, d: 3 * w),
    "no_grad +=": (lambda l, w, d: add_to_weight(l, d), lambda w, d: w + d),
    "_foreach_copy_": (lambda l, w, d: torch._foreach_copy_([l.weight.data], [d]), lambda w, d: d),
    "_foreach_mul_": (lambda l, w, d: torch._foreach_mul_([l.weight.data], 3.0), lambda w, d: 3 * w),
    "aten.copy_.default": (lambda l, w, d: torch.ops.aten.copy_.default(l.weight.data, d), lambda w, d: d),
}


def add_to_weight(layer, delta):
    with torch.no_grad():
        layer.weight += delta  # Python then assigns layer.weight = (the same tensor)


@pytest.mark.parametrize("write", WRITES, ids=list(WRITES))
def test_writes_to_weight_reach_the_layer(write):
    layer = own_layer()
    w, delta = layer.weight.detach().clone(), torch.randn(4, 6)
    do, expected = WRITES[write]
    do(layer, w, delta)
    expected = expected(w, delta)
    torch.testing.assert_close(layer.effective_weight(), expected, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), F.linear(x, expected, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("write", WRITES, ids=list(WRITES))
def test_writes_to_a_stacked_layer_raise(write):
    stack = random_pairs(lk.make_lors_stack(3, 6, 4, rank=2))
    before = {k: v.clone() for k, v in stack.state_dict().items()}
    with pytest.raises(RuntimeError, match="shared weight of 3 layers.*to_linear"):
        WRITES[write][0](stack[1], stack[1].weight.detach(), torch.randn(4, 6))
    for key, value in stack.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_in_place_changes_of_shape_or_flags_are_not_writes():
    stack = lk.make_lors_stack(3, 6, 4, rank=2)
    before = stack[1].effective_weight().detach().clone()
    weight = stack[1].weight.detach()
    weight.t_().unsqueeze_(0).squeeze_(0).requires_grad_(True)  # no value written: nothing to refuse
    assert weight.shape == (6, 4) and torch.equal(weight, before.t())
    assert torch.equal(stack[1].effective_weight(), before)


def test_weight_reads_and_replacement():
    layer = own_layer()
    layer.weight.square().sum().backward()  # a read is differentiable
    assert layer.up.grad is not None and layer.shared.weight.grad is not None
    assert type(layer.weight + 1) is torch.Tensor and type(F.linear(torch.randn(2, 6), layer.weight)) is torch.Tensor
    saved = io.BytesIO()  # saved or copied, it is a plain tensor (not the layer with it)
    torch.save({"w": layer.weight.data}, saved)
    saved.seek(0)
    for copied in (torch.load(saved)["w"], copy.deepcopy(layer.weight.detach())):
        assert type(copied) is torch.Tensor and torch.equal(copied, layer.effective_weight().detach())
    with pytest.raises(AttributeError, match="cannot be replaced or tied"):
        layer.weight = nn.Parameter(torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"LorsLinear.weight is \[4, 6\]"):
        layer.weight.data = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="torch.float32 on cpu, got a torch.float16 tensor"):
        layer.weight.data = torch.zeros(4, 6, dtype=torch.float16)  # nn.Linear would change its dtype


@pytest.mark.parametrize("write", ["data.set_", "no_grad set_", "numpy"])
def test_writes_that_cannot_reach_the_layer_raise(write):
    """set_ points a tensor at other memory and numpy() hands the memory to numpy, where no write is
    seen: both raise instead of writing nothing."""
    layer = own_layer()
    before = layer.effective_weight().detach().clone()
    new = torch.randn(4, 6)
    if write == "numpy":
        assert np_equal(layer.weight.detach().numpy(), before)  # reading works
        with pytest.raises(ValueError, match="read-only"):
            layer.weight.data.numpy()[...] = new.numpy()
    else:
        with pytest.raises(RuntimeError, match="set_ would point it at other memory"):
            if write == "data.set_":
                layer.weight.data.set_(new)
            else:
                with torch.no_grad():
                    layer.weight.set_(new)
    assert torch.equal(layer.effective_weight(), before)


def np_equal(array, tensor):
    return torch.equal(torch.from_numpy(array.copy()), tensor)


def test_a_write_through_an_earlier_weight_changes_only_what_it_writes():
    """A .weight read before an optimizer step: writing one element changes that element by what the
    write changed, and no other (the layer is not rolled back to the old read)."""
    layer = own_layer()
    earlier = layer.weight.data
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 6)).square().sum().backward()
    optimizer.step()
    current = layer.effective_weight().detach().clone()
    earlier[0, 0] += 1.0
    expected = current.clone()
    expected[0, 0] += 1.0
    after = layer.effective_weight().detach()
    torch.testing.assert_close(after, expected)
    assert torch.equal(after.flatten()[1:], current.flatten()[1:])


def test_a_bf16_write_of_one_element_changes_that_element_only():
    torch.manual_seed(0)
    layer = random_pairs(lk.LorsLinear(64, 64, rank=4)).to(torch.bfloat16)
    before = layer.effective_weight().detach().clone()
    with torch.no_grad():
        layer.weight[1, 2] = 0.5
    after = layer.effective_weight().detach()
    assert (after != before).nonzero().tolist() == [[1, 2]]
    torch.testing.assert_close(after[1, 2].float(), torch.tensor(0.5), rtol=0, atol=1e-2)


def test_weight_under_torch_func():
    """torch.func transforms (functional_call, grad, vmap) read .weight as a plain tensor."""

    class ReadsWeight(nn.Module):  # code written for nn.Linear
        def __init__(self):
            super().__init__()
            self.fc = own_layer()

        def forward(self, x):
            return F.linear(x, self.fc.weight, self.fc.bias)

    model = ReadsWeight()
    x = torch.randn(5, 6)
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    rows = torch.func.vmap(lambda row: torch.func.functional_call(model, params, (row,)))(x)
    torch.testing.assert_close(rows, model(x))
    weight = model.fc.weight  # read outside the transform, used inside it
    torch.testing.assert_close(torch.func.vmap(lambda row: F.linear(row, weight))(x), F.linear(x, weight))


def test_weight_of_an_fsdp2_sharded_layer(one_process_group):
    """Under FSDP2 the parameters are DTensors: .weight is the effective weight as a DTensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lors_kernels.distributed import shard_lors_model

    torch.manual_seed(0)
    model = random_pairs(nn.Sequential(*lk.make_lors_stack(2, 8, 8, rank=2)))
    expected = [layer.effective_weight().detach().clone() for layer in model]
    shard_lors_model(model, mesh=init_device_mesh("cpu", (1,)))
    for layer, weight in zip(model, expected):
        assert isinstance(layer.weight, DTensor) and layer.weight.shape == (8, 8)
        torch.testing.assert_close(layer.weight.full_tensor(), weight)
