"""Distillation: a converted student trained toward its dense teacher's outputs."""

import copy

import pytest
import torch
from helpers import TARGETS, tiny_bert
from torch import nn

from lors_kernels.convert import distill, lorsify


def test_distill_reduces_the_output_error():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher).train()
    lorsify(student, TARGETS, rank=2)
    calibration = [
        {"input_ids": torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
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
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
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
