"""backends.onnx.export on Hugging Face decoders converted from sq.quantize_: the logits graph
(no KV cache), weights stored as codes, run in onnxruntime against the converted model."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from hf_models import tiny_decoder, token_batch
from statqat_ao.backends import onnx as sq_onnx

import statqat_ao as sq

CASES = {
    "int4-g32": sq.get_statqat_qconfig("int4", None, weight_granularity=32, skip=["lm_head"]),
    "w8a8": sq.get_statqat_qconfig("int8", "int8", skip=["lm_head"]),
}


def converted(arch, qconfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = sq.quantize_(tiny_decoder(arch), qconfig).train()
    ids, mask = token_batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    return sq.convert(model)


@pytest.mark.parametrize(
    ("arch", "case"),
    [("llama", "int4-g32"), pytest.param("llama", "w8a8", marks=pytest.mark.slow), pytest.param("gpt2", "int4-g32", marks=pytest.mark.slow), pytest.param("gpt2", "w8a8", marks=pytest.mark.slow)],
)
def test_decoder_logits_graph_runs_in_onnxruntime(arch, case, tmp_path):
    q = converted(arch, CASES[case])
    ids, _ = token_batch(seed=2)
    report = sq_onnx.export(q, (ids,), tmp_path / "decoder.onnx")
    proto = onnx.load(tmp_path / "decoder.onnx")
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    layers = sum(1 for m in q.modules() if type(m).__name__ == "QuantizedLinear")
    assert len(dq) >= layers  # every weight stored as codes, dequantized in the graph
    if case == "int4-g32":  # 4-bit groups as DequantizeLinear(block_size=32) -> MatMul: MatMulNBits-fusable
        blocked = [n for n in dq if any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
        consumers = {i for n in proto.graph.node if n.op_type == "MatMul" for i in n.input}
        assert len(blocked) == layers and all(n.output[0] in consumers for n in blocked)
    session = sq_onnx.ort_session(tmp_path / "decoder.onnx")
    (got,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        ref = q(input_ids=ids, use_cache=False).logits
    err = float(np.abs(got - ref.numpy()).max() / ref.abs().max())
    # onnxruntime sums in another order than torch: float32 rounding only, on these inputs
    # (an activation code flipping at a rounding tie would show as a 1/255-of-range step).
    assert err <= 1e-5 and report.max_error <= 1e-5
