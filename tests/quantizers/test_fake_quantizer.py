"""The online FakeQuantizer module: statistics per training step, frozen in eval, compiled."""

import copy

import pytest
import torch

import statqat_ao as sq
from statqat_ao.tools.cli import main as cli_main


def test_analytic_weight_scale_matches_the_estimator_every_step():
    fq = sq.FakeQuantizer("int4", "analytic", "channel").train()
    for _ in range(3):
        w = torch.randn(16, 64)
        fq(w)
        s, _ = sq.estimate_qparams(w, "int4", "analytic", "channel")
        torch.testing.assert_close(fq.scale, s)


def test_iterative_warm_start_takes_one_step_per_forward():
    torch.manual_seed(0)
    fq = sq.FakeQuantizer("int8", "iterative", "tensor").train()
    x = torch.randn(64, 32) * 3
    fq(x)  # cold start: full iterative estimate
    cold = fq.scale.clone()
    torch.testing.assert_close(cold, sq.estimate_qparams(x, "int8", "iterative")[0])
    y = x * 2
    fq(y)
    blocks = y.reshape(1, -1)
    expected = sq.estimators.least_squares_step(blocks, cold.reshape(1), torch.zeros(1), sq.get_format("int8"))
    torch.testing.assert_close(fq.scale.reshape(1), expected)


def test_eval_freezes_statistics_and_disabling_flags():
    fq = sq.FakeQuantizer("int4", "analytic", "channel").train()
    fq(torch.randn(8, 32))
    frozen = fq.scale.clone()
    fq.eval()
    fq(torch.randn(8, 32) * 10)
    assert torch.equal(fq.scale, frozen)
    fq.fake_quant_enabled = False
    x = torch.randn(8, 32)
    assert torch.equal(fq(x), x)


@pytest.mark.parametrize("fmt,gran,method", [("int4", "channel", "analytic"), ("nvfp4", None, "iterative"), ("mxfp4", None, "analytic")])
def test_compiled_training_steps_match_eager(fmt, gran, method):
    torch.manual_seed(0)
    eager = sq.FakeQuantizer(fmt, method, gran).train()
    compiled_mod = sq.FakeQuantizer(fmt, method, gran).train()
    xs = [torch.randn(16, 64) for _ in range(3)]
    eager(xs[0])
    compiled_mod(xs[0])  # first step (cold start) eagerly, like an init
    torch._dynamo.reset()
    # explain runs a step, so it gets a copy of the module
    assert torch._dynamo.explain(copy.deepcopy(compiled_mod))(xs[1]).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(compiled_mod, fullgraph=True)
    for x in xs[1:]:
        torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(compiled_mod.scale, eager.scale)


def test_a_nan_batch_does_not_corrupt_the_scale():
    fq = sq.FakeQuantizer("int8", "analytic", "channel", nonfinite="skip").train()
    fq(torch.randn(4, 32))
    good = fq.scale.clone()
    bad = torch.randn(4, 32)
    bad[1, 3] = float("nan")
    out = fq(bad)
    assert torch.isnan(out[1, 3])  # the NaN stays visible in the output (and the loss)
    assert torch.equal(fq.scale, good)  # the whole batch is skipped, not just the NaN's block
    fq(torch.zeros(4, 32))  # all-zero blocks: finite scale, exact zeros
    assert torch.isfinite(fq.scale).all() and (fq.scale > 0).all()


def test_bad_method_and_asymmetric_float():
    with pytest.raises(ValueError, match="online method"):
        sq.FakeQuantizer("int4", "mse")
    with pytest.raises(ValueError, match="asymmetric quantization needs an INT format"):
        sq.FakeQuantizer("fp4_e2m1", symmetric=False)


def test_cli_formats(capsys):
    # (`statqat demo` runs end to end in tests/tools/test_demo.py.)
    assert cli_main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "fp4_e2m1" in out and "nvfp4" in out


@pytest.mark.parametrize("method", ["iterative", "analytic", "minmax"])
def test_shared_operands_are_estimated_jointly(method):
    torch.manual_seed(0)
    fq = sq.FakeQuantizer("int8", method).train()
    a, b = torch.randn(8, 16), torch.randn(8, 16) * 4
    qa, qb = fq(a, b)  # cold: one joint estimate
    both = torch.cat([a.reshape(-1), b.reshape(-1)])
    torch.testing.assert_close(fq.scale, sq.estimate_qparams(both, "int8", method)[0])
    assert torch.equal(qa, sq.fake_quantize(a, fq.scale, None, "int8"))
    held = fq.scale.clone()
    c, d = torch.randn(8, 16) * 2, torch.randn(8, 16)
    qc, _ = fq(c, d)  # warm: quantized with the held scale, then updated from both
    assert torch.equal(qc, sq.fake_quantize(c, held, None, "int8"))
    joint = torch.cat([c.reshape(-1), d.reshape(-1)]).unsqueeze(0)
    if method == "iterative":
        expected = sq.estimators.least_squares_step(joint, held.reshape(1), torch.zeros(1), sq.get_format("int8"))
    else:
        expected = sq.estimate_qparams(joint, "int8", method)[0]
    torch.testing.assert_close(fq.scale.reshape(1), expected.reshape(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt, granularity", [("int4", "channel"), ("fp4_e2m1", 16), ("int8", "tensor")])
def test_octav_online_scale_equals_the_octav_estimator(fmt, granularity):
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    fq = sq.FakeQuantizer(fmt, "octav", granularity)
    fq(x)
    s, _ = sq.estimate_qparams(x, fmt, method="octav", granularity=granularity)
    assert torch.equal(fq.scale, s)
    with pytest.raises(ValueError, match="symmetric quantizers only"):
        sq.FakeQuantizer("int4", "octav", symmetric=False)
