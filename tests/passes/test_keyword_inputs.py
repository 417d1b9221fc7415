"""Graphs traced by torch.export, called by keyword as training loops call models."""

import pytest
import torch
from torch import nn

import statqat_ao as sq


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, pixel_values, labels=None):
        logits = self.fc(pixel_values)
        return logits if labels is None else (nn.functional.cross_entropy(logits, labels), logits)


def test_keywords_naming_graph_inputs_are_bound_and_others_are_refused_by_name():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    qat = sq.prepare_qat_fx(_Classifier(), sq.statqat_qconfig, (x,), trace_method="export").eval()
    torch.testing.assert_close(qat(pixel_values=x), qat(x), rtol=0, atol=0)
    torch.testing.assert_close(qat(pixel_values=x, labels=None), qat(x), rtol=0, atol=0)  # the model's default
    with pytest.raises(TypeError, match=r"takes \(pixel_values\); got \['labels'\].*cross_entropy"):
        qat(pixel_values=x, labels=torch.zeros(8, dtype=torch.long))


def test_a_graph_traced_with_labels_takes_them_by_keyword_on_every_call():
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.arange(8) % 4
    qat = sq.prepare_qat_fx(_Classifier(), sq.statqat_qconfig, (x,), {"labels": y}, trace_method="export").eval()
    other = (y + 1) % 4
    loss, logits = qat(pixel_values=x, labels=other)  # HF's model(**batch)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, other))
    with pytest.raises(TypeError, match=r"traced with \['labels'\].*every call"):
        qat(pixel_values=x)


def test_a_hugging_face_image_classifier_trains_with_keyword_calls():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)  # fmt: skip
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    qat = sq.prepare_qat_fx(ViTForImageClassification(config).train(), sq.statqat_qconfig, (x,), {"labels": y})
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for _ in range(2):
        out = qat(pixel_values=x, labels=y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    qat.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(qat)(pixel_values=x, labels=y).logits, qat(pixel_values=x, labels=y).logits)
