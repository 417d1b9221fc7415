"""Functional dropout (``F.dropout(x, p, training=self.training)`` in a forward that holds
layers, as timm's ghostnet head does) stays switchable through every fx entry point: the
trace would otherwise bake the trace-time flag in, and the prepared model would drop out
in eval (or never in training)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from statqat_ao.passes.train_only_dropout import dropout_calls_as_modules
from torch import fx, nn

import statqat_ao as sq


class HeadWithDropout(nn.Module):
    """A conv body and a head that call dropout functions on ``self.training``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.dropout2d(torch.relu(self.conv(x)), 0.25, training=self.training)
        x = x.mean((2, 3))
        return self.fc(F.dropout(x, p=0.5, training=self.training))


def _baked_calls(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and "dropout" in str(n.target)]


def _drops_out(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return not torch.equal(model(x), model(x))


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(16, 3, 8, 8)


def test_sq_prepare_makes_dropout_calls_modules_that_follow_train_and_eval(x):
    torch.manual_seed(0)
    qat = sq.prepare_qat_fx(HeadWithDropout().train(), sq.statqat_qconfig, (x,))
    assert _baked_calls(qat) == []
    assert sorted(type(m).__name__ for m in qat.modules() if isinstance(m, nn.modules.dropout._DropoutNd)) == [
        "Dropout",
        "Dropout2d",
    ]
    qat(x).sum().backward()
    assert _drops_out(qat, x)  # training still drops out
    qat.eval()
    assert not _drops_out(qat, x)  # eval is deterministic (it was random before)
    with torch.no_grad():
        assert torch.equal(sq.convert(qat.train())(x), qat.eval()(x))


def test_a_model_traced_in_eval_still_drops_out_in_training(x):
    qat = sq.prepare_qat_fx(HeadWithDropout().eval(), sq.statqat_qconfig, (x,))
    qat.train()
    qat(x)
    assert _drops_out(qat, x)  # the trace saw training=False; .train() switches it back on


def test_a_flag_written_as_the_other_literal_stays():
    class Literal(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.5, training=False) + F.dropout(x, 0.5, self.training)

    gm = fx.symbolic_trace(Literal().train())
    assert dropout_calls_as_modules(gm, traced_training=True) == ["dropout_1"]
    assert _baked_calls(gm) == ["dropout"]  # always off, as written


def test_torch_ao_finish_prepare_makes_the_baked_dropout_modules(x):
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    qat = prepare_qat_fx(HeadWithDropout().train(), sq.statqat_qconfig, (x,))
    assert len(_baked_calls(qat)) == 2  # torch's tracer bakes training=True in
    assert sorted(sq.torch_ao_finish_prepare(qat)["dropout_modules"]) == ["dropout", "dropout2d"]
    qat(x).sum().backward()
    assert _drops_out(qat, x)
    qat.eval()
    assert not _drops_out(qat, x)
    with torch.no_grad():
        assert torch.equal(sq.convert(qat)(x), qat(x))


def test_convert_removes_a_baked_dropout_and_says_how_to_keep_train_equal_to_deploy(x):
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    qat = prepare_qat_fx(HeadWithDropout().train(), sq.statqat_qconfig, (x,))
    qat(x)
    qat.eval()
    assert _drops_out(qat, x)  # without the fix: random in eval
    with pytest.warns(UserWarning, match=r"2 dropout call\(s\).*sq\.torch_ao_finish_prepare"):
        converted = sq.convert(qat)
    assert _baked_calls(converted) == []
    assert not _drops_out(converted, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing baked left: a second convert is silent
        sq.torch_ao_finish_prepare(qat)
        sq.convert(qat)

