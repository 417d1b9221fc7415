"""convert: explicit codes and q/dq ops whose output equals the fake-quant eval output."""

import io

import pytest
import torch
from helpers import MLP, digits, qat_losses, same_bits
from statqat_ao.passes.convert import ConvertError
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, TransformerBlock
from statqat_ao.numerics import codes
from statqat_ao.numerics.codes import code_table

QCONFIGS = {
    "w4a8": sq.statqat_qconfig,
    "fp4g16-afp8": sq.get_statqat_qconfig("fp4_e2m1", "fp8_e4m3", weight_granularity=16, skip=["stem", "dw"]),
    "nvfp4-wonly": sq.get_statqat_qconfig("nvfp4", None, skip=["stem", "dw"]),
    "nf4-a-uint8-asym": sq.get_statqat_qconfig(
        "nf4", "uint8", weight_granularity=32, activation_symmetric=False, skip=["stem", "dw"]
    ),
    "lsq": sq.get_statqat_qconfig("int4", "int8", weight_method="lsq", activation_method="lsq"),
    "int3-iterative-asym": sq.get_statqat_qconfig("int3", "int8", weight_method="iterative", weight_symmetric=False),
}


@pytest.mark.parametrize("name", list(QCONFIGS))
def test_converted_cnn_equals_the_trained_fake_quant_model(name):
    torch.manual_seed(0)
    x_test = digits()[2][:200]
    qat = sq.prepare_qat_fx(DigitsCNN(), QCONFIGS[name], (digits()[0][:64],))
    qat_losses(qat, steps=4)
    converted = sq.convert(qat)
    qat.eval()
    assert same_bits(converted(x_test), qat(x_test))
    for mod in converted.modules():
        if isinstance(mod, sq.QuantizedParams) and mod.codes is not None:
            f = mod.fmt
            if f.family == "int":
                assert f.qmin <= mod.codes.min() and mod.codes.max() <= f.qmax
            else:
                assert int(mod.codes.max()) < len(code_table(f.name)[0])


def test_convert_replaces_float_weights_by_codes_and_folds_batchnorm():
    qat = sq.prepare_qat_fx(DigitsCNN(), sq.statqat_qconfig, (digits()[0][:64],))
    converted = sq.convert(qat)
    names = dict(converted.named_parameters())
    assert "stem.weight" not in names and "fc.weight" not in names and "stem_bn.weight" not in names
    assert converted.stem.weight_quant.codes.dtype == torch.int8
    assert converted.fc.input_quant.codes is None
    targets = {str(n.target) for n in converted.graph.nodes}
    assert not any("FakeQuant" in t or "fake_quant" in t for t in targets)
    ops = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert codes.quantize in ops and codes.dequantize in ops


def _shrink_output(qat, x, opt, steps=3):
    """A few QAT steps on a simple objective (mean square of the output)."""
    for _ in range(steps):
        loss = qat(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_transformer_block_converts_exactly():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 64)
    qat = sq.prepare_qat_fx(TransformerBlock(dim=64), sq.statqat_qconfig, (x,))
    _shrink_output(qat, x, torch.optim.Adam(qat.parameters(), 1e-3))
    converted = sq.convert(qat)
    qat.eval()
    assert same_bits(converted(x), qat(x))


def test_converted_state_dict_loads_with_weights_only():
    qat = sq.prepare_qat_fx(MLP(), QCONFIGS["fp4g16-afp8"], (digits()[0][:64],))
    converted = sq.convert(qat)
    buf = io.BytesIO()
    torch.save(converted.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = sq.convert(sq.prepare_qat_fx(MLP(), QCONFIGS["fp4g16-afp8"], (digits()[0][:64],)))
    other.load_state_dict(state)
    x = digits()[2][:50]
    assert same_bits(other(x), converted(x))


def test_convert_of_torch_ao_prepared_model_uses_the_same_modules():
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    x = digits()[0][:64]
    qat = prepare_qat_fx(MLP().train(), sq.get_statqat_qconfig("fp4_e2m1", "int8", weight_granularity=16), (x,))
    qat_losses(qat, steps=3)
    converted = sq.convert(qat)
    qat.eval()
    x_test = digits()[2][:100]
    assert same_bits(converted(x_test), qat(x_test))


def test_convert_of_pt2e_prepared_model():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    from statqat_ao.frontends.pt2e import set_qat_mode

    x = digits()[0][:64]
    exported = torch.export.export(MLP(), (x,)).module()
    qat = prepare_qat_pt2e(exported, sq.StatQATQuantizer(sq.get_statqat_qconfig("int4", "int8", weight_granularity=16)))
    for _ in range(2):
        qat(x).square().mean().backward()
    converted = sq.convert(qat)
    set_qat_mode(qat, False)
    x_test = digits()[2][:64]  # exported with a static batch
    assert same_bits(converted(x_test), qat(x_test))
    assert any(isinstance(m, sq.QuantizedParams) and m.granularity == 16 for m in converted.modules())


def test_convert_refuses_a_quantizer_that_never_saw_data():
    qat = sq.prepare_qat_fx(MLP(), sq.statqat_qconfig)  # no example inputs: activations uninitialised
    with pytest.raises(ConvertError, match="fc1.input_fake_quant.*never saw data"):
        sq.convert(qat)


def test_disabled_fake_quant_converts_to_float_for_that_tensor():
    qat = sq.prepare_qat_fx(MLP(), sq.statqat_qconfig, (digits()[0][:64],))
    qat.fc2.input_fake_quant.disable_fake_quant()
    converted = sq.convert(qat)
    assert not hasattr(converted.fc2, "input_quant")
    x = digits()[2][:20]
    assert same_bits(converted(x), qat.eval()(x))
    assert isinstance(converted.fc2, nn.Linear)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16 * 12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_conv1d_with_batchnorm1d_folds_trains_and_converts_exactly():
    torch.manual_seed(0)
    x = torch.randn(32, 4, 12)
    qat = sq.prepare_qat_fx(Conv1dNet(), sq.statqat_qconfig, (x,))
    assert "conv.weight_fake_quant" in dict(qat.named_modules())
    _shrink_output(qat, x, torch.optim.SGD(qat.parameters(), lr=0.1))
    converted = sq.convert(qat)
    assert same_bits(converted(x), qat.eval()(x))


def test_bfloat16_model_converts_exactly():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    x = digits()[0][:32].to(torch.bfloat16)
    qat = sq.prepare_qat_fx(model, sq.get_statqat_qconfig("fp4_e2m1", "fp8_e4m3", weight_granularity=16), (x,))
    out = qat(x)
    assert out.dtype == torch.bfloat16
    converted = sq.convert(qat)
    assert converted.fc1.weight_quant.dtype == torch.bfloat16
    assert same_bits(converted(x), qat.eval()(x))


@pytest.mark.slow  # suite budget: mobilenet_v3_small in tests/vision/test_zoo.py is the fast deep graph
def test_a_deep_network_converts_without_hitting_the_recursion_limit():
    """Before: is_constant walked an activation's inputs recursively back to the graph input,
    and a deep network (mobilenet_v3_small, convnext_tiny) raised RecursionError in convert."""
    layers = []
    for _ in range(400):  # about 1,200 nodes deep with the quantizers: past Python's default limit
        layers += [nn.Linear(8, 8), nn.ReLU()]
    x = torch.randn(4, 8)
    qat = sq.prepare_qat_fx(nn.Sequential(*layers), sq.statqat_qconfig, (x,))
    assert torch.equal(sq.convert(qat)(x), qat.eval()(x))
