"""prepare_qat_fx: where fake quant goes, BN folding, QAT on real data, bad input."""

import warnings

import pytest
import torch
from helpers import MLP, digits, qat_losses
from statqat_ao.passes.fold_bn import FoldedBatchNorm
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, TransformerBlock


def _fq_paths(gm):
    return {n for n, m in gm.named_modules() if isinstance(m, sq.FakeQuantizer)}


def test_cnn_gets_weight_input_and_shared_residual_quantizers_with_readable_names():
    x = digits()[0][:32]
    qat = sq.prepare_qat_fx(DigitsCNN(), sq.statqat_qconfig, (x,))
    paths = _fq_paths(qat)
    for layer in ("stem", "dw", "pw", "fc"):
        assert f"{layer}.weight_fake_quant" in paths and f"{layer}.input_fake_quant" in paths
    shared = [p for p in paths if p.startswith("add")]
    assert len(shared) == 1  # the residual add: one quantizer for both operands
    keys = qat.state_dict().keys()
    assert {"stem.weight", "stem_bn.running_var", "stem_bn.weight", "fc.bias"} <= set(keys)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qat.modules())


def test_weight_scales_start_at_the_estimator_of_the_folded_weight():
    model = DigitsCNN().eval()
    with torch.no_grad():
        model.stem_bn.running_var.uniform_(0.5, 2.0)
        model.stem_bn.weight.uniform_(0.5, 1.5)
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig)
    bn = model.stem_bn
    folded = model.stem.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    expected, _ = sq.estimate_qparams(folded, "int4", "auto", "channel")  # no layer input yet: the weight's error
    torch.testing.assert_close(qat.stem.weight_fake_quant.scale, expected)
    fc_scale, _ = sq.estimate_qparams(model.fc.weight, "int4", "auto", "channel")
    torch.testing.assert_close(qat.fc.weight_fake_quant.scale, fc_scale)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_folding_with_quantization_off_reproduces_the_float_model(mode):
    torch.manual_seed(0)
    model = DigitsCNN()
    with torch.no_grad():
        for bn in (model.stem_bn, model.dw_bn):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    x = digits()[0][:64]
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    qat.apply(torch.ao.quantization.disable_fake_quant)
    model.train(mode == "train")
    qat.train(mode == "train")
    torch.testing.assert_close(qat(x), model(x), rtol=1e-4, atol=1e-5)
    if mode == "train":  # batch statistics moved the running ones the same way
        torch.testing.assert_close(qat.stem_bn.running_mean, model.stem_bn.running_mean)
        torch.testing.assert_close(qat.dw_bn.running_var, model.dw_bn.running_var)


@pytest.mark.parametrize("make", [MLP, DigitsCNN], ids=["mlp", "cnn"])
@pytest.mark.parametrize(
    "qconfig",
    [
        sq.statqat_qconfig,
        sq.get_statqat_qconfig("fp4_e2m1", "fp8_e4m3", weight_granularity=16, skip=["stem", "dw"]),
        sq.get_statqat_qconfig("int4", "int8", weight_method="iterative", activation_symmetric=False),
    ],
    ids=["w4a8", "fp4-g16-a-fp8", "iterative-asym"],
)
def test_qat_on_digits_lowers_the_loss(make, qconfig):
    torch.manual_seed(0)
    qat = sq.prepare_qat_fx(make(), qconfig, (digits()[0][:64],))
    losses = qat_losses(qat, steps=15)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3


def test_transformer_block_quantizes_linears_and_both_matmul_operands():
    torch.manual_seed(0)
    block = TransformerBlock(dim=64, heads=4)
    x = torch.randn(4, 16, 64)
    qat = sq.prepare_qat_fx(block, sq.statqat_qconfig, (x,))
    paths = _fq_paths(qat)
    assert {f"{n}.weight_fake_quant" for n in ("qkv", "proj", "fc1", "fc2")} <= paths
    assert sum(p.startswith("matmul") for p in paths) == 4  # q, k and probabilities, v
    target = block(x).detach() + 0.1 * torch.randn(4, 16, 64)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = nn.functional.mse_loss(qat(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_skip_list_and_type_override():
    qc = sq.get_statqat_qconfig("int4", "int8", skip=["stem"]).override_type(nn.Linear, weight="int8")
    qat = sq.prepare_qat_fx(DigitsCNN(), qc, (digits()[0][:8],))
    paths = _fq_paths(qat)
    assert not any(p.startswith("stem.") for p in paths)
    assert qat.fc.weight_fake_quant.fmt.name == "int8"
    assert qat.pw.weight_fake_quant.fmt.name == "int4"


def test_weight_only_has_no_activation_quantizers():
    qat = sq.prepare_qat_fx(MLP(), sq.get_statqat_qconfig("nvfp4", activation=None))
    assert _fq_paths(qat) == {"fc1.weight_fake_quant", "fc2.weight_fake_quant"}
    assert qat.fc1.weight_fake_quant.scale.shape == (64, 4)


def test_group_size_that_does_not_divide_fails_at_prepare_naming_the_layer():
    with pytest.raises(ValueError, match=r"layer 'fc2' weight.*row length 64|row length 64.*'fc2'"):
        sq.prepare_qat_fx(MLP(), sq.get_statqat_qconfig("int4", weight_granularity=48).skip("fc1"))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_names_the_construct_and_suggests_export():
    with pytest.raises(sq.TraceError) as info:
        sq.prepare_qat_fx(Untraceable())
    message = str(info.value)
    assert "if x.sum() > 0" in message and "example_inputs" in message and "torch.export" in message


class MaskedLookup(nn.Module):
    """Traceable only by torch.export (item assignment on an input-derived tensor)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.zeros_like(x)
        h[:, :4] = x[:, :4]
        return self.fc(h)


def test_export_fallback_quantizes_and_keeps_readable_names():
    model = MaskedLookup()
    x = torch.randn(4, 8)
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    assert "fc.weight_fake_quant" in _fq_paths(qat)
    assert qat(torch.randn(7, 8)).shape == (7, 8)  # dynamic batch


def test_modules_without_a_quantizer_are_listed_in_one_warning():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.up = nn.ConvTranspose1d(8, 8, 2)
            self.fc = nn.Linear(8, 2)

        def forward(self, ids):
            h = self.up(self.emb(ids).transpose(1, 2)).transpose(1, 2)
            return self.fc(h)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sq.prepare_qat_fx(Mixed(), sq.statqat_qconfig, (torch.randint(0, 10, (2, 5)),))
    ours = [str(w.message) for w in caught if "stay float" in str(w.message)]
    assert len(ours) == 1 and "emb (Embedding)" in ours[0] and "up (ConvTranspose1d)" in ours[0]


def test_folded_batchnorm_keeps_the_original_state_dict_names():
    bn = nn.BatchNorm2d(4)
    assert set(FoldedBatchNorm(bn).state_dict()) == set(bn.state_dict())


def test_export_path_warns_that_conv_batchnorm_is_not_folded():
    class ExportOnlyConvBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            h = torch.zeros_like(x)
            h[:, :, :4] = x[:, :, :4]  # item assignment: fx cannot trace it
            return self.bn(self.conv(h))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sq.prepare_qat_fx(ExportOnlyConvBn(), sq.statqat_qconfig, (torch.randn(2, 1, 8, 8),))
    assert any("bn (BatchNorm after a conv, not folded" in str(w.message) for w in caught)


def test_conv_with_a_padding_mode_the_pass_cannot_quantize_is_listed_not_silently_float():
    class Reflect(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
            self.fc = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = sq.prepare_qat_fx(Reflect(), sq.statqat_qconfig, (torch.randn(2, 1, 8, 8),))
    assert any("conv (Conv2d)" in str(w.message) for w in caught)
    assert "fc.weight_fake_quant" in _fq_paths(qat)


def test_type_overrides_apply_on_the_export_path():
    qc = sq.statqat_qconfig.override_type(nn.Linear, weight="int8")
    qat = sq.prepare_qat_fx(MaskedLookup(), qc, (torch.randn(4, 8),))  # fx cannot trace it
    assert qat.fc.weight_fake_quant.fmt.name == "int8"


def test_a_functional_batch_norm_after_a_conv_is_named_with_the_right_reason():
    """timm's BatchNormAct2d calls F.batch_norm itself: not folded. Before, the warning blamed
    'the torch.export path' although the model went through torch.fx."""

    class BatchNormAct(nn.BatchNorm2d):  # the shape of timm's BatchNormAct2d
        def forward(self, x):
            y = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
            return torch.relu(y)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), BatchNormAct(8)

        def forward(self, x):
            return self.bn(self.conv(x))

    with pytest.warns(UserWarning, match=r"bn \(BatchNorm after a conv, not folded: a module calls F.batch_norm itself"):
        sq.prepare_qat_fx(Net(), sq.statqat_qconfig, (torch.randn(2, 3, 8, 8),), trace_method="fx")


class DropPath(nn.Module):
    """Stochastic depth as timm and torchvision write it: a parameter-free module reading self.training."""

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1) > 0.5).to(x.dtype)
        return x * keep / 0.5


class ResidualDropPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop_path = nn.Linear(16, 16), nn.Linear(16, 4), DropPath()

    def forward(self, x):
        x = x + self.drop_path(torch.relu(self.fc1(x)))
        return self.fc2(x)


def test_stochastic_depth_follows_train_and_eval_after_tracing_in_training_mode():
    """Before: fx evaluated `self.training` at trace time and baked the random branch into the
    graph, so a model prepared in training mode stayed random in eval (torchvision's Swin:
    two eval runs differed by 0.43)."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    qat = sq.prepare_qat_fx(ResidualDropPath().train(), sq.statqat_qconfig, (x,))
    assert isinstance(qat.drop_path, DropPath)  # kept as a module
    qat.eval()
    with torch.no_grad():
        assert torch.equal(qat(x), qat(x))
        converted = sq.convert(qat)
        assert torch.equal(converted(x), qat(x))
    qat.train()
    with torch.no_grad():
        assert not torch.equal(qat(x), qat(x))  # still stochastic in training


def _opaque_attention(x, qkv_weight, proj_weight):
    q, k, v = nn.functional.linear(x, qkv_weight).chunk(3, dim=-1)
    return nn.functional.linear(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v, proj_weight)


torch.fx.wrap("_opaque_attention")


class OpaqueAttentionBlock(nn.Module):
    """torchvision's Swin shape: Linear weights handed to a function fx keeps whole."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(8, 24, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(_opaque_attention(x, self.qkv.weight, self.proj.weight))


def test_weights_read_inside_a_wrapped_function_are_named_as_staying_float():
    """Before: torchvision's Swin kept 24 of its 53 weights float with no warning."""
    with pytest.warns(UserWarning, match=r"qkv\.weight, proj\.weight \(read inside _opaque_attention, which the trace keeps whole\)"):
        qat = sq.prepare_qat_fx(OpaqueAttentionBlock(), sq.statqat_qconfig, (torch.randn(2, 5, 8),), trace_method="fx")
    assert "head.weight_fake_quant" in _fq_paths(qat)


def test_batch_norm_folded_weights_are_not_called_float():
    """The BN fold is a function the trace keeps whole too, but its output is quantized (a false
    "stays float" warning named stem.weight and dw.weight of DigitsCNN prepared in eval)."""
    from statqat_ao.models import DigitsCNN

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qat = sq.prepare_qat_fx(DigitsCNN(width=8).eval(), sq.get_statqat_qconfig("int4", None), (torch.randn(2, 1, 8, 8),))
    assert {"stem.weight_fake_quant", "dw.weight_fake_quant"} <= _fq_paths(qat)


class AuxHead(nn.Module):
    """googlenet's shape: an auxiliary head run and returned in training only."""

    def __init__(self):
        super().__init__()
        self.body, self.aux, self.fc = nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(8, 2)

    def forward(self, x):
        x = self.body(x)
        if self.training:
            return self.fc(x), self.aux(x)
        return self.fc(x)


class FunctionalDropoutHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.nn.functional.dropout(x, 0.5, training=self.training))


def test_a_forward_that_branches_on_the_mode_is_named_at_prepare():
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"AuxHead's forward branches on self\.training .*node 'aux'"):
        sq.prepare_qat_fx(AuxHead().train(), sq.statqat_qconfig, (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # F.dropout(training=self.training) follows the mode: no branch, silent
        sq.prepare_qat_fx(FunctionalDropoutHead().train(), sq.statqat_qconfig, (x,))



class ShapeArithmetic(nn.Module):
    """tiny_vit's shape: numbers computed from shapes are added (padding sizes), next to a real residual add."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        pad = (x.shape[-1] + x.size(0)) % 4
        return torch.nn.functional.pad(y + torch.relu(x), (0, pad))


@pytest.mark.parametrize("trace_method", ["fx", "export"])
def test_numbers_computed_from_shapes_get_no_quantizer(trace_method):
    x = torch.randn(3, 8)
    qat = sq.prepare_qat_fx(ShapeArithmetic(), sq.statqat_qconfig, (x,), trace_method=trace_method)
    shared = [n for n in qat.graph.nodes if n.op == "call_module" and n.target.startswith("add") and "fake_quant" in n.target]
    assert len(shared) == 1  # the residual add only (it raised on the shape add before)
    out = qat(x)
    assert out.shape == (3, 11)
    qat.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(qat)(x), qat(x))


class InPlaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        y += torch.relu(self.b(x))  # in place, as some timm / HF blocks write it: fx records an add
        return y


def test_an_in_place_residual_add_gets_its_shared_quantizer():
    x = torch.randn(4, 8)
    qat = sq.prepare_qat_fx(InPlaceResidual(), sq.statqat_qconfig, (x,))
    assert any(n.op == "call_module" and n.target == "add_fake_quant" for n in qat.graph.nodes)
    qat(x)
    qat.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(qat)(x), qat(x))


def test_a_batch_norm_frozen_with_eval_stays_frozen_through_prepare():
    # Fine-tuning with frozen batch norms: the model trains, one norm was put in eval.
    torch.manual_seed(0)
    model = DigitsCNN().train()
    with torch.no_grad():
        model.stem_bn.running_mean.normal_(0, 0.1)
        model.stem_bn.running_var.uniform_(0.5, 2.0)
    model.stem_bn.eval()
    x = digits()[0][:64]
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    assert qat.training and qat.dw_bn.training and not qat.stem_bn.training
    frozen_mean = qat.stem_bn.running_mean.clone()
    qat.apply(torch.ao.quantization.disable_fake_quant)
    torch.testing.assert_close(qat(x), model(x), rtol=1e-4, atol=1e-5)  # the float model, stem_bn frozen
    torch.testing.assert_close(qat.stem_bn.running_mean, frozen_mean, rtol=0, atol=0)
    torch.testing.assert_close(qat.dw_bn.running_mean, model.dw_bn.running_mean)


class _RecipeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.pos = nn.Linear(16, 4), nn.Parameter(torch.zeros(16))
        self.cfg = {"mean": (0.5,), "input_size": (16,)}

    def no_weight_decay(self):
        return {"pos"}

    def group_matcher(self, coarse=False):
        return {"stem": r"^pos", "blocks": r"^fc" if coarse else [(r"^fc", (0,))]}

    def forward(self, x):
        return self.fc(x + self.pos)


def test_plain_attributes_and_recipe_answers_carry_over_through_copies_and_pickles():
    import copy
    import io

    model = _RecipeNet()
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (torch.randn(4, 16),))
    buffer = io.BytesIO()
    torch.save(qat, buffer)
    buffer.seek(0)
    for prepared in (qat, copy.deepcopy(qat), torch.load(buffer, weights_only=False), sq.convert(qat)):
        assert prepared.cfg == model.cfg and prepared.cfg is not model.cfg
        assert prepared.no_weight_decay() == {"pos"}
        for coarse in (False, True):
            assert prepared.group_matcher(coarse=coarse) == model.group_matcher(coarse=coarse)
            assert prepared.group_matcher(coarse) == model.group_matcher(coarse)
    with pytest.raises(NotImplementedError, match="group_matcher.*call it on the float model"):
        qat.group_matcher(coarse="other")
