"""torch's own prepare_qat_fx / convert_fx with the StatQAT qconfig."""

import copy

import pytest
import torch
from helpers import digits, qat_losses
from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_qat_fx

import statqat_ao as sq
from statqat_ao.frontends.torch_ao import StatQATFakeQuantize
from statqat_ao.models import DigitsCNN


def test_torch_prepare_inserts_statqat_quantizers_and_trains():
    torch.manual_seed(0)
    x = digits()[0][:64]
    qat = prepare_qat_fx(DigitsCNN(width=16).train(), sq.statqat_qconfig, (x,))
    fqs = [m for m in qat.modules() if isinstance(m, StatQATFakeQuantize)]
    weights = [m for m in fqs if not m.is_activation]
    assert len(weights) == 4 and all(m.fmt.name == "int4" for m in weights)
    assert any(m.is_activation for m in fqs)
    losses = qat_losses(qat, steps=15)
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3])
    # torch.ao's helpers switch our Python-bool flags
    qat.apply(torch.ao.quantization.disable_observer)
    assert not any(m.observer_enabled for m in fqs)


def test_torch_reference_convert_of_int8_matches_the_fake_quant_model():
    # The reference (q/dq) convert: torch.ao's x86 kernels saturate full-range uint8
    # activations (its own qconfigs reduce them to 7 bits), so they are not an exact reference.
    torch.manual_seed(0)
    x = digits()[0][:64]
    qc = sq.get_statqat_qconfig("int8", "int8")
    qat = prepare_qat_fx(DigitsCNN(width=16).train(), qc, (x,))
    qat_losses(qat, steps=3)
    qat.eval()
    x_test = digits()[2][:200]
    ref = qat(x_test)
    quantized = convert_to_reference_fx(copy.deepcopy(qat))  # convert reuses the prepared modules
    out = quantized(x_test)
    # torch's quantize multiplies by 1/scale where ours divides: a code can differ at a tie.
    # torch.ao's eval conv-bn computes conv(x, fq(w * f)) / f before batch norm, its convert
    # folds: float differences that can flip an activation code. Outputs agree closely.
    # Measured: one or two output codes at most, on a fraction of the logits.
    out_fq = qat.get_submodule(next(n for n in qat.graph.nodes if n.op == "output").args[0].target)
    err = (out - ref).abs()
    assert err.max() <= 2.01 * out_fq.scale and err.mean() < 0.03 * ref.abs().mean()


class ConvReLUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu1 = torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU()
        self.fc1, self.relu2 = torch.nn.Linear(8 * 6 * 6, 32), torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu1(self.conv(x)).flatten(1)
        return self.fc2(self.relu2(self.fc1(x)))


def test_sq_convert_keeps_the_relu_torch_ao_fused_into_linear_and_conv():
    """torch.ao fuses Linear+ReLU and Conv+ReLU into LinearReLU / ConvReLU2d. Before, sq.convert
    rewrote them as plain linear / conv and dropped the ReLU: 0.34 off on an MLP, silently."""
    torch.manual_seed(0)
    x = digits()[0][:64]
    qat = prepare_qat_fx(ConvReLUNet().train(), sq.get_statqat_qconfig("int4", "int8"), (x,))
    fused = {type(m).__name__ for m in qat.modules()}
    assert {"LinearReLU", "ConvReLU2d"} <= fused
    qat_losses(qat, steps=3)
    qat.eval()
    x_test = digits()[2][:100]
    assert torch.equal(sq.convert(qat)(x_test), qat(x_test))


class ConvBnNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8)  # ConvBnReLU2d
        self.relu = torch.nn.ReLU()
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, bias=False), torch.nn.BatchNorm2d(8)  # ConvBn2d
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.bn2(self.conv2(x)).flatten(1))


def test_sq_convert_takes_torch_ao_fused_conv_bn_modules():
    """torch.ao fuses Conv+BN(+ReLU) into ConvBn2d / ConvBnReLU2d. Before, sq.convert refused
    them ("convert with torch.ao's convert_fx"), and convert_fx cannot hold INT4 weights, so
    such a model could not be deployed with the default qconfig."""
    torch.manual_seed(0)
    x = digits()[0][:64]
    qat = prepare_qat_fx(ConvBnNet().train(), sq.statqat_qconfig, (x,))
    fused = {type(m).__name__ for m in qat.modules()}
    assert {"ConvBnReLU2d", "ConvBn2d"} <= fused
    qat_losses(qat, steps=5)
    qat.eval()
    x_test = digits()[2][:100]
    converted = sq.convert(qat)
    assert torch.equal(converted(x_test), qat(x_test))
    codes = converted.get_submodule("conv1").weight_quant.codes
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7  # INT4 codes
    # The codes are the ones of the batch-norm-scaled weight torch.ao's module fake-quantizes.
    bn = qat.conv1.bn
    scaled = qat.conv1.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    assert torch.equal(converted.get_submodule("conv1").weight_quant.dequantize(), qat.conv1.weight_fake_quant(scaled))


def test_a_zero_batch_norm_weight_under_torch_aos_conv_bn_names_the_cause():
    """torch.ao's ConvBn2d divides by gamma / running_std: 0/0 for timm's zero_init_last.
    The NaN is torch's; the error our quantizer raises says where it comes from."""
    import pytest

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1)).train()
    torch.nn.init.zeros_(model[1].weight)
    x = torch.randn(8, 1, 6, 6)
    qat = prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    assert "ConvBn2d" in {type(m).__name__ for m in qat.modules()}
    with pytest.raises(
        sq.NonFiniteError, match=r"NaN.*ConvBn2d divide its conv output 0/0.*sq\.torch_ao_exact_zero_batch_norm_weights"
    ):
        qat(x)


def test_torch_aos_exact_fold_trains_a_zero_batch_norm_weight_and_converts_bit_identically():
    """sq.torch_ao_exact_zero_batch_norm_weights switches the ConvBn modules whose gamma has a
    0 to torch.ao's slow path (no division by gamma); sq.convert reproduces that path's
    eval ops, so the converted model equals torch.ao's module in eval, and a channel whose
    gamma is 0 converts to zero codes."""
    torch.manual_seed(0)
    model = ConvBnNet().train()
    torch.nn.init.zeros_(model.bn2.weight)  # the last BN of a block: timm's zero_init_last
    model.bn1.weight.data[:3] = 0  # a ConvBnReLU2d with a conv bias, some channels at 0
    x = digits()[0][:64]
    qat = prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    assert sorted(sq.torch_ao_exact_zero_batch_norm_weights(qat)) == ["conv1", "conv2"]
    qat.conv2.bn.weight.requires_grad_(False)  # stays 0 through training
    losses = qat_losses(qat, steps=5)
    assert all(torch.isfinite(torch.tensor(losses)))
    qat.eval()
    x_test = digits()[2][:100]
    converted = sq.convert(qat)
    out = qat(x_test)
    assert torch.isfinite(out).all()
    assert torch.equal(converted(x_test), out)
    assert not converted.get_submodule("conv2").weight_quant.codes.any()  # gamma 0: the folded weight is 0



class AttentionNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)  # a leaf to torch.ao's tracer
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_convert_names_the_weights_torch_aos_tracer_kept_float():
    """torch.ao's tracer keeps nn.MultiheadAttention whole, so its projections get no quantizer;
    sq.convert names each weight that stays float (sq.prepare_qat_fx does at prepare)."""
    import pytest

    x = torch.randn(2, 5, 16)
    qat = prepare_qat_fx(AttentionNet().train(), sq.statqat_qconfig, (x,))
    qat(x)
    with pytest.warns(UserWarning, match=r"2 weight\(s\) .* stay float: attn\.in_proj_weight, attn\.out_proj\.weight\. ") as record:
        converted = sq.convert(qat)
    assert "fc.weight" not in str(record[0].message)
    assert converted.get_submodule("fc").weight_quant.codes is not None


class ComputedReshape(torch.nn.Module):
    """timm's maxvit reshapes to a shape computed from the input's (x.shape[:-1] + (-1,))."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(4, 3)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x.reshape(x.shape[:-1] + (2, -1)).transpose(-1, -2).reshape(x.shape[:-1] + (-1,))[..., :4])


def test_a_computed_reshape_shape_gets_no_quantizer_under_torch_ao():
    """With the global qconfig, torch.ao quantized reshape's shape argument (a tuple): the
    first step raised inside our quantizer. As in torch's default mapping, reshape now shares
    its input's quantizer."""
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    qat = prepare_qat_fx(ComputedReshape().train(), sq.statqat_qconfig, (x,))
    qat(x).sum().backward()
    qat.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(qat)(x), qat(x))


def test_a_quantizer_called_on_a_shape_says_so():
    fq = StatQATFakeQuantize(is_activation=True)
    with pytest.raises(TypeError, match=r"called on a Size, not a tensor"):
        fq(torch.Size([2, 3]))
