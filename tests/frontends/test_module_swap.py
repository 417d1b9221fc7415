"""sq.quantize_ on Hugging Face decoders as they come: the model stays the model.

Tiny random-init Llama, Qwen2 and GPT-2 (whose weight layers are transformers' Conv1D),
called the way HF training loops call them (keywords, ``labels=``), then ``sq.convert``
and ``generate()``.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_models import (
    ARCHITECTURES,
    MORE_ARCHITECTURES,
    VOCAB,
    tiny_decoder,
    token_batch,
    train_decoder,
)
from transformers.pytorch_utils import Conv1D

import statqat_ao as sq
from statqat_ao.frontends.qat_linear import is_qat_linear
from statqat_ao.quantizers.nonfinite import NonFiniteError
from statqat_ao.quantizers.quantized_linear import QuantizedLinear

WEIGHT_ONLY = sq.get_statqat_qconfig("fp4_e2m1", None, weight_granularity=32, skip=["lm_head"])
W4A8 = sq.get_statqat_qconfig("int4", "int8", skip=["lm_head"])


def quantize_quietly(model, qconfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sq.quantize_(model, qconfig)


def weight_layers(model):
    return [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, Conv1D) and n != "lm_head"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantize_swaps_every_weight_layer_and_keeps_the_model(arch):
    model = tiny_decoder(arch)
    cls, params, layers = type(model), dict(model.named_parameters()), weight_layers(model)
    with pytest.warns(UserWarning, match=r"stay float: .*Embedding.*lm_head \(Linear, skipped by the qconfig\)"):
        assert sq.quantize_(model, WEIGHT_ONLY) is model
    assert type(model) is cls
    assert [n for n, m in model.named_modules() if is_qat_linear(m)] == layers
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters: ties and optimizers hold
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    for name in layers:  # the swap-time scale is the offline estimator's on the [out, in] weight
        layer = model.get_submodule(name)
        w = layer.weight_out_in()
        s, _ = sq.estimate_qparams(w, "fp4_e2m1", "auto", granularity=32)
        assert w.shape == (layer.out_features, layer.in_features)
        assert torch.equal(layer.weight_fake_quant.scale, s), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("qconfig", [WEIGHT_ONLY, W4A8], ids=["fp4-g32-weight-only", "w4a8"])
def test_trains_with_keywords_then_converts_bit_identically_and_generates(arch, qconfig):
    model = quantize_quietly(tiny_decoder(arch), qconfig)
    first = next(m for m in model.modules() if is_qat_linear(m))
    scale0 = first.weight_fake_quant.scale.clone()
    losses = train_decoder(model, steps=3)
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(first.weight_fake_quant.scale, scale0)  # scales followed the weights

    ids, mask = token_batch(seed=2)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        converted = sq.convert(model)
        got = converted(input_ids=ids, attention_mask=mask).logits
    assert type(converted) is type(model) and not converted.training
    assert torch.equal(got, expected)
    layers = [m for m in converted.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(weight_layers(tiny_decoder(arch))) and not any(hasattr(m, "weight") for m in layers)

    prompt = ids[1:, :5]
    qat_tokens = model.generate(prompt, max_new_tokens=6, do_sample=False)
    converted_tokens = converted.generate(prompt, max_new_tokens=6, do_sample=False)
    assert qat_tokens.shape == (1, 11) and torch.equal(qat_tokens, converted_tokens)


def test_a_qat_linear_computes_the_fake_quantized_linear():
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    qat = sq.quantize_(torch.nn.Sequential(layer), W4A8)[0].eval()
    fq_w, fq_x = qat.weight_fake_quant, qat.input_fake_quant
    qat(x)  # the input quantizer's first estimate
    w_hat = sq.fake_quantize(layer.weight, fq_w.scale, fq_w.zero_point, "int4")
    x_hat = sq.fake_quantize(x, fq_x.scale, fq_x.zero_point, "int8")
    assert torch.equal(qat(x), F.linear(x_hat, w_hat, layer.bias))


@pytest.mark.parametrize("method", ["analytic", "iterative", "minmax", "octav", "lsq"])
def test_every_weight_method_trains_and_converts(method):
    qconfig = sq.get_statqat_qconfig("int4", None, weight_method=method, weight_granularity=32, skip=["lm_head"])
    model = quantize_quietly(tiny_decoder("llama"), qconfig)
    train_decoder(model, steps=2)
    ids, mask = token_batch(seed=2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(model)(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_torchao_quantize_with_qat_config_matches_sq_quantize():
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    config = sq.StatQATConfig(weight="fp4_e2m1", weight_granularity=32, activation=None)
    ours = quantize_quietly(tiny_decoder("llama"), WEIGHT_ONLY)
    theirs = tiny_decoder("llama")
    not_head = lambda m, name: isinstance(m, torch.nn.Linear) and name != "lm_head"  # noqa: E731
    quantize_(theirs, QATConfig(config, step="prepare"), filter_fn=not_head)
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "QATLinear"
    train_decoder(ours, steps=2)
    train_decoder(theirs, steps=2)
    quantize_(theirs, QATConfig(config, step="convert"), filter_fn=not_head)
    ours = sq.convert(ours)
    for name, layer in theirs.named_modules():
        if isinstance(layer, QuantizedLinear):
            mine = ours.get_submodule(name).weight_quant
            assert torch.equal(layer.weight_quant.codes, mine.codes) and torch.equal(layer.weight_quant.scale, mine.scale)
    ids, mask = token_batch(seed=2)
    assert torch.equal(theirs.eval()(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)


def test_torchao_qat_config_without_statqat_still_reaches_torchao():
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    sq.StatQATConfig  # registers our handlers  # noqa: B018
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
    assert type(model[0]).__name__ == "FakeQuantizedLinear"


# Suite budget: both decoders are in make test-slow; tests/frontends/test_output_aware.py
# compiles swapped QAT linears (output-aware) with fullgraph=True in the fast suite.
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_training_forward_has_no_graph_breaks(arch):
    torch._dynamo.reset()
    model = quantize_quietly(tiny_decoder(arch), W4A8).train()
    ids, mask = token_batch()
    eager = model(input_ids=ids, attention_mask=mask, labels=ids).loss  # the first (initialising) forward
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    loss = compiled(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - eager.item()) < 1e-2


def test_compiling_straight_after_quantize_traces_the_training_step_once():
    # Weight-only INT4 (the LLM recipe): the output-aware weight quantizers' input moments
    # are shaped at the swap, so the first steps do not change a buffer's shape (a re-trace).
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = quantize_quietly(tiny_decoder("llama"), sq.get_statqat_qconfig("int4", activation=None, weight_granularity=32))
    counter = CompileCounter()
    step = torch.compile(model.train(), backend=counter, fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask = token_batch()
    for _ in range(3):
        loss = step(input_ids=ids, attention_mask=mask, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert counter.frame_count == 1


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    qconfig = sq.get_statqat_qconfig("int4", "int8", weight_method="iterative", weight_granularity=32, skip=["lm_head"])
    a = quantize_quietly(tiny_decoder("llama"), qconfig)
    train_decoder(a, steps=2)
    torch.save(a.state_dict(), tmp_path / "qat.pt")
    b = quantize_quietly(tiny_decoder("llama", seed=5), qconfig)
    b.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    assert train_decoder(a, steps=1, seed=3) == train_decoder(b, steps=1, seed=3)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_save_pretrained_round_trip_with_load_qat_state(tmp_path):
    from transformers import LlamaForCausalLM

    model = quantize_quietly(tiny_decoder("llama"), W4A8)
    train_decoder(model, steps=2)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    loaded = sq.load_qat_state(quantize_quietly(loaded, W4A8), tmp_path)
    ids, mask = token_batch(seed=2)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids, attention_mask=mask).logits, model.eval()(ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="no state for .* quantizer tensors"):
        sq.load_qat_state(quantize_quietly(tiny_decoder("llama"), WEIGHT_ONLY.skip("model.layers.1.*")), {})


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="found no linear layer to quantize in Embedding"):
        sq.quantize_(torch.nn.Embedding(VOCAB, 8), W4A8)
    model = quantize_quietly(tiny_decoder("llama"), WEIGHT_ONLY).train()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    ids, mask = token_batch()
    with pytest.raises(NonFiniteError, match=r"'model.layers.1.mlp.down_proj.weight_fake_quant' saw 1 NaN"):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    with pytest.raises(sq.ConvertError, match="never saw data"):
        sq.convert(quantize_quietly(tiny_decoder("llama"), W4A8))


def test_example_inputs_start_activation_scales_at_quantize_time():
    ids, mask = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = sq.quantize_(tiny_decoder("llama"), W4A8, example_kwargs={"input_ids": ids, "attention_mask": mask})
    inputs = [m.input_fake_quant for m in model.modules() if is_qat_linear(m)]
    assert all(q.is_initialized and int(q.updates) == 0 for q in inputs)
    later = quantize_quietly(tiny_decoder("llama"), W4A8)
    with torch.no_grad():  # the same estimate as a first forward on that batch would make
        later.eval()(input_ids=ids, attention_mask=mask)
    for a, b in zip(inputs, [m.input_fake_quant for m in later.modules() if is_qat_linear(m)], strict=True):
        assert torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("arch", MORE_ARCHITECTURES)
def test_more_decoders_swap_train_and_convert(arch):
    model = quantize_quietly(tiny_decoder(arch), W4A8)
    assert [n for n, m in model.named_modules() if is_qat_linear(m)] == weight_layers(tiny_decoder(arch))
    train_decoder(model, steps=1)
    ids, mask = token_batch(seed=2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(model)(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
