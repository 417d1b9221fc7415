"""torchao backend: Linear weights become torchao tensors holding convert's codes and scales.

References: torchao's own dequantization of each tensor (or, for the packed INT4 kernel,
the kernel applied to an identity matrix) against the converted weight, bit for bit;
and the lowered model's output against the converted model's.
"""

import warnings

import pytest
import torch
from backend_models import converted
from statqat_ao.backends import torchao as ao_backend
from statqat_ao.backends import torchao_tensors as tt
from statqat_ao.backends.parity import ParityError, UnsupportedModelError

import statqat_ao as sq

SKIP_CONV = ["conv1", "conv2", "embed"]  # 9- and 144-element conv rows, the 8-wide embedding
CASES = {
    # name: (qconfig, expected torchao type of the transformer's qkv weight)
    "int8-channel-a8": (sq.get_statqat_qconfig("int8", "int8"), "Int8Tensor"),
    "int4-g32-a8": (sq.get_statqat_qconfig("int4", "int8", weight_granularity=32, skip=SKIP_CONV), "Int4OpaqueTensor"),
    "uint4-asym-g64": (
        sq.get_statqat_qconfig("uint4", None, weight_granularity=64, weight_symmetric=False, skip=SKIP_CONV),
        "Int4OpaqueTensor",
    ),
    "int4-channel": (sq.get_statqat_qconfig("int4", "int8"), "Int4OpaqueTensor"),
    "int2-channel": (sq.get_statqat_qconfig("int2", "int8"), "IntxUnpackedToInt8Tensor"),
    "int3-g16-iterative": (
        sq.get_statqat_qconfig("int3", "int8", weight_granularity=16, weight_method="iterative", skip=SKIP_CONV),
        "IntxUnpackedToInt8Tensor",
    ),
    "uint8-asym-channel": (sq.get_statqat_qconfig("uint8", None, weight_symmetric=False), "IntxUnpackedToInt8Tensor"),
    "nvfp4": (sq.get_statqat_qconfig("nvfp4", None, skip=SKIP_CONV), "NVFP4Tensor"),
    "mxfp4-a-fp8": (sq.get_statqat_qconfig("mxfp4", "fp8_e4m3", skip=SKIP_CONV), "MXTensor"),
}


def _lower(model_name, case):
    q, x = converted(model_name, CASES[case][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the packed-INT4 fallback for the 10-class head
        return q, x, ao_backend.lower(q, (x,))


@pytest.mark.parametrize("model_name", ["cnn", "transformer"])
@pytest.mark.parametrize("case", list(CASES))
def test_torchao_weights_dequantize_to_the_converted_codes_and_outputs_match(model_name, case):
    q, x, lowered = _lower(model_name, case)
    assert lowered.lowered_weights, "no Linear weight was lowered"
    for w in lowered.lowered_weights:
        t = lowered.get_parameter(w.path)
        reference = q.get_submodule(w.path + "_quant").dequantize()
        assert type(t).__name__ == w.tensor_type
        assert torch.equal(ao_backend._dequantized(t, q.get_submodule(w.path + "_quant")), reference), w.path
    if model_name == "transformer":
        assert type(lowered.block.qkv.weight).__name__ == CASES[case][1]
    # no float copy left behind, and no QuantizedParams for lowered Linear weights
    assert not any(isinstance(m, sq.QuantizedParams) and m.codes is not None and m.codes.dim() == 2 for m in lowered.modules())
    with torch.no_grad():
        ref, out = q(x), lowered(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_packed_int4_is_the_kernels_layout_and_falls_back_where_the_kernel_cannot():
    q, x, lowered = _lower("cnn", "int4-g32-a8")
    head = lowered.lowered_weights[-1]
    assert head.path == "head.weight" and head.tensor_type == "IntxUnpackedToInt8Tensor"  # 10 rows: N % 16 != 0
    q, x, lowered = _lower("transformer", "int4-g32-a8")
    fc1 = next(w for w in lowered.lowered_weights if w.path == "block.fc1.weight")
    n, k = 128, 64
    assert fc1.tensor_type == "Int4OpaqueTensor"
    assert fc1.float_bytes == n * k * 4
    assert fc1.stored_bytes == n * k // 2 + (k // 32) * n * 2 * 4  # nibbles + fp32 (scale, zero) per group
    f, s = ao_backend.weight_bytes(lowered)
    assert s < 0.27 * f


@pytest.mark.parametrize("method", ["analytic", "iterative", "minmax", "mse"])
def test_nvfp4_scales_split_into_e4m3_times_a_tensor_scale(method):
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        w = torch.randn(16, 64, generator=g) * torch.rand(16, 1, generator=g) * 10
        scale, _ = sq.estimate_qparams(w, "nvfp4", method=method, granularity=16)
        e4m3, ts = tt.nvfp4_scales(scale)
        assert e4m3.dtype == torch.float8_e4m3fn and ts.dtype == torch.float32
        assert torch.equal(ts * e4m3.float(), scale)
    with pytest.raises(ValueError, match="not an FP32 tensor scale"):
        tt.nvfp4_scales(torch.tensor([[1.0, 1.0 + 2**-20]]))


def test_unsupported_linear_format_is_refused_before_any_work():
    q, x = converted("cnn", sq.get_statqat_qconfig("nf4", None, weight_granularity=32, skip=SKIP_CONV))
    before = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(UnsupportedModelError, match=r"head.weight_quant \(nf4, group 32\).*It supports: Linear weights in int2-int8"):
        ao_backend.lower(q, (x,), inplace=True)
    after = {k: v for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_prepared_model_is_refused_with_a_pointer_to_convert():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (torch.randn(2, 16),))
    with pytest.raises(UnsupportedModelError, match="call statqat_ao.convert"):
        ao_backend.lower(qat)


def test_a_weight_that_dequantizes_differently_raises(monkeypatch):
    q, x = converted("cnn", CASES["int2-channel"][0])
    real = tt.intx_tensor

    def off_by_one_code(p):
        t = real(p)
        t.qdata[0, 0] += 1
        return t

    monkeypatch.setattr(tt, "intx_tensor", off_by_one_code)
    with pytest.raises(ParityError, match=r"head.weight_quant \(int2\) does not dequantize"):
        ao_backend.lower(q, (x,))


def test_an_output_mismatch_raises_with_the_error_and_where(monkeypatch):
    q, x = converted("cnn", CASES["int2-channel"][0])
    real = tt.intx_tensor

    def scaled(p):
        t = real(p)
        t.scale.mul_(1.5)
        return t

    monkeypatch.setattr(tt, "intx_tensor", scaled)
    monkeypatch.setattr(ao_backend, "_dequantized", lambda t, p: p.dequantize())  # let the weights through
    # Caught at the layer: fed the converted model's own inputs, it misses the rounding bound.
    with pytest.raises(ParityError, match=r"the lowered head.weight differs from the converted layer .* rounding bound"):
        ao_backend.lower(q, (x,))


def test_a_model_without_quantized_linear_weights_is_refused():
    q, x = converted("cnn", sq.get_statqat_qconfig("int8", "int8", skip=["head"]))
    with pytest.raises(UnsupportedModelError, match="nothing to lower"):
        ao_backend.lower(q, (x,))


def test_torch_export_traced_models_lower_too():
    # the torch.export path (Hugging Face models) calls aten.linear, not F.linear
    from statqat_ao.models import TransformerBlock

    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    qc = sq.get_statqat_qconfig("int4", None, weight_granularity=32)
    q = sq.convert(sq.prepare_qat_fx(TransformerBlock(64, 2), qc, (x,), trace_method="export"))
    lowered = ao_backend.lower(q, (x,))
    assert {w.tensor_type for w in lowered.lowered_weights} == {"Int4OpaqueTensor"}
    assert len(lowered.lowered_weights) == 4


@pytest.mark.parametrize("method", ["analytic", "search", "minmax"])
def test_convert_stores_nvfp4_tensor_scale_and_lowering_uses_it(method):
    """NVFP4's FP32 tensor scale is kept in QuantizedParams (amax / (448 * 6) of the trained weight)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qat = sq.quantize_(model, sq.get_statqat_qconfig("nvfp4", None, weight_method=method))
    converted_model = sq.convert(qat)
    params = converted_model[0].weight_quant
    weight = qat[0].weight.detach()
    assert torch.equal(params.tensor_scale, weight.abs().amax() / (448.0 * 6.0))
    e4m3 = tt.nvfp4_block_scales(tt._grouped(params.scale, params), params.tensor_scale)
    assert torch.equal(params.tensor_scale * e4m3.float(), tt._grouped(params.scale, params))
    nv = tt.nvfp4_tensor(params)
    assert torch.equal(nv.per_tensor_scale, params.tensor_scale)
    with pytest.raises(ValueError, match="not the stored tensor scale"):
        tt.nvfp4_block_scales(tt._grouped(params.scale, params), params.tensor_scale * 1.5)
