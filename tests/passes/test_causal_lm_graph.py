"""Graph-mode QAT (sq.prepare_qat_fx) on Hugging Face decoders as they come: no config edits,
called the way HF training loops call the model (keywords, labels=)."""

import warnings

import pytest
import torch
from hf_models import ARCHITECTURES, MORE_ARCHITECTURES, tiny_decoder, token_batch
from statqat_ao.backends import onnx as sq_onnx
from statqat_ao.backends import torchao
from torch.ao.quantization import disable_fake_quant
from transformers.pytorch_utils import Conv1D

import statqat_ao as sq
from statqat_ao.frontends.causal_lm import CausalLMGraph

W4A8 = sq.get_statqat_qconfig("int4", "int8", skip=["lm_head"])
WEIGHT_ONLY = sq.get_statqat_qconfig("int4", None, weight_granularity=32, skip=["lm_head"])


def prepared(arch, qconfig=W4A8):
    ids, mask = token_batch()
    model = tiny_decoder(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = sq.prepare_qat_fx(model, qconfig, (ids,), {"attention_mask": mask})
    float_warnings = [str(w.message) for w in caught if "stay float" in str(w.message)]
    return model, graph, float_warnings


def weight_layers(model):
    return [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, Conv1D) and n != "lm_head"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prepares_every_weight_layer_and_computes_the_float_model_with_quantization_off(arch):
    model, graph, float_warnings = prepared(arch)
    assert isinstance(graph, CausalLMGraph)
    quantizers = {n.removesuffix(".weight_fake_quant") for n, _ in graph.graph_module.named_modules() if n.endswith("weight_fake_quant")}
    assert quantizers == set(weight_layers(model))  # GPT-2's Conv1D weights included
    # Only the embeddings stay float, and the warning says so (GPT-2's wte is tied to lm_head).
    assert len(float_warnings) == 1 and float_warnings[0].count("(embedding)") == (2 if arch == "gpt2" else 1)
    ids, mask = token_batch(seed=2)
    graph.apply(disable_fake_quant)
    graph.eval()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=ids)
        got = graph(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trains_with_keywords_and_dynamic_shapes_then_converts_bit_identically(arch):
    _, graph, _ = prepared(arch)
    opt = torch.optim.SGD(graph.parameters(), lr=0.05)
    graph.train()
    losses = []
    for batch, seq in ((2, 16), (3, 12), (2, 16)):  # other batch and sequence sizes than traced
        ids, mask = token_batch(batch, seq, seed=batch)
        loss = graph(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    ids, mask = token_batch(seed=5)
    graph.eval()
    with torch.no_grad():
        expected = graph(ids, attention_mask=mask).logits
        assert torch.equal(graph(ids).logits, graph(ids, attention_mask=torch.ones_like(ids)).logits)  # mask omitted: ones
        converted = sq.convert(graph)
        assert isinstance(converted, CausalLMGraph) and torch.equal(converted(ids, attention_mask=mask).logits, expected)


@pytest.mark.slow  # suite budget: swapped decoders lower to torchao and ONNX in the fast suite (tests/backends)
def test_converted_decoder_graph_lowers_to_torchao_and_onnx(tmp_path):
    _, graph, _ = prepared("llama", WEIGHT_ONLY)
    ids, mask = token_batch()
    graph.train()
    graph(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    q = sq.convert(graph)
    lowered = torchao.lower(q, (ids,))
    assert {w.tensor_type for w in lowered.lowered_weights} == {"Int4OpaqueTensor"}
    assert len(lowered.lowered_weights) == len(weight_layers(tiny_decoder("llama")))
    with torch.no_grad():
        ref = q(ids).logits
        assert (lowered(ids).logits - ref).abs().max() <= 1e-5 * ref.abs().max()
    report = sq_onnx.export(q, (ids,), tmp_path / "decoder.onnx")
    assert report.max_error <= 1e-5


def test_what_the_graph_cannot_take_is_named():
    _, graph, _ = prepared("llama", WEIGHT_ONLY)
    ids, _ = token_batch()
    with pytest.raises(TypeError, match=r"takes input_ids, attention_mask and labels; got \['position_ids'\]"):
        graph(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])
    with pytest.raises(ValueError, match="drop use_cache=True"):
        sq.prepare_qat_fx(tiny_decoder("llama"), WEIGHT_ONLY, (ids,), {"use_cache": True})
    with pytest.raises(sq.TraceError, match=r"pass example_inputs=\(input_ids,\)"):
        sq.prepare_qat_fx(tiny_decoder("llama"), WEIGHT_ONLY)


@pytest.mark.parametrize("arch", MORE_ARCHITECTURES)
def test_more_decoders_prepare_train_and_convert(arch):
    """Phi-3's rotary embedding cats an empty slice: before, its shared quantizer kept a scale
    of 1.0 and q and k trained rounded to integers, silently; empty operands get no quantizer."""
    model, graph, _ = prepared(arch)
    ids, mask = token_batch()
    graph.train()
    graph(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for name, m in graph.named_modules():
        if isinstance(m, sq.FakeQuantizer) and m.scale.numel() == 1:
            assert m.scale.item() != 1.0, name
    graph.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(graph)(ids, attention_mask=mask).logits, graph(ids, attention_mask=mask).logits)
