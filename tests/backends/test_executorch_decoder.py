"""backends.executorch.export on Hugging Face decoders prepared in graph mode: the logits
program (static shapes) runs in executorch.runtime within tolerance of the converted graph.

In make test-slow (15 s each): the fast suite's ExecuTorch tests cover the same rewrite on
the small CNN and transformer block."""

import warnings

import pytest
import torch
from hf_models import tiny_decoder, token_batch
from statqat_ao.backends import executorch
from statqat_ao.backends.parity import UnsupportedModelError

import statqat_ao as sq

CASES = {
    "8da4w": (sq.get_statqat_qconfig("int4", None, weight_granularity=32, skip=["lm_head"]), "dynamic_int8"),
    "w8a8": (sq.get_statqat_qconfig("int8", "int8", skip=["lm_head"]), None),
}


@pytest.mark.parametrize(
    ("arch", "case"),
    [pytest.param(arch, case, marks=pytest.mark.slow) for arch, case in [("llama", "8da4w"), ("gpt2", "8da4w"), ("llama", "w8a8")]],
)
def test_decoder_graph_exports_and_runs_in_executorch(arch, case, tmp_path):
    qconfig, activations = CASES[case]
    ids, _ = token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = sq.prepare_qat_fx(tiny_decoder(arch), qconfig, (ids,))
    graph.train()
    graph(input_ids=ids, labels=ids).loss.backward()
    q = sq.convert(graph)
    prompt = ids[:1]
    report = executorch.export(q, (prompt,), tmp_path / "decoder.pte", activations=activations)
    (logits,) = executorch.run(tmp_path / "decoder.pte", (prompt,))
    with torch.no_grad():
        ref = q(prompt).logits
    err = float((logits - ref).abs().max() / ref.abs().max())
    # 8da4w quantizes activations per token at run time, which the converted (weight-only)
    # model does not: the backend's dynamic tolerance; static W8A8 runs the converted codes.
    assert err == pytest.approx(report.max_error, abs=1e-7)
    assert err <= (executorch.DYNAMIC_TOLERANCE if activations else 1e-5)


def test_a_swapped_decoder_is_refused_with_the_way_out():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = sq.quantize_(tiny_decoder("llama"), CASES["8da4w"][0])
    ids, _ = token_batch()
    model(ids)
    with pytest.raises(UnsupportedModelError, match=r"prepare it with sq.prepare_qat_fx.*or export it with statqat_ao.backends.onnx"):
        executorch.export(sq.convert(model), (ids[:1],), "never.pte", activations="dynamic_int8")
