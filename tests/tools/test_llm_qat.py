"""The shared QAT-run helper of the LLM benchmark and demo, on a tiny Llama."""

import copy
import math

import pytest
import torch

import statqat_ao as sq
from statqat_ao.models import TextSplit, perplexity
from statqat_ao.tools.llm_qat import (
    LLMQATSettings,
    calibration_batches,
    gap_recovered,
    parameter_groups,
    qat_run,
    statqat_recipe,
)
from tests.hf_models import CONFIGS, VOCAB


def _split():
    g = torch.Generator().manual_seed(0)
    return TextSplit(train=torch.randint(0, VOCAB, (4000,), generator=g), held_out=torch.randint(0, VOCAB, (4, 32), generator=g))


def test_gap_recovered():
    assert gap_recovered(10.0, 20.0, 10.0) == 1.0
    assert gap_recovered(10.0, 20.0, 20.0) == 0.0
    assert gap_recovered(10.0, 20.0, 25.0) == -0.5  # QAT worse than PTQ MinMax
    assert math.isnan(gap_recovered(10.0, 10.0, 9.0))  # no gap to recover


def test_lsq_scales_get_their_own_learning_rate_and_the_embedding_is_frozen():
    torch.manual_seed(0)
    model = CONFIGS["llama"]()
    sq.quantize_(model, sq.get_statqat_qconfig("int4", None, weight_method="lsq", skip=["lm_head"]))
    groups = parameter_groups(model, LLMQATSettings(lr=1e-5, scale_lr=1e-3))
    assert [g["lr"] for g in groups] == [1e-5, 1e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("fake_quant.scale") for p in groups[1]["params"])
    assert len(groups[1]["params"]) == 14  # 7 Linear layers x 2 decoder layers
    embedding = model.get_input_embeddings().weight
    assert all(p is not embedding for g in groups for p in g["params"])


def test_a_run_measures_ptq_then_trains_and_converts_bit_identically():
    torch.manual_seed(0)
    model = CONFIGS["llama"]()
    before = {n: p.clone() for n, p in model.named_parameters()}
    qc = sq.get_statqat_qconfig("nvfp4", None, skip=["lm_head"])
    run = qat_run(model, _split(), statqat_recipe(qc), LLMQATSettings(steps=3, batch=2, window=32, lr=1e-3, eval_windows=4), progress=False)
    assert len(run.losses) == 3 and run.step_seconds > 0
    assert run.bit_identical
    assert run.ptq_perplexity != run.qat_perplexity  # training changed the model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the float model is untouched
    settings = LLMQATSettings(steps=3, batch=2, window=32, lr=1e-3, eval_windows=4)
    fresh = sq.quantize_(copy.deepcopy(model), qc)  # PTQ: the prepared model, calibrated (output-aware), before training
    sq.calibrate(fresh, calibration_batches(_split(), settings))
    assert run.ptq_perplexity == pytest.approx(perplexity(fresh, _split().held_out), rel=1e-6)
