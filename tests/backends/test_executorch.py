"""ExecuTorch backend: lower QAT-trained models through XNNPACK, run the .pte with the real
ExecuTorch runtime and compare with the converted model."""

from __future__ import annotations

import copy

import pytest
import torch
from backend_models import converted
from statqat_ao.backends import executorch as et
from statqat_ao.backends.executorch_graph import rewrite_static
from statqat_ao.backends.parity import ParityError, UnsupportedModelError, check_parity
from torch import nn

import statqat_ao as sq

QCONFIGS = {
    "w8a8": lambda model: sq.get_statqat_qconfig("int8", "int8"),
    "w8a8_uint8": lambda model: sq.get_statqat_qconfig("int8", "uint8", activation_symmetric=False),
    # group 32: the CNN's convs (9- and 144-element rows) and the transformer's 8-wide embedding stay float
    "8da4w": lambda model: sq.get_statqat_qconfig(
        "int4", None, weight_granularity=32, skip=["embed"] if model == "transformer" else ["conv1", "conv2"]
    ),
}
EXPECTED_GEMMS = {
    ("cnn", "w8a8"): {"int8_gemms": 2, "fp32_gemms": 1},
    ("cnn", "w8a8_uint8"): {"int8_gemms": 2, "fp32_gemms": 1},
    ("transformer", "w8a8"): {"int8_gemms": 2, "fp32_gemms": 4},
    ("cnn", "8da4w"): {"dynamic_gemms": 1},
    ("transformer", "8da4w"): {"dynamic_gemms": 5},
}
_CACHE: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``get(model, mode) -> (converted, x, report)``, each exported once per module."""

    def get(model: str, mode: str):
        if (model, mode) not in _CACHE:
            q, x = converted(model, QCONFIGS[mode](model))
            path = tmp_path_factory.mktemp("pte") / f"{model}_{mode}.pte"
            activations = "dynamic_int8" if mode == "8da4w" else None
            _CACHE[model, mode] = (q, x, et.export(q, (x,), path, activations=activations))
        return _CACHE[model, mode]

    return get


# The static exports and the 8da4w transformer are in make test-slow (the small MLP's static
# W8A8 program, the W4A8 convolutions test, the decoder 8da4w test and the 8da4w CNN cover
# those paths in the fast suite).
_SLOW_EXPORTS = {("cnn", "w8a8_uint8"), ("cnn", "w8a8"), ("transformer", "8da4w"), ("transformer", "w8a8")}


@pytest.mark.parametrize(
    "model, mode", [pytest.param(*case, marks=pytest.mark.slow) if case in _SLOW_EXPORTS else case for case in EXPECTED_GEMMS]
)
def test_export_runs_in_executorch_with_parity(exported, model, mode):
    q, x, report = exported(model, mode)
    tolerance = et.DYNAMIC_TOLERANCE if mode == "8da4w" else et.STATIC_TOLERANCE
    assert report.path.stat().st_size == report.file_bytes > 0
    with torch.no_grad():
        reference = q(x)
    error = check_parity(reference, et.run(report.path, x), backend="executorch", tolerance=tolerance)
    assert error == pytest.approx(report.max_error) and 0 < error <= tolerance
    # the quantized GEMMs and every quantize / dequantize went into XNNPACK
    assert report.gemms == EXPECTED_GEMMS[model, mode]
    assert report.delegated_nodes > 0
    assert not [op for op in report.outside_delegate if "quantized_decomposed" in op]


@pytest.fixture(scope="module")
def small_w8a8(tmp_path_factory):
    """A static W8A8 MLP program: ``(converted, x, report)`` (a small export for the fast suite)."""
    q, x = _small(sq.get_statqat_qconfig("int8", "int8"))
    return q, x, et.export(q, (x,), tmp_path_factory.mktemp("pte") / "mlp.pte")


def test_load_program_runs_repeatedly(small_w8a8):
    q, x, report = small_w8a8
    forward = et.load_program(report.path)
    first, second = forward(x)[0], forward(x)[0]
    assert torch.equal(first, second) and first.shape == q(x).shape


def test_parity_check_catches_a_tampered_scale(small_w8a8):
    q, x, report = small_w8a8
    tampered = copy.deepcopy(q)
    tampered.get_submodule("2.weight_quant").scale.mul_(1.1)
    with torch.no_grad():
        reference = tampered(x)
    with pytest.raises(ParityError, match="max abs error .* relative error"):
        check_parity(reference, et.run(report.path, x), backend="executorch", tolerance=et.STATIC_TOLERANCE)


def _small(qconfig, conv: bool = False):
    torch.manual_seed(0)
    if conv:
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 4))
        x = torch.randn(2, 4, 4, 4)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        x = torch.randn(8, 64)
    return sq.convert(sq.prepare_qat_fx(model, qconfig, (x,))), x


def test_export_raises_when_outputs_differ(tmp_path):
    q, x = _small(sq.get_statqat_qconfig("int8", "int8"))
    with pytest.raises(ParityError, match="differs from the converted model"):
        et.export(q, (x,), tmp_path / "m.pte", tolerance=1e-9)
    assert not list(tmp_path.iterdir())


def test_int4_weight_only_without_opt_in_names_the_alternative(tmp_path):
    q, x = _small(sq.get_statqat_qconfig("int4", None, weight_granularity=32))
    with pytest.raises(UnsupportedModelError, match="activations='dynamic_int8'.*8da4w"):
        et.export(q, (x,), tmp_path / "w4.pte")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "qconfig, activations, match",
    [
        (sq.get_statqat_qconfig("nvfp4", "int8"), None, "not an INT format"),
        (sq.get_statqat_qconfig("int4", "int4"), None, "activations must be int8 or uint8"),
        (sq.get_statqat_qconfig("int4", "int8", weight_granularity=32), None, "group weights need dynamic"),
        (sq.get_statqat_qconfig("int8", "int8"), "dynamic_int8", "for weight-only models"),
        (sq.get_statqat_qconfig("int4", None, weight_symmetric=False), "dynamic_int8", "zero point 0"),
    ],
)
def test_unsupported_formats_fail_before_any_work(tmp_path, qconfig, activations, match):
    q, x = _small(qconfig)
    with pytest.raises(UnsupportedModelError, match=match) as info:
        et.export(q, (x,), tmp_path / "m.pte", activations=activations)
    assert "It supports" in str(info.value) or "activations" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_8da4w_refuses_group_quantized_convs(tmp_path):
    q, x = _small(sq.get_statqat_qconfig("int4", None, weight_granularity=4), conv=True)
    with pytest.raises(UnsupportedModelError, match="Linear weights only"):
        et.export(q, (x,), tmp_path / "m.pte", activations="dynamic_int8")


def test_w4a8_convolutions_lower_as_int8_range_weights(tmp_path):
    # 4-bit codes on a conv: XNNPACK only packs 4-bit weights for 2-D (Linear) weights.
    q, x = converted("cnn", sq.get_statqat_qconfig("int4", "int8"))
    report = et.export(q, (x,), tmp_path / "w4a8.pte")
    assert report.gemms["int8_gemms"] == 2
    check_parity(q(x), et.run(tmp_path / "w4a8.pte", (x,)), backend="test", tolerance=et.STATIC_TOLERANCE)


@pytest.mark.slow  # suite budget: the CNN and decoder 8da4w exports cover the path in the fast suite
def test_8da4w_on_a_torch_export_traced_model(tmp_path):
    from statqat_ao.models import TransformerBlock

    torch.manual_seed(0)
    x = torch.randn(2, 6, 64)
    qc = sq.get_statqat_qconfig("int4", None, weight_granularity=32)
    q = sq.convert(sq.prepare_qat_fx(TransformerBlock(64, 2), qc, (x,), trace_method="export"))
    report = et.export(q, (x,), tmp_path / "block.pte", activations="dynamic_int8")
    assert report.gemms == {"dynamic_gemms": 4}


def test_layer_by_layer_check_when_the_end_to_end_one_fails(tmp_path, monkeypatch):
    """A deep network's program can miss the end-to-end tolerance with every layer right: then
    a second program returns each quantizer's codes and every layer is checked on its own.
    The end-to-end check is made to fail here (a negative tolerance) to take that path."""
    q, x = _small(sq.get_statqat_qconfig("int8", "int8"))
    monkeypatch.setattr(et, "STATIC_TOLERANCE", -1.0)
    with pytest.warns(UserWarning, match="checked layer by layer"):
        report = et.export(q, (x,), tmp_path / "m.pte")
    assert [layer.path for layer in report.layers] == ["0.input_quant", "2.input_quant"]
    assert all(layer.within_ties and layer.codes == layer_numel for layer, layer_numel in zip(report.layers, (8 * 64, 8 * 32), strict=True))
    # The same program against a model whose second activation scale is 1% off: caught at that layer.
    tampered = copy.deepcopy(q)
    tampered.get_submodule("2.input_quant").scale.mul_(1.01)
    gm, _ = rewrite_static(q)
    outputs = et.run(report.path, (x,))
    with torch.no_grad():
        reference = [tampered(x)]
    with pytest.raises(ParityError, match=r"2\.input_quant: .* differ"):
        et._check_layers(tampered, gm, (x,), outputs, reference, ParityError("end to end"))


class ConvBlockWithPlaceholders(nn.Module):
    """timm's resnet blocks: nn.Identity placeholders (drop_block, aa) between a conv's
    activation and the next conv."""

    def __init__(self, placeholders: bool):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.drop_block = nn.Identity() if placeholders else None
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        if self.drop_block is not None:
            x = self.drop_block(x)
        return self.conv2(x)


def test_identity_placeholders_do_not_keep_a_conv_off_the_int8_path():
    """With the Identity left in the graph, conv1 was not seen as requantized and ran in
    fp32 (timm's resnet18: 10 of 21 GEMMs; its XNNPACK program then failed at run time)."""
    x = torch.randn(2, 3, 8, 8)
    counts = []
    for placeholders in (False, True):
        torch.manual_seed(0)
        qat = sq.prepare_qat_fx(ConvBlockWithPlaceholders(placeholders).train(), sq.get_statqat_qconfig("int8", "int8"), (x,))
        assert not any(n.op == "call_module" and n.target == "drop_block" for n in qat.graph.nodes)
        counts.append(rewrite_static(sq.convert(qat))[1])
    assert counts[0] == counts[1] == {"int8_gemms": 1, "fp32_gemms": 1}


def test_a_model_with_no_int8_gemm_says_so(tmp_path):
    """GEMM outputs that feed GELU (timm's ViT, convnext) are not quantized, so XNNPACK runs
    them in fp32: the export is exact but not int8, and says so."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    qat = sq.prepare_qat_fx(model, sq.get_statqat_qconfig("int8", "int8"), (x,))
    with pytest.warns(UserWarning, match=r"none of this model's 2 GEMMs runs on XNNPACK's int8 kernels"):
        report = et.export(sq.convert(qat), (x,), tmp_path / "gelu.pte")
    assert report.gemms == {"int8_gemms": 0, "fp32_gemms": 2}
