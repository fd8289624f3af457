"""convert/structure.py: the way back to a dense model (to_dense)."""

import os

import pytest
import torch
from helpers import TARGETS, Stacked, random_pairs, tiny_bert
from torch import nn

import lors_kernels as lk
from lors_kernels.convert import lorsify

os.environ["HF_HUB_OFFLINE"] = "1"  # models are built from configs: nothing may be downloaded


def test_to_dense_computes_what_the_stacks_computed():
    """Every LorsLinear (aliases, a merged layer) becomes the nn.Linear applying its effective weight."""
    torch.manual_seed(0)
    model = random_pairs(Stacked()).double().train()
    model.blocks[2].merge_lora(torch.randn(1, 8).double(), torch.randn(8, 1).double(), 0.5)
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = model(x)
    assert lk.to_dense(model) is model
    assert not any(isinstance(m, lk.LorsLinear) for m in model.modules())
    assert type(model.blocks[0]) is nn.Linear and model.alias is model.heads[1] and model.blocks[0].training
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_to_dense_hugging_face_model_saves_and_loads_as_its_dense_architecture(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModel

    model = tiny_bert()
    lorsify(model, TARGETS, rank=4)
    random_pairs(model)
    ids = torch.randint(0, 64, (2, 10))
    expected = model(ids).last_hidden_state
    lk.to_dense(model)
    assert getattr(model.config, "lors", None) is None
    model.save_pretrained(tmp_path)
    assert "lors" not in (tmp_path / "config.json").read_text()
    loaded = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(ids).last_hidden_state, expected)
