"""INT32 biases (passes/bias_quant.py): layers that integer kernels run train with the bias they add."""

import torch
from helpers import digits
from statqat_ao.passes.bias_quant import BiasGrid
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN


def _trained(qconfig, steps=4):
    x, y = digits()[:2]
    torch.manual_seed(0)
    qat = sq.prepare_qat_fx(DigitsCNN(), qconfig, (x[:64],))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for i in range(steps):
        loss = nn.functional.cross_entropy(qat(x[64 * i : 64 * (i + 1)]), y[64 * i : 64 * (i + 1)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat


def _grid(qat, layer):
    """s_x * s_w from the layer's quantizers, computed here (float32, as the runtimes do)."""
    m = qat.get_submodule(layer)
    return (m.input_fake_quant.scale * m.weight_fake_quant.scale).reshape(-1)


def test_biases_train_and_convert_on_the_int32_grid():
    qat = _trained(sq.get_statqat_qconfig("int8", "int8"))
    grids = [m for m in qat.modules() if isinstance(m, BiasGrid)]
    assert len(grids) == 4  # stem, dw (folded batch norms), pw and fc (own biases)
    qat.eval()
    x = digits()[2][:32]
    converted = sq.convert(qat)
    with torch.no_grad():
        assert torch.equal(converted(x), qat(x))
    # pw's own bias: what the converted model adds is round(b / (s_x s_w)) * (s_x s_w), exactly
    grid = _grid(qat, "pw")
    stored = [b for name, b in converted.named_buffers() if name.startswith("quantize_bias")]
    expected = torch.round(qat.pw.bias.detach() / grid) * grid
    assert any(torch.equal(b, expected) for b in stored)
    assert not torch.equal(expected, qat.pw.bias.detach())  # the rounding does something
    # the folded stem bias: on its grid (rounding it to the grid again changes nothing)
    folded, grid = converted.stem_bn_folded_bias.reshape(-1), _grid(qat, "stem")
    assert torch.equal(torch.round(folded / grid) * grid, folded)


def test_the_bias_gradient_passes_straight_through():
    qat = _trained(sq.get_statqat_qconfig("int8", "int8"), steps=0)
    x = digits()[0][:64]
    qat(x).sum().backward()
    # d(sum of outputs)/d(fc bias) is the batch size for every class, as with a float bias
    torch.testing.assert_close(qat.fc.bias.grad, torch.full((10,), 64.0))


def test_layers_without_integer_kernels_keep_float_biases():
    qat = _trained(sq.get_statqat_qconfig("int4", "int8", weight_granularity=16, skip=["stem", "dw"]), steps=0)  # group weights
    assert not any(isinstance(m, BiasGrid) for m in qat.modules())
    weight_only = _trained(sq.get_statqat_qconfig("int8", None), steps=0)
    assert not any(isinstance(m, BiasGrid) for m in weight_only.modules())


def test_with_fake_quant_off_the_bias_is_the_float_one():
    qat = _trained(sq.get_statqat_qconfig("int8", "int8"), steps=0)
    qat.apply(torch.ao.quantization.disable_fake_quant)
    grids = [m for m in qat.modules() if isinstance(m, BiasGrid)]
    assert grids and all(g() is None for g in grids)


def test_a_bias_passed_by_keyword_is_quantized_once():
    """F.linear(x, w, bias=b) / F.conv2d(..., bias=b): the int32 bias replaces the keyword
    (before: the bias was also added positionally, TypeError at the first forward)."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4))
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, y):
            linear = nn.functional.linear(x, self.w, bias=self.b)
            return linear, nn.functional.conv2d(y, self.conv.weight, bias=self.conv.bias)

    torch.manual_seed(0)
    x, y = torch.randn(2, 8), torch.randn(2, 3, 6, 6)
    qat = sq.prepare_qat_fx(Functional(), sq.get_statqat_qconfig("int8", "int8"), (x, y))
    qat(x, y)
    qat.eval()
    with torch.no_grad():
        reference = qat(x, y)
        for got, want in zip(sq.convert(qat)(x, y), reference, strict=True):
            assert torch.equal(got, want)
    assert sum(1 for n in qat.graph.nodes if "quantize_bias" in n.name) == 2  # both biases on their grids
