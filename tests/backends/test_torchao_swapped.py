"""backends.torchao.lower on Hugging Face decoders converted from sq.quantize_: still the HF
model, generate() included; every torchao weight dequantizes to the converted codes."""

import warnings

import pytest
import torch
from hf_models import tiny_decoder, token_batch, train_decoder
from statqat_ao.backends import torchao
from statqat_ao.backends.parity import UnsupportedModelError

import statqat_ao as sq
from statqat_ao.quantizers.quantized_linear import QuantizedLinear

CASES = {
    "int4-g32": (sq.get_statqat_qconfig("int4", None, weight_granularity=32, skip=["lm_head"]), "Int4OpaqueTensor"),
    "w4a8-channel": (sq.get_statqat_qconfig("int4", "int8", skip=["lm_head"]), "Int4OpaqueTensor"),
    "int8-channel": (sq.get_statqat_qconfig("int8", None, skip=["lm_head"]), "Int8Tensor"),
    "nvfp4": (sq.get_statqat_qconfig("nvfp4", None, skip=["lm_head"]), "NVFP4Tensor"),
}


def converted(arch, qconfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = sq.quantize_(tiny_decoder(arch), qconfig).train()
    train_decoder(model)
    return sq.convert(model)


def torchao_dequantized(weight, dtype):
    if type(weight).__name__ == "Int4OpaqueTensor":  # no dequantize op: the kernel on an identity
        return torch.nn.functional.linear(torch.eye(weight.shape[1], dtype=dtype), weight).t()
    return weight.dequantize(dtype) if type(weight).__name__ == "NVFP4Tensor" else weight.dequantize()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_lowered_decoder_keeps_its_codes_and_generates(arch, case):
    qconfig, tensor_type = CASES[case]
    q = converted(arch, qconfig)
    ids, mask = token_batch(seed=2)
    lowered = torchao.lower(q, (ids,))
    assert type(lowered) is type(q)
    assert {w.tensor_type for w in lowered.lowered_weights} == {tensor_type}
    for name, layer in q.named_modules():
        if isinstance(layer, QuantizedLinear):
            got = torchao_dequantized(lowered.get_submodule(name).weight, layer.weight_quant.dtype)
            assert torch.equal(got, layer.weight_quant.dequantize()), name
    with torch.no_grad():
        ref, out = q(ids, attention_mask=mask).logits, lowered(ids, attention_mask=mask).logits
    # The kernels sum in another order than F.linear on the dequantized weight: float32 rounding only.
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    tokens = lowered.generate(ids[1:, :5], max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 10)
    if torch.equal(out, ref):
        assert torch.equal(tokens, q.generate(ids[1:, :5], max_new_tokens=5, do_sample=False))


def test_a_format_torchao_cannot_hold_is_refused_before_any_work():
    q = converted("llama", sq.get_statqat_qconfig("nf4", None, weight_granularity=32, skip=["lm_head"]))
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.self_attn.q_proj.weight_quant \(nf4, group 32\)"):
        torchao.lower(q)
