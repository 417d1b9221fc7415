"""Trained deep CNNs deploy: W8A8 resnet18 and mobilenet_v2 to ONNX and ExecuTorch (make test-slow).

Real images (sklearn's digits at 32x32, RGB), 100 SGD steps of QAT (the model learns:
test accuracy checked), convert, then both exports with their parity checks: layer by layer,
where codes flipped at rounding ties travel through the network. onnxruntime must run the
convolutions as integer QLinearConv kernels.
"""

import warnings

import pytest
import torch
from statqat_ao.backends import executorch
from statqat_ao.backends import onnx as onnx_backend

import statqat_ao as sq
from statqat_ao.models.vision import NOT_INSTALLED, build_classifier, digits_images, import_vision

pytestmark = [pytest.mark.slow, pytest.mark.skipif(import_vision()[0] is None, reason=NOT_INSTALLED)]


@pytest.mark.parametrize("name, integer_convs", [("torchvision:resnet18", 19), ("torchvision:mobilenet_v2", 46)])
def test_a_trained_w8a8_cnn_exports_to_onnx_and_executorch(name, integer_convs, tmp_path):
    x, y, x_test, y_test = digits_images(32)
    torch.manual_seed(0)
    qat = sq.prepare_qat_fx(build_classifier(name, num_classes=10).train(), sq.get_statqat_qconfig("int8", "int8"), (x[:64],))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01, momentum=0.9)
    for i in range(100):
        j = (i * 64) % (len(x) - 64)
        loss = torch.nn.functional.cross_entropy(qat(x[j : j + 64]), y[j : j + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    converted = sq.convert(qat)
    with torch.no_grad():
        assert float((converted(x_test).argmax(1) == y_test).float().mean()) > 0.8

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the end-to-end figure, reported
        report = onnx_backend.export(converted, (x_test[:64],), tmp_path / "model.onnx")
    assert report.layers and all(layer.within_ties for layer in report.layers)
    ops = onnx_backend.kernel_ops(report.path)
    assert ops.count("QLinearConv") >= integer_convs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = executorch.export(converted, (x_test[:1],), tmp_path / "model.pte")
    assert program.gemms["int8_gemms"] >= integer_convs
    assert all(layer.within_ties for layer in program.layers)


@pytest.mark.parametrize("name, int8_gemms", [("timm:resnet18", 19), ("timm:ghostnet_100", 51)])
def test_timm_cnns_lower_to_executorch_with_their_int8_gemms(name, int8_gemms, tmp_path):
    """timm's resnet18 (nn.Identity placeholders between a conv's ReLU and the next conv: 10
    convs ran in fp32 and the program failed at run time) and ghostnet (a dequantize shared
    by an int8 conv and an fp32 one: XNNPACK refused the lowering). Random init, 3 steps."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    qat = sq.prepare_qat_fx(build_classifier(name, num_classes=10).train(), sq.get_statqat_qconfig("int8", "int8"), (x,))
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(3):
        torch.nn.functional.cross_entropy(qat(x), torch.arange(4)).backward()
        optimizer.step()
        optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = executorch.export(sq.convert(qat), (x,), tmp_path / "model.pte")
    assert program.gemms["int8_gemms"] == int8_gemms
