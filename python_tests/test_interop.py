"""interop.py: a converted model in the tools around it: safetensors / save_pretrained round trips, PEFT
(against PEFT's own models)."""

import copy
import json
import os
import warnings

import pytest
import torch
from helpers import TARGETS, Mlp, Stacked, peft_model, random_pairs, rel_err, tiny_bert
from torch import nn

import lors_kernels as lk
from lors_kernels import hf, interop
from lors_kernels.convert import lors_structure, lorsify, restore_lors

os.environ["HF_HUB_OFFLINE"] = "1"  # models are built from configs: nothing may be downloaded


# --------------------------------------------------------------------------------------- safetensors


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
    with pytest.raises(ValueError, match="the model's config records none"):
        restore_lors(Dense())


# ------------------------------------------------------------------------------- Hugging Face models


def test_hugging_face_save_pretrained_and_back(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModel, BertModel

    model = tiny_bert()
    lorsify(model, TARGETS, rank=4)
    random_pairs(model)
    assert hf.structure_of(model.config) == lors_structure(model)
    model.save_pretrained(tmp_path)  # safetensors refuses aliased tensors: the shared weights are saved once
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["structure"]["stacks"][1]["pattern"] == TARGETS[1]
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids).last_hidden_state
    for cls in (BertModel, AutoModel):
        loaded = interop.from_pretrained(cls, str(tmp_path))
        assert not loaded.training
        torch.testing.assert_close(loaded(ids).last_hidden_state, expected)
        layers = [loaded.encoder.layer[i].intermediate.dense for i in range(3)]
        assert all(isinstance(l, lk.LorsLinear) and l.shared is layers[0].shared for l in layers)
    # the "lors" entry of checkpoints converted before the quantization_config record still loads
    config["lors"] = config.pop("quantization_config")["structure"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(interop.from_pretrained(BertModel, str(tmp_path))(ids).last_hidden_state, expected)
    dense_dir = tmp_path / "dense"
    tiny_bert().save_pretrained(dense_dir)
    with pytest.raises(ValueError, match="records no LORS structure"):
        interop.from_pretrained(BertModel, str(dense_dir))


# ----------------------------------------------------------------------------------------------- PEFT


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
    assert isinstance(merged_lors.fc1, lk.LorsLinear) and merged_lors.fc1.rank == 2 + 4  # the adapter joined the pair
    torch.testing.assert_close(merged_lors(x), merged_dense(x), rtol=1e-5, atol=1e-5)


def test_all_linear_adapts_what_peft_all_linear_adapts_lors_layers_included():
    """interop.all_linear(converted) makes PEFT adapt the layers its "all-linear" adapts in the dense model,
    LorsLinear ones included, and PEFT says nothing of unknown layer types."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    def adapted(model):
        return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))

    dense = tiny_bert()
    converted = copy.deepcopy(dense)
    lorsify(converted, TARGETS, rank=4)
    expected = adapted(get_peft_model(dense, LoraConfig(target_modules="all-linear")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = get_peft_model(
            converted, interop.register_peft(LoraConfig(target_modules=interop.all_linear(converted)))
        )
    assert adapted(peft) == expected and len(expected) == 3 * 6 + 1  # six per layer, and the pooler
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]


def _random_adapters(model, seed=1):
    """Random lora_B (PEFT starts it at zero), so that every adapter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_peft_merges_into_every_layer_of_a_stack_exactly(tmp_path):
    """merge_adapter / unmerge_adapter / merge_and_unload on LoRA layers over a stack's layers: each adapter
    joins its layer's private pair (rank R -> R + r), the shared weight untouched; the outputs are PEFT's
    unmerged ones, and unmerging restores every pair bit for bit. Two adapters merge and unmerge in turn."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = random_pairs(Stacked()).double().eval()
    shared = model.blocks[0].shared.weight.detach().clone()
    pairs = {
        n: (m.down.detach().clone(), m.up.detach().clone())
        for n, m in model.named_modules()
        if isinstance(m, lk.LorsLinear)
    }
    config = interop.register_peft(LoraConfig(r=3, lora_alpha=5, target_modules=["blocks.0", "blocks.2", "heads.0"]))
    peft = get_peft_model(model, config)
    peft.add_adapter(
        "second", interop.register_peft(LoraConfig(r=2, lora_alpha=2, target_modules=["blocks.1", "blocks.2"]))
    )
    peft.base_model.set_adapter(["default", "second"])
    _random_adapters(peft)
    x = torch.randn(4, 8, dtype=torch.float64)
    unmerged = peft(x)
    peft.merge_adapter()
    torch.testing.assert_close(peft(x), unmerged, rtol=1e-12, atol=1e-12)
    assert peft.base_model.model.blocks[2].base_layer.rank == 2 + 3 + 2
    assert torch.equal(peft.base_model.model.blocks[0].base_layer.shared.weight, shared)
    peft.unmerge_adapter()
    for name, layer in peft.base_model.model.named_modules():
        if isinstance(layer, lk.LorsLinear):
            key = name.replace(".base_layer", "")
            assert torch.equal(layer.down, pairs[key][0]) and torch.equal(layer.up, pairs[key][1]), name
            assert layer.rank * layer.groups == len(pairs[key][0]), name
    torch.testing.assert_close(peft(x), unmerged, rtol=1e-12, atol=1e-12)
    merged = peft.merge_and_unload()
    assert isinstance(merged.blocks[2], lk.LorsLinear) and merged.blocks[2].rank == 7
    torch.testing.assert_close(merged(x), unmerged, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.blocks[1].shared.weight, shared)


def test_lors_linear_merge_lora_and_back():
    """merge_lora adds scaling * up @ down to the function and unmerge_lora restores the layer exactly;
    bad shapes and a wrong unmerge are named."""
    torch.manual_seed(0)
    layer = random_pairs(lk.LorsLinear(6, 4, rank=2, groups=2, scaling=0.5, dtype=torch.float64))
    before = {n: t.detach().clone() for n, t in layer.state_dict().items()}
    down, up = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = layer(x) + 1.5 * (x @ down.t()) @ up.t()
    layer.merge_lora(down, up, scaling=1.5)
    assert (layer.rank, layer.groups, tuple(layer.down.shape)) == (7, 1, (7, 6))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no pair of rank 2"):
        layer.unmerge_lora(2)
    layer.unmerge_lora(3)
    assert (layer.rank, layer.groups) == (2, 2)
    assert all(torch.equal(t, before[n]) for n, t in layer.state_dict().items())
    with pytest.raises(ValueError, match="needs down \\[r, 6\\] and up \\[4, r\\]"):
        layer.merge_lora(torch.randn(3, 5), torch.randn(4, 3))


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


# ----------------------------------------------------------------------- PEFT mixed-adapter batches


def _indexed_calls(monkeypatch):
    """The base weights (data_ptr) of the indexed lors_linear calls made from here on, in order."""
    from lors_kernels import registry
    from lors_kernels.static.op import lors_linear_indexed_op

    calls, route = [], registry.Op.route

    def counted(op, *args):
        if op is lors_linear_indexed_op:
            calls.append(args[1].data_ptr())
        return route(op, *args)

    # On the class: monkeypatch would undo a patch of the instance by setting the bound method on it,
    # which then hides the class's route from later tests (test_registry patches Op.route).
    monkeypatch.setattr(registry.Op, "route", counted)
    return calls


def _tiny_gpt2():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=48))


def _three_adapters(model, targets, partial, **config):
    """PEFT's model with adapters "one" (rank 2), "two" (rank 4, lora_bias) on ``targets`` and "three" (rank
    3, rsLoRA) on ``partial`` only; lora_B and its biases random, every adapter trainable (PEFT trains the
    first only). In eval mode: PEFT takes adapter_names only there."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=targets, **config), adapter_name="one")
    peft.add_adapter("two", LoraConfig(r=4, lora_alpha=2, target_modules=targets, lora_bias=True, **config))
    peft.add_adapter("three", LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=partial, **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if ".lora_" in name:
                p.requires_grad_(True)
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft.eval()


def _mixed(model, x, names):
    out = model(x, adapter_names=names)
    return out if isinstance(out, torch.Tensor) else out.logits


def _adapter_runs(model):
    """A list that each forward of a LoRA layer's lora_A / lora_B module appends to."""
    from peft.tuners.lora import Linear

    runs = []
    for layer in model.modules():
        if isinstance(layer, Linear):
            for linear in [*layer.lora_A.values(), *layer.lora_B.values()]:
                linear.register_forward_hook(lambda *_: runs.append(1))
    return runs


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed but the targeted layer")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT on GPT-2
@pytest.mark.parametrize("model", ["mlp", "gpt2"])
def test_fused_mixed_batches_equal_peft_in_one_call_per_layer(model, monkeypatch):
    """A mixed batch of three adapters, of ranks 2, 4 (lora_bias) and 3 (on one layer only), and "__base__":
    each LoRA layer makes one indexed lors_linear call and no adapter module runs; the outputs and every
    adapter's gradients are PEFT's. nn.Linear layers over rows [B, in] (the Mlp's fc2 has no bias), and
    GPT-2's Conv1D layers (PEFT's fan_in_fan_out) over [B, T, in]."""
    pytest.importorskip("peft")
    from peft.tuners.lora import Linear

    if model == "mlp":
        peft, partial = _three_adapters(Mlp(), ["fc1", "fc2", "head"], ["fc2"]), "fc2"
        x, names = torch.randn(6, 10), ["one", "__base__", "two", "three", "one", "two"]
    else:
        targets = ["c_attn", "c_fc"]
        peft, partial = _three_adapters(_tiny_gpt2(), targets, ["h.1.mlp.c_fc"], fan_in_fan_out=True), "h.1.mlp.c_fc"
        x, names = torch.randint(0, 64, (5, 7)), ["two", "three", "__base__", "one", "two"]
    fused = copy.deepcopy(peft)
    layers = {n: m.get_base_layer().weight.data_ptr() for n, m in fused.named_modules() if isinstance(m, Linear)}
    assert sorted(interop.fuse_mixed_batches(fused)) == sorted(layers) and len(layers) in (3, 4)
    assert interop.fuse_mixed_batches(fused) == list(layers)  # again: nothing new

    def run(model):
        out = _mixed(model, x, names)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return out, {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}

    expected, expected_grads = run(peft)
    calls, runs = _indexed_calls(monkeypatch), _adapter_runs(fused)
    out, grads = run(fused)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert sorted(calls) == sorted(layers.values()) and not runs
    assert (
        grads.keys() == expected_grads.keys()
        and sum(g is not None for g in grads.values()) == 2 * 2 * len(layers) + len(layers) + 2
    )  # lora_A, lora_B of "one" and "two" everywhere, lora_B.bias of "two", "three" once
    for name, grad in grads.items():
        if expected_grads[name] is None:
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    calls.clear()  # only "three" and the base: the other layers run their base layer alone, as PEFT does
    with torch.no_grad():
        two = ["__base__", "three"]
        torch.testing.assert_close(_mixed(fused, x[:2], two), _mixed(peft, x[:2], two))
    assert calls == [v for n, v in layers.items() if n.endswith(partial)]


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed but the targeted layer")
def test_fused_mixed_batches_fall_back_to_peft_where_they_cannot_fuse(monkeypatch):
    """PEFT's own mixed-batch forward runs, with PEFT's outputs, on a layer with a LoRA variant adapter (MiCA)
    in the batch, with lora_dropout active (a layer called in training mode), or whose base layer has
    forward hooks; LoRA Embedding layers are not touched. Adapters in float32 over a bfloat16 model (PEFT's
    autocast_adapter_dtype) fuse, cast to bfloat16."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed, self.fc1, self.fc2 = nn.Embedding(12, 10), nn.Linear(10, 16), nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc2(torch.relu(self.fc1(self.embed(ids))))

    config = LoraConfig(r=2, target_modules=["embed", "fc1", "fc2"], lora_dropout=0.5)
    peft = get_peft_model(Embedded(), config, adapter_name="plain")
    peft.add_adapter("mica", LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="mica"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft.eval()
    fused = copy.deepcopy(peft)
    assert interop.fuse_mixed_batches(fused) == ["base_model.model.fc1", "base_model.model.fc2"]
    fc1, fc2 = fused.base_model.model.fc1, fused.base_model.model.fc2
    ptr = {layer: layer.get_base_layer().weight.data_ptr() for layer in (fc1, fc2)}
    ids, calls = torch.randint(0, 12, (4, 5)), _indexed_calls(monkeypatch)
    variant, plain = ["plain", "mica", "__base__", "plain"], ["plain", "__base__", "plain", "__base__"]
    for names, fused_layers in ((variant, [fc2]), (plain, [fc1, fc2])):  # fc1 has the variant: PEFT's loop
        calls.clear()
        torch.testing.assert_close(_mixed(fused, ids, names), _mixed(peft, ids, names), rtol=1e-5, atol=1e-5)
        assert calls == [ptr[layer] for layer in fused_layers]

    hooked = []  # a hook on the base layer (accelerate's offloading is one) must run: PEFT's loop
    handle = fc2.get_base_layer().register_forward_pre_hook(lambda *_: hooked.append(1))
    calls.clear()
    torch.testing.assert_close(_mixed(fused, ids, plain), _mixed(peft, ids, plain), rtol=1e-5, atol=1e-5)
    assert calls == [ptr[fc1]] and hooked == [1]
    handle.remove()

    x, theirs, outputs = torch.randn(4, 10), peft.base_model.model.fc1, []
    for training in (True, False):  # lora_dropout is active in training only
        calls.clear()
        torch.manual_seed(3)
        expected = theirs.train(training)(x, adapter_names=plain)
        torch.manual_seed(3)
        outputs.append(fc1.train(training)(x, adapter_names=plain))
        torch.testing.assert_close(outputs[-1], expected, rtol=1e-5, atol=1e-5)
        assert calls == ([] if training else [ptr[fc1]])
    assert not torch.allclose(*outputs)  # the dropout dropped

    peft16 = get_peft_model(Mlp().to(torch.bfloat16), LoraConfig(r=4, target_modules=["fc1", "fc2"])).eval()
    assert peft16.base_model.model.fc1.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        for name, p in peft16.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fused16 = copy.deepcopy(peft16)
    interop.fuse_mixed_batches(fused16)
    x, names = torch.randn(4, 10, dtype=torch.bfloat16), ["default", "__base__", "default", "default"]
    calls.clear()
    out = _mixed(fused16, x, names)
    assert out.dtype == torch.bfloat16 and len(calls) == 2
    assert rel_err(out, _mixed(peft16, x, names)) < 1e-2  # bfloat16's rounding


# -------------------------------------------------------------------- PEFT layer replication -> stacks


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT on Llama
def test_lors_from_peft_makes_replicated_layers_stacks():
    """LoraConfig(layer_replication=[[0, 2], [1, 3]]) on a 4-layer Llama gives layers 0, 1, 1, 2 over shared
    base tensors, each with its own LoRA; lors_from_peft makes each replicated projection a stack (one
    SharedWeight, one private pair per copy): the outputs are PEFT's (modules_to_save included), with as
    many parameters."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_bias=True,  # biases on q, k, v, o: shared by the copies too
    )
    targets = ["q_proj", "v_proj", "down_proj"]
    peft = peft_model(
        LlamaForCausalLM(config),
        target_modules=targets,
        layer_replication=[[0, 2], [1, 3]],
        rank_pattern={"v_proj": 2},
        modules_to_save=["lm_head"],
    ).eval()
    with torch.no_grad():
        peft.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # a trained copy
    layers = peft.base_model.model.model.layers
    assert (
        len(layers) == 4
        and layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    )
    ids = torch.randint(0, 64, (2, 6))
    expected = peft(ids, use_cache=False).logits
    # each shared tensor once, and the lm_head once: PEFT keeps the original beside the trained copy
    count = sum(p.numel() for p in peft.parameters()) - peft.base_model.model.lm_head.original_module.weight.numel()
    peft.add_adapter("other", LoraConfig(target_modules=targets))
    peft.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"one adapter must be active, \['default', 'other'\] are"):
        interop.lors_from_peft(peft)
    peft.base_model.set_adapter("default")
    peft.delete_adapter("other")
    with pytest.raises(TypeError, match="must be a PEFT model of LoRA adapters, got LlamaForCausalLM"):
        interop.lors_from_peft(LlamaForCausalLM(config))
    with pytest.raises(ValueError, match=r"has \['model.embed_tokens \(Embedding\)'\], whose adapters would be lost"):
        interop.lors_from_peft(peft_model(LlamaForCausalLM(config), target_modules=["embed_tokens", "q_proj"]))

    model = interop.lors_from_peft(peft)
    assert isinstance(model, LlamaForCausalLM) and not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
    layers = model.model.layers
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
        copies = [layer.get_submodule(name) for layer in layers]
        assert all(isinstance(c, lk.LorsLinear) for c in copies)
        assert copies[1].shared is copies[2].shared and len({id(c.shared) for c in copies}) == 3, name
        assert copies[1].down is not copies[2].down and copies[1].rank == (2 if "v_proj" in name else 4)
    assert layers[1].self_attn.q_proj.bias is layers[2].self_attn.q_proj.bias
    assert layers[1].self_attn.k_proj.weight is layers[2].self_attn.k_proj.weight  # not adapted: PEFT's sharing
    assert sum(p.numel() for p in model.parameters()) == lk.count_parameters(model) == count
    assert len(lk.count_parameters(model).stacks) == 3 * 3
