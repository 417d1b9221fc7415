"""Per-token (dynamic) activation quantization in the eager front end: every row of every
input gets its own scale, in training and after convert and lowering alike."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_models import tiny_decoder, token_batch, train_decoder
from statqat_ao.backends import onnx as sq_onnx
from statqat_ao.backends import torchao
from statqat_ao.backends.parity import UnsupportedModelError

import statqat_ao as sq
from statqat_ao.quantizers.dynamic import DynamicQuantizer

W4_A8_TOKEN = sq.get_statqat_qconfig(  # the weight's own error: a weight scale that stays put between forwards
    "int4", "int8", weight_granularity=32, activation_granularity="token", activation_method="minmax",
    weight_error="weight", skip=["lm_head"],
)  # fmt: skip


def quantized(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sq.quantize_(model, W4_A8_TOKEN)


def test_each_token_gets_its_own_minmax_scale():
    layer = quantized(torch.nn.Sequential(torch.nn.Linear(64, 32)))[0]
    x = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 10  # rows of very different ranges
    s = x.abs().amax(-1, keepdim=True) / 127.5  # torch's MinMax convention for symmetric int8
    x_hat = torch.clamp(torch.round(x / s), -128, 127) * s
    w = layer.weight_fake_quant
    w_hat = sq.fake_quantize(layer.weight, w.scale, w.zero_point, "int4")
    for mode in (layer.train, layer.eval):  # no state: the same in training and eval
        mode()
        torch.testing.assert_close(layer(x), F.linear(x_hat, w_hat, layer.bias), rtol=0, atol=1e-5)


def test_a_decoder_trains_converts_bit_identically_and_lowers():
    model = quantized(tiny_decoder("llama"))
    assert all(torch.isfinite(torch.tensor(train_decoder(model))))
    ids, mask = token_batch()
    model.eval()
    with torch.no_grad():
        q = sq.convert(model)
        assert torch.equal(q(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # end to end, a token's code may flip at a tie
        lowered = torchao.lower(q, (ids,))
    assert lowered.generate(ids[1:, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
    with pytest.raises(UnsupportedModelError, match="per-token"):
        sq_onnx.export(q, (ids,), "never.onnx")


def test_compiled_training_forward_has_no_graph_break():
    torch._dynamo.reset()
    model = quantized(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))).train()
    x = torch.randn(4, 10, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    torch.testing.assert_close(compiled(x), model(x))


def test_per_token_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="per-token quantization is for activations"):
        sq.QuantSpec("int4", granularity="token").make(is_activation=False)
    with pytest.raises(ValueError, match="eager front end only: use sq.quantize_"):
        sq.prepare_qat_fx(torch.nn.Sequential(torch.nn.Linear(64, 8)), W4_A8_TOKEN, (torch.randn(2, 64),))
    with pytest.raises(ValueError, match="per-token quantization takes a per-tensor format"):
        DynamicQuantizer("nvfp4")
