"""The estimator registry: a method registered in one place works everywhere a method name does."""

import pytest
import torch

import statqat_ao as sq
from statqat_ao.estimators import ESTIMATORS, Estimator, get_estimator, online_methods, register
from statqat_ao.estimators.registry import each_step
from statqat_ao.numerics.block_stats import reduce_blocks


def half_range_qparams(x, fmt, symmetric):
    """A toy method: clip at half the block's max |x| (obviously not a good one)."""
    _, maxima = reduce_blocks(maxima=[x.abs()])
    s = maxima[0] / 2 / fmt.qmax
    return s, torch.zeros_like(s)


@pytest.fixture
def half_range():
    est = register(Estimator("half_range", half_range_qparams, online=each_step(half_range_qparams)))
    try:
        yield est
    finally:
        del ESTIMATORS["half_range"]


def test_a_registered_method_runs_offline_and_online(half_range):
    w = torch.randn(8, 64)
    expected = w.abs().amax(dim=1, keepdim=True) / 2 / 7  # int4: qmax 7
    s, zp = sq.estimate_qparams(w, "int4", "half_range", "channel")
    assert torch.allclose(s, expected, rtol=1e-6) and torch.equal(zp, torch.zeros_like(zp))
    assert "half_range" in online_methods()
    fq = sq.FakeQuantizer("int4", "half_range", "channel")
    fq(w)
    assert torch.allclose(fq.scale, expected, rtol=1e-6)
    qconfig = sq.get_statqat_qconfig(weight="int4", weight_method="half_range", activation=None)
    assert qconfig.for_module("fc", torch.nn.Linear(4, 4)).weight.method == "half_range"


def test_offline_only_methods_are_refused_per_step():
    assert get_estimator("mse").online is None and "mse" not in online_methods()
    with pytest.raises(ValueError, match=r"online method must be one of .*'mse'"):
        sq.FakeQuantizer("int4", "mse")


def test_names_are_registered_once_and_unknown_names_list_the_known():
    with pytest.raises(ValueError, match="registered already"):
        register(Estimator("analytic", half_range_qparams))
    with pytest.raises(ValueError, match="unknown method 'gptq'; known methods: minmax, analytic, iterative"):
        get_estimator("gptq")


def test_symmetric_only_methods_refuse_asymmetric_quantizers():
    assert get_estimator("octav").symmetric_only
    with pytest.raises(ValueError, match="octav estimates symmetric quantizers only"):
        sq.FakeQuantizer("int4", "octav", symmetric=False)
