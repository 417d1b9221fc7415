"""Exact resume: a QAT run checkpointed mid-way (model, optimizer, estimator state, RNG)
and resumed gives the same losses and scales as the uninterrupted run."""

import io

import pytest
import torch
from helpers import digits
from torch import nn

import statqat_ao as sq


class DropoutMLP(nn.Module):  # dropout: the resumed run must restore the RNG too
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x.flatten(1)))))


QCONFIGS = {
    "statqat": sq.statqat_qconfig,
    "iterative-fp4-g16": sq.get_statqat_qconfig("fp4_e2m1", "int8", weight_granularity=16, weight_method="iterative"),
    "lsq": sq.get_statqat_qconfig("int4", "int8", weight_method="lsq", activation_method="lsq"),
}


def _fresh(qconfig):
    torch.manual_seed(0)
    model = sq.prepare_qat_fx(DropoutMLP(), qconfig)  # scales come from the first batch
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _steps(model, opt, data_gen, n):
    x, y, _, _ = digits()
    model.train()
    losses = []
    for _ in range(n):
        idx = torch.randint(0, len(y), (64,), generator=data_gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _scales(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("scale", "zero_point"))}


@pytest.mark.parametrize("name", list(QCONFIGS))
def test_resumed_run_equals_the_uninterrupted_run(name):
    model, opt = _fresh(QCONFIGS[name])
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    straight = _steps(model, opt, gen, 8)
    straight_scales = _scales(model)

    model, opt = _fresh(QCONFIGS[name])
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    first = _steps(model, opt, gen, 4)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "data_rng": gen.get_state()},
        buffer,
    )
    del model, opt
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = _fresh(QCONFIGS[name])
    torch.manual_seed(999)  # the resumed process starts elsewhere; the checkpoint restores it
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    gen = torch.Generator()
    gen.set_state(checkpoint["data_rng"])
    rest = _steps(resumed, resumed_opt, gen, 4)

    assert first + rest == straight
    resumed_scales = _scales(resumed)
    assert resumed_scales.keys() == straight_scales.keys()
    assert all(torch.equal(resumed_scales[k], straight_scales[k]) for k in straight_scales)


def test_lsq_activation_scales_train_when_the_optimizer_predates_the_first_forward():
    model, opt = _fresh(QCONFIGS["lsq"])  # activations initialise at the first forward
    x, y, _, _ = digits()
    nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    initial = model.fc1.input_fake_quant.scale.detach().clone()
    opt.step()
    assert any(p is model.fc1.input_fake_quant.scale for g in opt.param_groups for p in g["params"])
    assert not torch.equal(model.fc1.input_fake_quant.scale.detach(), initial)
