"""Stochastic depth (torchvision) and drop path (timm) through PT2E: random in training only."""

import copy

import pytest
import torch
from torch import nn
from torchao.quantization.pt2e import move_exported_model_to_eval
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

import statqat_ao as sq
from statqat_ao.frontends.pt2e_stochastic_depth import TrainOnlyBernoulli
from statqat_ao.models.vision import NOT_INSTALLED as SKIP_REASON
from statqat_ao.models.vision import import_vision

torchvision, timm = import_vision()
pytestmark = pytest.mark.skipif(torchvision is None, reason=SKIP_REASON)


class ResidualDrops(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers import DropPath
        from torchvision.ops import StochasticDepth

        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.branch1, self.branch2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.row_drop, self.drop_path = StochasticDepth(0.5, "row"), DropPath(0.5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x + self.row_drop(self.branch1(x))
        return x + self.drop_path(self.branch2(x))


def test_masks_are_drawn_in_training_and_are_one_in_eval():
    torch.manual_seed(0)
    model = ResidualDrops().train()
    x = torch.randn(8, 3, 8, 8)
    prepared = prepare_qat_pt2e(torch.export.export(model, (x,)).module(), sq.StatQATQuantizer())
    assert sum(isinstance(m, TrainOnlyBernoulli) for m in prepared.modules()) == 2
    prepared(x)  # statistics and batch norm in training
    with torch.no_grad():
        assert not torch.equal(prepared(x), prepared(x))  # training keeps the regularizer random
    move_exported_model_to_eval(prepared)
    with torch.no_grad():
        reference = prepared(x)
        assert torch.equal(prepared(x), reference)
        assert torch.equal(sq.convert(copy.deepcopy(prepared))(x), reference)
        # with the quantizers off, eval is the float model's eval: every mask is 1
        for m in prepared.modules():
            if isinstance(m, sq.frontends.pt2e.StatQATPT2EFakeQuantize):
                m.disable_fake_quant()
        model.load_state_dict({k: v for k, v in prepared.state_dict().items() if k in model.state_dict()})
        torch.testing.assert_close(prepared(x), model.eval()(x), rtol=1e-4, atol=1e-5)
