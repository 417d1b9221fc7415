"""The first activation scales of a batch-norm network prepared for training come from
training's activations (batch statistics), not from a fresh model's eval-mode ones."""

import copy

import torch
from torch import nn

import statqat_ao as sq


def inverted_residual(cin: int, cout: int, stride: int) -> nn.Sequential:
    hidden = 4 * cin
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
        nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
    )  # fmt: skip


class MobileNetLike(nn.Module):
    """MobileNetV2's shape and init (kaiming fan_out, fresh batch norm), eight blocks deep."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        widths = [16, 24, 32, 48, 64, 96, 96, 112, 128]
        self.blocks = nn.Sequential(*[inverted_residual(a, b, 2 if i in (1, 3) else 1) for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))])
        self.head = nn.Linear(128, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_a_fresh_batch_norm_network_starts_qat_at_the_float_models_scale():
    """Before: the example forward ran batch norm in eval mode on the fresh running statistics,
    where activations are unnormalised and shrink layer by layer; training's batch-normalised
    ones were then clipped by every activation quantizer. Here the first QAT output was 0.31 of
    the float model's in size; torchvision's MobileNetV2 collapsed to 3e-9 and went NaN at step 3."""
    torch.manual_seed(0)
    model = MobileNetLike().train()
    x = torch.randn(4, 3, 32, 32)
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    float_out = copy.deepcopy(model)(x)
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,))
    # prepare left the running statistics as they were
    assert all(torch.equal(qat.state_dict()[k], v) for k, v in running.items())
    ratio = float(qat(x).std() / float_out.std())
    assert 0.7 < ratio < 1.4, ratio
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for step in range(3):
        loss = nn.functional.cross_entropy(qat(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), step
    qat.eval()
    assert torch.equal(sq.convert(qat)(x), qat(x))
