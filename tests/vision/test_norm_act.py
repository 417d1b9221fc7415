"""timm's BatchNormAct2d (batch norm with its activation inside) through the graph pass."""

import warnings

import pytest
import torch
from statqat_ao.passes.fold_bn import FoldedBatchNorm
from test_zoo import SKIP_REASON, timm
from torch import nn

import statqat_ao as sq

pytestmark = pytest.mark.skipif(timm is None, reason=SKIP_REASON)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    with torch.no_grad():  # running statistics unlike a batch's, so train and eval differ
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def test_batch_norm_act_folds_and_switches_with_the_model():
    model = _model().train()
    x = torch.randn(8, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # before: "BatchNorm after a conv, not folded"
        qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    assert isinstance(qat.get_submodule("1"), FoldedBatchNorm)
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var"} <= set(qat.state_dict())
    # Quantization off, the prepared model is the float one, in both modes (the activation
    # included): before, the trace baked batch statistics into eval too.
    qat.apply(torch.ao.quantization.disable_fake_quant)
    for mode in (False, True):
        qat.train(mode)
        model.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(qat(x), model(x), rtol=1e-4, atol=1e-5)
    qat.apply(torch.ao.quantization.enable_fake_quant)
    qat.train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for _ in range(2):
        qat(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    converted = sq.convert(qat)
    qat.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), qat(x))
