"""A converted model in the tools around it: writes to LorsLinear.weight, state dicts with the shared
weight once, safetensors / save_pretrained round trips, PEFT (against PEFT's own models), the
parameter count as an int, the kappa report, distillation."""

import copy
import io
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lors_kernels as lk
from lors_kernels import interop
from lors_kernels.convert import count_parameters, distill, lors_structure, lorsify, restore_lors

os.environ["HF_HUB_OFFLINE"] = "1"  # models are built from configs: nothing may be downloaded


def random_pairs(module, seed=0):
    """Non-zero private pairs (up starts at zero) so that every term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, lk.LorsLinear):
                layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.3)
    return module


# ------------------------------------------------------------------------------------ writes to .weight


def own_layer(seed=0):
    torch.manual_seed(seed)
    return random_pairs(lk.LorsLinear(6, 4, rank=2), seed)


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


def test_layers_sharing_a_weight_are_counted_however_they_were_made():
    """Writes and merge() need the layer to be the only one on its shared weight: copies, deep copies,
    pickles, replaced and dropped layers all keep the count right."""
    layer = own_layer()
    twin = copy.copy(layer)  # shares the layer's modules, its shared weight among them
    assert twin.shared is layer.shared and layer.shared.n_layers == 2
    with pytest.raises(RuntimeError, match="shared weight of 2 layers"):
        layer.weight.data.zero_()
    del twin
    assert layer.shared.n_layers == 1
    stack = lk.make_lors_stack(3, 6, 4, rank=2)
    alone = copy.deepcopy(stack[0])  # with its own copy of the shared weight
    assert alone.shared.n_layers == 1 and stack[0].shared.n_layers == 3
    alone.weight.data.zero_()
    assert not alone.effective_weight().any()
    buffer = io.BytesIO()
    torch.save(stack, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(stack), torch.load(buffer, weights_only=False)):
        assert copied[2].shared is copied[0].shared and copied[0].shared.n_layers == 3
    stack[2].shared = lk.SharedWeight(6, 4)
    assert stack[0].shared.n_layers == 2 and stack[2].shared.n_layers == 1
    first = stack[0]
    del stack, copied
    assert first.shared.n_layers == 1
    first.merge()  # the dropped layers no longer hold it back


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


# ------------------------------------------------------------------------------------- state dicts


class Stacked(nn.Module):
    """Two LORS stacks (one reachable under two names) and a plain layer."""

    def __init__(self):
        super().__init__()
        self.blocks = lk.make_lors_stack(3, 8, 8, rank=2)
        self.heads = lk.make_lors_stack(2, 8, 5, rank=[1, 3], init="xavier")
        self.alias = self.heads[1]
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(self.heads[0](x) + self.heads[1](x))


def test_state_dict_holds_the_shared_weight_once_and_reloads():
    torch.manual_seed(0)
    model = random_pairs(Stacked())
    sd = model.state_dict()
    shared = [k for k in sd if k.endswith("shared.weight")]
    assert shared == ["blocks.0.shared.weight", "heads.0.shared.weight"]
    for stack in (model.blocks, model.heads):  # each shared tensor once (model.alias repeats heads.1's own)
        assert sum(v.data_ptr() == stack[0].shared.weight.data_ptr() for v in sd.values()) == 1
    x = torch.randn(4, 8)
    moved = dict(sd)  # the shared weight under a later layer's name: found all the same
    moved["blocks.2.shared.weight"] = moved.pop("blocks.0.shared.weight")
    old = dict(sd, **{f"blocks.{i}.shared.weight": sd["blocks.0.shared.weight"] for i in (1, 2)})
    for seed, checkpoint in enumerate((sd, moved, old)):  # old: named once per layer, as before
        torch.manual_seed(seed + 1)
        clone = Stacked()
        assert clone.load_state_dict(checkpoint, strict=False) == ([], []), seed  # nothing missing or unexpected
        torch.testing.assert_close(clone(x), model(x))
        assert clone.blocks[2].shared is clone.blocks[0].shared
    assert "shared.weight" in model.blocks[2].state_dict()  # a part on its own keeps its shared weight
    del moved["blocks.2.shared.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key.*blocks.0.shared.weight.*blocks.1.shared.weight"):
        Stacked().load_state_dict(moved)


def test_a_state_dict_taken_during_another_leaves_it_whole():
    model = random_pairs(Stacked())
    inner = {}
    model.blocks[0].register_state_dict_post_hook(
        lambda module, state_dict, prefix, metadata: inner.update(model.blocks[2].state_dict()))
    sd = model.state_dict()
    assert [k for k in sd if k.endswith("shared.weight")] == ["blocks.0.shared.weight", "heads.0.shared.weight"]
    assert "shared.weight" in inner


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group, as FSDP needs one."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # FSDP1 is deprecated in favour of FSDP2
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")  # one process
@pytest.mark.filterwarnings("ignore:When using ``NO_SHARD`` for ``ShardingStrategy``")
@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_full_state_dict(one_process_group, use_orig_params):
    """FSDP1 requires every parameter name in its state dict: there the shared weight appears under
    each layer's name, as a tied weight does, and such a checkpoint loads anywhere."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    torch.manual_seed(0)
    model = random_pairs(nn.Sequential(*lk.make_lors_stack(3, 8, 8, rank=2), nn.Linear(8, 3)))
    x = torch.randn(4, 8)
    y = model(x)
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
        sd = wrapped.state_dict()
    assert [k for k in sd if k.endswith("shared.weight")] == [f"{i}.shared.weight" for i in range(3)]
    torch.manual_seed(1)
    clone = FSDP(nn.Sequential(*lk.make_lors_stack(3, 8, 8, rank=2), nn.Linear(8, 3)), device_id=torch.device("cpu"),
                 use_orig_params=use_orig_params)
    with FSDP.state_dict_type(clone, StateDictType.FULL_STATE_DICT):
        clone.load_state_dict(sd)
    torch.testing.assert_close(clone(x), y)
    plain = nn.Sequential(*lk.make_lors_stack(3, 8, 8, rank=2), nn.Linear(8, 3))
    plain.load_state_dict(sd)
    torch.testing.assert_close(plain(x), y)


def test_safetensors_save_model_and_structure_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_model, save_model

    torch.manual_seed(0)
    model = random_pairs(Stacked())
    x = torch.randn(4, 8)
    save_model(model, tmp_path / "plain.safetensors")
    torch.manual_seed(1)
    clone = Stacked()
    load_model(clone, tmp_path / "plain.safetensors")
    torch.testing.assert_close(clone(x), model(x))

    class Dense(Stacked):  # the same architecture before conversion
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.heads = nn.ModuleList(nn.Linear(8, 5) for _ in range(2))
            self.alias = self.heads[1]

    interop.save_model(model, str(tmp_path / "lors.safetensors"))
    rebuilt = interop.load_model(Dense(), str(tmp_path / "lors.safetensors"))
    torch.testing.assert_close(rebuilt(x), model(x))
    assert rebuilt.alias is rebuilt.heads[1] and isinstance(rebuilt.alias, lk.LorsLinear)
    assert [layer.rank for layer in rebuilt.heads] == [1, 3] and rebuilt.heads[0].shared.init == "xavier"
    assert json.loads(json.dumps(lors_structure(model))) == lors_structure(rebuilt)
    with pytest.raises(ValueError, match="no LORS structure"):
        interop.load_model(Dense(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"needs nn.Linear\(8, 8\) layers.*blocks.0 \(Tanh\)"):
        broken = Dense()
        broken.blocks[0] = nn.Tanh()
        restore_lors(broken, lors_structure(model))
    with pytest.raises(ValueError, match="no config.lors"):
        restore_lors(Dense())


# ------------------------------------------------------------------------------- Hugging Face models


def tiny_bert(seed=0):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    return BertModel(config).eval()


TARGETS = ["encoder.layer.*.attention.self.query", "encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"]


def test_hugging_face_save_pretrained_and_back(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModel, BertModel

    model = tiny_bert()
    lorsify(model, TARGETS, rank=4)
    random_pairs(model)
    assert model.config.lors == lors_structure(model)
    model.save_pretrained(tmp_path)  # safetensors refuses aliased tensors: the shared weights are saved once
    assert json.loads((tmp_path / "config.json").read_text())["lors"]["stacks"][1]["pattern"] == TARGETS[1]
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids).last_hidden_state
    for cls in (BertModel, AutoModel):
        loaded = interop.from_pretrained(cls, str(tmp_path))
        assert not loaded.training
        torch.testing.assert_close(loaded(ids).last_hidden_state, expected)
        layers = [loaded.encoder.layer[i].intermediate.dense for i in range(3)]
        assert all(isinstance(l, lk.LorsLinear) and l.shared is layers[0].shared for l in layers)
    dense_dir = tmp_path / "dense"
    tiny_bert().save_pretrained(dense_dir)
    with pytest.raises(ValueError, match="no 'lors' entry"):
        interop.from_pretrained(BertModel, str(dense_dir))


# ----------------------------------------------------------------------------------------------- PEFT


class Mlp(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.head = nn.Linear(10, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def peft_model(model, seed=1, **config):
    """PEFT's own LoRA model on ``model``, with random lora_B (PEFT starts it at zero)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "lora_alpha": 6, "target_modules": ["fc1", "fc2"], **config}
    model = get_peft_model(model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


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


@pytest.mark.filterwarnings("ignore:Unsupported layer type")  # PEFT's word on every custom layer it wraps
def test_get_peft_model_on_lors_layers(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    dense = Mlp()
    lors = copy.deepcopy(dense)
    lors.fc1, lors.fc2 = lk.LorsLinear.from_linear(dense.fc1, rank=2), lk.LorsLinear.from_linear(dense.fc2, rank=2)
    random_pairs(lors)  # a real LORS residual under the adapter
    with torch.no_grad():
        dense.fc1.weight.copy_(lors.fc1.weight)
        dense.fc2.weight.copy_(lors.fc2.weight)
    with pytest.raises(ValueError, match="not supported"):  # PEFT's own refusal without the registration
        get_peft_model(copy.deepcopy(lors), LoraConfig(r=4, target_modules=["fc1"]))
    config = dict(r=4, lora_alpha=6, target_modules=["fc1", "fc2"])
    peft_dense = peft_model(dense, **config).eval()
    base = copy.deepcopy(lors)
    peft_lors = get_peft_model(lors, interop.register_peft(LoraConfig(**config))).eval()
    peft_lors.load_state_dict(peft_dense.state_dict(), strict=False)  # the same adapters
    x = torch.randn(5, 10)
    torch.testing.assert_close(peft_lors(x), peft_dense(x))
    peft_lors.save_pretrained(tmp_path)  # a saved adapter loads with the registered config
    with pytest.raises(ValueError, match="not supported"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    config_saved = interop.register_peft(LoraConfig.from_pretrained(tmp_path))
    torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path, config=config_saved).eval()(x), peft_dense(x))
    merged_dense, merged_lors = peft_dense.merge_and_unload(), peft_lors.merge_and_unload()
    assert isinstance(merged_lors.fc1, lk.LorsLinear)  # the adapter went into the layer's own shared weight
    torch.testing.assert_close(merged_lors(x), merged_dense(x), rtol=1e-5, atol=1e-5)

    stacked = Mlp()
    stacked.fc2, stacked.fc3 = lk.make_lors_stack(2, 16, 16)  # fc3: a second user of fc2's shared weight
    peft_stacked = get_peft_model(stacked, interop.register_peft(LoraConfig(**config)))
    with pytest.raises(RuntimeError, match="shared weight of 2 layers"):
        peft_stacked.merge_and_unload()


@pytest.mark.parametrize("variant", ["lora", "rslora+alpha_pattern"])
def test_load_lora_state_dict_equals_peft(variant):
    pytest.importorskip("peft")
    from peft import get_peft_model_state_dict

    extra = dict(use_rslora=True, alpha_pattern={"fc2": 3}) if variant != "lora" else {}
    peft = peft_model(Mlp(), **extra).eval()
    adapter = get_peft_model_state_dict(peft)
    assert any(k.startswith("base_model.model.fc1.lora_A") for k in adapter)
    model = Mlp().eval()
    assert sorted(interop.load_lora(model, adapter, peft.peft_config["default"])) == ["fc1", "fc2"]
    x = torch.randn(5, 10)
    torch.testing.assert_close(model(x), peft(x))
    assert model.fc2.scaling == peft.base_model.model.fc2.scaling["default"]
    config = json.loads(json.dumps(peft.peft_config["default"].to_dict(), default=list))  # adapter_config.json
    plain = Mlp().eval()
    interop.load_lora(plain, adapter, config)
    torch.testing.assert_close(plain(x), peft(x))
    named = {k: v for k, v in peft.state_dict().items() if ".lora_" in k}  # keys with the adapter's name
    two = {**named, **{k.replace(".default.", ".other."): torch.zeros_like(v) for k, v in named.items()}}
    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\]: give adapter_name"):
        interop.load_lora(Mlp(), two, config)
    by_name = Mlp().eval()
    interop.load_lora(by_name, two, config, adapter_name="default")
    torch.testing.assert_close(by_name(x), peft(x))
    with pytest.raises(ValueError, match="not plain LoRA"):
        interop.load_lora(Mlp(), {**adapter, "base_model.model.head.weight": torch.zeros(3, 16)}, config)
    with pytest.raises(ValueError, match="only nn.Linear"):
        interop.load_lora(model, adapter, config)  # already LorsLinear


# ------------------------------------------------------------------------------- counting, reporting


def test_count_parameters_is_an_int():
    count = count_parameters(lk.make_lors_stack(3, 8, 4, rank=2))
    total = 32 + 3 * (2 * 12 + 4)
    assert int(count) == count == count.total == total and isinstance(count, int)
    assert count + 1 == total + 1 and 2 * count == 2 * total and count / 2 == total / 2 and count > total - 1
    assert f"{count:,}" == f"{total:,}" and f"{count:>6d}" == f"{total:>6d}" and f"{count}" == f"{total}"
    assert "{}".format(count) == str(total) and "%d" % count == str(total)
    assert "per layer" in count.table() and count.table() == str(count)
    assert count.stacks[0].layers == 3 and count.other == 0
    assert sum([count, count]) == 2 * total and json.dumps({"n": count}) == f'{{"n": {total}}}'


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


# ------------------------------------------------------------------------------------------ distill


def test_distill_reduces_the_output_error():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher).train()
    lorsify(student, TARGETS, rank=2)
    calibration = [{"input_ids": torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(i))}
                   for i in range(3)]
    embeddings = student.embeddings.word_embeddings.weight.detach().clone()
    errors = distill(student, teacher, calibration, steps=30, lr=3e-3, progress=False)
    assert len(errors) == 30 and errors[-1] < 0.5 * errors[0]
    assert student.training and not teacher.training  # modes restored
    assert torch.equal(student.embeddings.word_embeddings.weight, embeddings)  # only LORS layers trained
    assert student.embeddings.word_embeddings.weight.requires_grad  # and the others are trainable again
    with pytest.raises(ValueError, match="nothing to train"):
        distill(teacher, teacher, calibration, steps=1)
    with pytest.raises(ValueError, match="steps must be"):
        distill(student, teacher, calibration, steps=0)

    class Words(nn.Module):
        def forward(self, input_ids):
            return {"text": "no tensor"}

    with pytest.raises(TypeError, match="no tensor in the model's output"):
        distill(student, Words(), calibration, steps=1, progress=False)


def test_distill_matches_logits_not_the_loss():
    """A batch with labels makes a Hugging Face model return its loss first: distill matches the logits."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, num_labels=3)
    teacher = BertForSequenceClassification(config).eval()
    student = copy.deepcopy(teacher)
    lorsify(student, "bert.encoder.layer.*.intermediate.dense", rank=1)
    batch = {"input_ids": torch.randint(0, 64, (4, 12)), "labels": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        got, target = student(**batch), teacher(**batch)
    assert list(got.keys())[0] == "loss"
    expected = ((got.logits - target.logits).norm() / target.logits.norm()).item()

    class AsTuple(nn.Module):  # return_dict=False: (loss, logits)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **batch):
            return self.model(**batch, return_dict=False)

    for as_tuple in (False, True):
        s, t = copy.deepcopy(student), teacher
        if as_tuple:
            s, t = AsTuple(s), AsTuple(t)
        errors = distill(s, t, batch, steps=1, progress=False)
        assert errors[0] == pytest.approx(expected, rel=1e-4), as_tuple
