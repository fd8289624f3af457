"""hf.py: a converted checkpoint loads through transformers' own from_pretrained (the "lors" quantization
method), in this process and in a fresh one, whichever of lors_kernels and transformers comes first."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TARGETS, random_pairs, tiny_bert

import lors_kernels as lk
from lors_kernels import hf
from lors_kernels.convert import lors_structure, lorsify

os.environ["HF_HUB_OFFLINE"] = "1"  # models are built from configs: nothing may be downloaded


@pytest.fixture
def converted(tmp_path):
    """A converted tiny BERT saved by save_pretrained, its input ids and outputs."""
    pytest.importorskip("transformers")
    model = tiny_bert()
    lorsify(model, TARGETS, rank=4)
    random_pairs(model)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    return tmp_path, ids, model(ids).last_hidden_state.detach(), lors_structure(model)


def _stacks_of(model):
    layers = [model.encoder.layer[i].intermediate.dense for i in range(3)]
    return all(isinstance(l, lk.LorsLinear) and l.shared is layers[0].shared for l in layers)


def test_config_json_marks_the_checkpoint(converted):
    path, _, _, structure = converted
    entry = json.loads((path / "config.json").read_text())["quantization_config"]
    assert entry == {"quant_method": "lors", "structure": structure}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_auto_model_from_pretrained_rebuilds_the_stacks(converted, dtype):
    from transformers import AutoModel, AutoModelForSequenceClassification, BertModel

    path, ids, expected, _ = converted
    tolerance = {} if dtype == torch.float32 else dict(rtol=0.1, atol=0.1)
    for load in (AutoModel, BertModel):
        model = load.from_pretrained(path, dtype=dtype, device_map=None)
        assert _stacks_of(model) and model.encoder.layer[0].intermediate.dense.shared.weight.dtype == dtype
        torch.testing.assert_close(model(ids).last_hidden_state.float(), expected, **tolerance)
    # a head model over the saved base model: the stacks land under its base_model_prefix ("bert.")
    classifier = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    assert _stacks_of(classifier.bert)
    torch.testing.assert_close(classifier.bert(ids).last_hidden_state.float(), expected, **tolerance)


def test_a_loaded_model_saves_loads_and_goes_dense(converted, tmp_path_factory):
    from transformers import AutoModel

    path, ids, expected, _ = converted
    model = AutoModel.from_pretrained(path)
    again = tmp_path_factory.mktemp("again")
    model.save_pretrained(again)
    torch.testing.assert_close(AutoModel.from_pretrained(again)(ids).last_hidden_state, expected)
    dense = model.dequantize()  # transformers' way back, which is lk.to_dense
    assert not any(isinstance(m, lk.LorsLinear) for m in dense.modules()) and not dense.is_quantized
    assert hf.structure_of(dense.config) is None
    torch.testing.assert_close(dense(ids).last_hidden_state, expected)


@pytest.mark.parametrize("first", ["lors_kernels", "transformers"])
def test_a_fresh_process_loads_it_once_lors_kernels_is_imported(converted, first, tmp_path_factory):
    path, ids, expected, _ = converted
    out = tmp_path_factory.mktemp("fresh") / "out.pt"
    imports = ["import lors_kernels", "from transformers import AutoModel"]
    script = "\n".join(
        [
            "import os, torch",
            "os.environ['HF_HUB_OFFLINE'] = '1'",
            *(imports if first == "lors_kernels" else imports[::-1]),
            f"model = AutoModel.from_pretrained({str(path)!r})",
            f"torch.save(model(torch.load({str(path / 'ids.pt')!r})).last_hidden_state.detach(), {str(out)!r})",
        ]
    )
    torch.save(ids, path / "ids.pt")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    torch.testing.assert_close(torch.load(out), expected)


def test_lorsify_through_a_wrapper_records_names_relative_to_the_model_that_saves(tmp_path):
    """A wrapper showing its inner model's config (as a SentenceTransformer does): the structure names the
    layers as the inner model's save_pretrained names its weights."""
    pytest.importorskip("transformers")
    from transformers import AutoModel

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_bert()

        @property
        def config(self):
            return self.inner.config

        def forward(self, ids):
            return self.inner(ids).last_hidden_state

    wrapper = Wrapper()
    lorsify(wrapper, [f"inner.{t}" for t in TARGETS], rank=4)
    random_pairs(wrapper)
    assert hf.structure_of(wrapper.config) == lors_structure(wrapper.inner)
    ids = torch.randint(0, 64, (2, 10))
    wrapper.inner.save_pretrained(tmp_path)
    torch.testing.assert_close(AutoModel.from_pretrained(tmp_path)(ids).last_hidden_state, wrapper(ids))
