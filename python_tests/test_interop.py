"""interop.py: a converted model in the tools around it: safetensors / save_pretrained round trips, PEFT
(against PEFT's own models)."""

import copy
import json
import os
import warnings

import pytest
import torch
from helpers import TARGETS, Mlp, Stacked, peft_model, random_pairs, tiny_bert
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
