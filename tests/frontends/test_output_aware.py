"""Output-aware weight error and ``sq.calibrate`` through every front end that passes the layer input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, load_digits_split
from tests.hf_models import ARCHITECTURES, tiny_decoder, token_batch, train_decoder

OUTPUT_AWARE = sq.get_statqat_qconfig(
    "fp4_e2m1", None, weight_granularity=32, weight_method="search", weight_error="output", skip=["lm_head"]
)


def input_second_moments(model: nn.Module, layer: str, batches, feature_dim: int = -1) -> torch.Tensor:
    """E[x_j^2] of ``layer``'s input over ``batches``, read by a forward hook (independent of statqat)."""
    rows, total = 0, None
    module = model.get_submodule(layer)

    def hook(_, args):
        nonlocal rows, total
        x = args[0].detach().float().movedim(feature_dim, -1).reshape(-1, args[0].shape[feature_dim])
        rows += x.shape[0]
        s = (x * x).sum(dim=0)
        total = s if total is None else total + s

    handle = module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    handle.remove()
    return total / rows


def calibration_batches(n: int = 3):
    return [{"input_ids": token_batch(seed=10 + i)[0]} for i in range(n)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_calibrating_a_swapped_decoder_collects_its_layer_inputs_and_converts_exactly(arch):
    float_model = tiny_decoder(arch).eval()
    model = sq.quantize_(tiny_decoder(arch), OUTPUT_AWARE)
    batches = calibration_batches()
    first = "model.layers.0.self_attn.q_proj" if arch != "gpt2" else "transformer.h.0.attn.c_attn"
    want = input_second_moments(float_model, first, batches)  # the first layer's input is float
    sq.calibrate(model, batches)
    fq = model.get_submodule(first).weight_fake_quant
    torch.testing.assert_close(fq.input_moments, want, rtol=1e-5, atol=1e-7)
    assert fq.input_count.item() == sum(b["input_ids"].numel() for b in batches)
    # The scale is the full estimator's, weighted by those moments.
    w = model.get_submodule(first).weight_out_in().detach()
    s, _ = sq.estimate_qparams(w, "fp4_e2m1", "search", 32, weights=fq.input_moments)
    torch.testing.assert_close(fq.scale, s, rtol=1e-6, atol=0)
    assert not model.training
    ids = token_batch(seed=3)[0]
    converted = sq.convert(model)
    assert torch.equal(converted(input_ids=ids).logits, model(input_ids=ids).logits)


def test_output_aware_qat_trains_and_converts_bit_identically():
    model = sq.quantize_(tiny_decoder("llama"), OUTPUT_AWARE)
    sq.calibrate(model, calibration_batches())
    before = model.model.layers[0].mlp.down_proj.weight_fake_quant.input_moments.clone()
    losses = train_decoder(model, steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = model.model.layers[0].mlp.down_proj.weight_fake_quant.input_moments
    assert not torch.equal(before, after)  # training forwards keep updating the moments
    ids = token_batch(seed=4)[0]
    model.eval()
    assert torch.equal(sq.convert(model)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_graph_mode_cnn_feeds_conv_inputs_per_channel():
    torch.manual_seed(0)
    x, _, _, _ = load_digits_split()
    batches = [x[i : i + 64] for i in range(0, 192, 64)]
    float_model = DigitsCNN(width=8).eval()
    qc = sq.get_statqat_qconfig("int4", None, weight_method="search", weight_error="output")
    prepared = sq.prepare_qat_fx(float_model, qc, (batches[0],))
    sq.calibrate(prepared, batches)
    stem = [m for n, m in prepared.named_modules() if n.endswith("weight_fake_quant")][0]
    want = input_second_moments(float_model, "stem", batches, feature_dim=1)
    torch.testing.assert_close(stem.input_moments, want, rtol=1e-5, atol=1e-8)
    assert torch.equal(sq.convert(prepared)(batches[0]), prepared(batches[0]))


def test_graph_mode_decoder_calibrates_and_converts():
    ids, mask = token_batch()
    prepared = sq.prepare_qat_fx(tiny_decoder("llama"), OUTPUT_AWARE, (ids,), {"attention_mask": mask})
    sq.calibrate(prepared, calibration_batches(2))
    aware = [m for m in prepared.modules() if isinstance(m, sq.FakeQuantizer) and m.output_aware]
    assert aware and all(m.has_input_moments for m in aware)
    assert torch.equal(sq.convert(prepared)(input_ids=ids).logits, prepared(input_ids=ids).logits)


def test_the_compiled_training_step_has_no_graph_break():
    model = sq.quantize_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), OUTPUT_AWARE).train()
    x = torch.randn(16, 64)
    model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    assert model[0].weight_fake_quant.input_count.item() == 32


def test_moments_survive_a_state_dict_round_trip():
    qc = OUTPUT_AWARE
    model = sq.quantize_(nn.Sequential(nn.Linear(64, 64)), qc).train()
    model(torch.randn(8, 64) * 3)
    fresh = sq.load_qat_state(sq.quantize_(nn.Sequential(nn.Linear(64, 64)), qc), model.state_dict())
    for name in ("input_moments", "input_count", "scale"):
        assert torch.equal(getattr(fresh[0].weight_fake_quant, name), getattr(model[0].weight_fake_quant, name))


def test_auto_error_is_silent_where_no_input_arrives_and_output_warns():
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    for error, warns in (("auto", False), ("output", True)):
        model = nn.Sequential(nn.Linear(64, 32)).train()  # torch.ao's prepare swaps its modules in place
        qc = sq.get_statqat_qconfig("fp4_e2m1", None, weight_granularity=32, weight_method="search", weight_error=error)
        prepared = prepare_qat_fx(model, qc, (torch.randn(2, 64),))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared(torch.randn(4, 64))
            prepared(torch.randn(4, 64))
        said = [str(w.message) for w in caught if "error='output'" in str(w.message)]
        assert bool(said) == warns, said
        if warns:
            assert "weight_fake_quant" in said[0] or "quantizer" in said[0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="error='output' needs a method"):
        sq.get_statqat_qconfig("int4", None, weight_method="minmax", weight_error="output")
    with pytest.raises(ValueError, match="error must be one of"):
        sq.QuantSpec("int4", error="outputs")
    with pytest.raises(ValueError, match="for weight quantizers"):
        sq.get_statqat_qconfig("int4", "int8").override("x", activation={"error": "output"})
    with pytest.raises(ValueError, match="no StatQAT quantizer"):
        sq.calibrate(nn.Linear(2, 2), [torch.randn(1, 2)])
    with pytest.raises(ValueError, match="no batches"):
        sq.calibrate(sq.quantize_(nn.Sequential(nn.Linear(64, 8)), OUTPUT_AWARE), [])
