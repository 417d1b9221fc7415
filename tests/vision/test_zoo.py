"""Real torchvision and timm classifiers through the graph pass, as users bring them.

Random init, 64x64 inputs, the default qconfig (INT4 weights, INT8 activations), two SGD
steps, then the checks a deployment needs: training stays finite, eval is deterministic,
and the converted model equals the QAT model in eval bit for bit (whatever mode convert
is handed the model in). The slow set covers more of the zoo (`make test-slow`).
"""

import warnings

import pytest
import torch

import statqat_ao as sq
from statqat_ao.models.vision import NOT_INSTALLED as SKIP_REASON
from statqat_ao.models.vision import build_classifier as build
from statqat_ao.models.vision import import_vision

# torchvision and timm come from the venv's vision folder (statqat_ao.models.vision says why).
torchvision, timm = import_vision()
pytestmark = pytest.mark.skipif(torchvision is None, reason=SKIP_REASON)

# resnet18 (timm's zero_init_last: zero batch-norm weights), mobilenet_v3_small (a graph
# deep enough to exhaust a recursive walk), swin_t (stochastic depth and an attention
# function fx keeps whole), a two-layer torchvision ViT (nn.MultiheadAttention).
FAST = ["timm:resnet18", "torchvision:mobilenet_v3_small", "torchvision:swin_t", "torchvision:vit"]
ATTENTION = {"torchvision:swin_t", "torchvision:vit"}  # every weight quantized, attention included
SLOW = [
    "torchvision:resnet18",  # its torch.ao path stays fast (below); timm's resnet18 is the same graph with zero gammas
    "torchvision:mobilenet_v2",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:convnext_tiny",
    "torchvision:regnet_y_400mf",
    "timm:efficientnet_b0",
    "timm:ghostnet_100",  # F.dropout(training=self.training) in the head (tests/passes/test_train_only_dropout.py)
]


def _prepared_and_trained(name: str, x: torch.Tensor):
    torch.manual_seed(0)
    model = build(name).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    stay_float = " ".join(str(w.message) for w in caught if "stay float" in str(w.message))
    quantizers = {n for n, _ in qat.named_modules()}
    for path, p in model.named_parameters():
        # Every weight matrix (a Linear's, a conv's, MultiheadAttention's packed in-projection,
        # Swin's qkv / proj read inside shifted_window_attention) gets a quantizer, or the
        # warning names it. Tables and tokens (position embeddings, layer scales) are not weights.
        if path.endswith("weight") and p.dim() >= 2:
            owner = path.rpartition(".")[0]
            assert f"{path}_fake_quant" in quantizers or owner in stay_float, f"{name}: {path} neither quantized nor named"
    if name in ATTENTION:
        assert not stay_float, f"{name}: {stay_float}"
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(2):
        out = qat(x)
        assert torch.isfinite(out).all(), f"{name}: non-finite QAT output"
        loss = torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % out.shape[1])
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in qat.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
        optimizer.step()
    return qat


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_prepare_train_and_convert_exactly(name):
    x = torch.randn(4, 3, 64, 64)
    qat = _prepared_and_trained(name, x)
    converted = sq.convert(qat)  # handed over in training mode: convert computes eval numerics
    qat.eval()
    with torch.no_grad():
        reference = qat(x)
        assert torch.equal(qat(x), reference), f"{name}: eval is not deterministic"
        assert torch.equal(converted(x), reference), f"{name}: converted != QAT model in eval"


def test_torch_ao_prepare_qat_fx_on_resnet18_converts_exactly():
    """torch.ao fuses resnet18's Conv+BN(+ReLU) into ConvBn2d / ConvBnReLU2d; sq.convert takes them."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    qat = prepare_qat_fx(torchvision.models.resnet18().train(), sq.statqat_qconfig, (x,))
    assert {"ConvBnReLU2d", "ConvBn2d"} <= {type(m).__name__ for m in qat.modules()}
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for _ in range(2):
        qat(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    qat.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(qat)(x), qat(x))


# Slow (make test-slow); the fast suite covers each fix on small models:
# tests/frontends/test_pt2e.py (regnet's shape, zero batch-norm weights) and
# tests/vision/test_pt2e_stochastic_depth.py.
PT2E = ["torchvision:regnet_y_400mf", "torchvision:convnext_tiny", "torchvision:swin_t", "torchvision:vit", "timm:resnet18"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PT2E)
def test_pt2e_prepare_train_and_convert_exactly(name):
    """torchao's PT2E flow with sq.StatQATQuantizer: regnet's two conv-bn layers on one tensor
    (a shared spec torchao's conv-bn fusion broke), stochastic depth in convnext and swin
    (random in eval before), the ViT's attention, timm's zero-initialised batch norms (NaN
    in torchao's fusion, refused before)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    prepared = prepare_qat_pt2e(torch.export.export(build(name).train(), (x,)).module(), sq.StatQATQuantizer())
    optimizer = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(2):
        out = prepared(x)
        assert torch.isfinite(out).all(), f"{name}: non-finite QAT output"
        torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % out.shape[1]).backward()
        optimizer.step()
        optimizer.zero_grad()
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        reference = prepared(x)
        assert torch.equal(prepared(x), reference), f"{name}: eval is not deterministic"
        assert torch.equal(sq.convert(prepared)(x), reference), f"{name}: converted != prepared model in eval"


@pytest.mark.slow
def test_torch_ao_prepare_qat_fx_with_our_custom_config_keeps_swins_stochastic_depth_a_module():
    """torch's tracer bakes StochasticDepth's training branch in (swin_t random in eval, 0.58 apart);
    sq.torch_ao_prepare_custom_config(model) keeps it a module that .eval() switches."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    model = build("torchvision:swin_t").train()
    x = torch.randn(2, 3, 64, 64)
    qat = prepare_qat_fx(model, sq.statqat_qconfig, (x,), prepare_custom_config=sq.torch_ao_prepare_custom_config(model))
    qat(x)
    qat.eval()
    with torch.no_grad():
        reference = qat(x)
        assert torch.equal(qat(x), reference)
        assert torch.equal(sq.convert(qat)(x), reference)


@pytest.mark.slow
def test_torch_ao_trains_timms_zero_initialised_resnet18_with_the_exact_fold():
    """timm's resnet18 (zero_init_last: gamma 0 in each block's last batch norm) gives NaN at
    the first step under torch.ao's ConvBn2d; with sq.torch_ao_exact_zero_batch_norm_weights
    it trains, and sq.convert equals the QAT model in eval."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    model = build("timm:resnet18").train()
    x = torch.randn(4, 3, 64, 64)
    qat = prepare_qat_fx(model, sq.statqat_qconfig, (x,), prepare_custom_config=sq.torch_ao_prepare_custom_config(model))
    assert len(sq.torch_ao_exact_zero_batch_norm_weights(qat)) == 8  # layer1.0.conv2 ... layer4.1.conv2
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for _ in range(2):
        out = qat(x)
        assert torch.isfinite(out).all()
        torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % out.shape[1]).backward()
        optimizer.step()
        optimizer.zero_grad()
    qat.eval()
    with torch.no_grad():
        assert torch.equal(sq.convert(qat)(x), qat(x))
