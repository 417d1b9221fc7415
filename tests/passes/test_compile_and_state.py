"""Prepared models under torch.compile(fullgraph=True), and save / load / resume."""

import copy
import io

import pytest
import torch
from helpers import MLP, digits, same_bits
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, TransformerBlock


def _cnn():
    torch.manual_seed(0)
    return sq.prepare_qat_fx(DigitsCNN(width=16), sq.statqat_qconfig, (digits()[0][:64],))


def _block():
    torch.manual_seed(0)
    return sq.prepare_qat_fx(TransformerBlock(dim=64), sq.statqat_qconfig, (torch.randn(4, 16, 64),))


def _batch(kind, step):
    g = torch.Generator().manual_seed(step)
    if kind == "cnn":
        x, y, _, _ = digits()
        idx = torch.randint(0, len(y), (64,), generator=g)
        return x[idx], y[idx]
    x = torch.randn(4, 16, 64, generator=g)
    return x, x.flip(-1)


def _loss(kind, out, target):
    return nn.functional.cross_entropy(out, target) if kind == "cnn" else nn.functional.mse_loss(out, target)


def _train(model, kind, steps, forward=None):
    forward = model if forward is None else forward
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for step in range(steps):
        x, t = _batch(kind, step)
        loss = _loss(kind, forward(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["cnn", pytest.param("block", marks=pytest.mark.slow)])
def test_no_graph_breaks_in_train_and_eval(kind):
    qat = _cnn() if kind == "cnn" else _block()
    x, _ = _batch(kind, 0)
    for training in (True, False):
        m = copy.deepcopy(qat).train(training)  # explain runs the model: keep qat's state
        explanation = torch._dynamo.explain(m)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


# Suite budget: both are in make test-slow; the fast suite keeps the no-graph-break checks
# below, the compiled fake-quant property test and the compiled output-aware QAT linears.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "block"])
def test_compiled_training_matches_eager(kind):
    eager = _cnn() if kind == "cnn" else _block()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: a break would raise
    eager_losses = _train(eager, kind, 3)
    compiled_losses = _train(compiled_model, kind, 3, forward=compiled)
    # Scale estimates are reductions, equal up to float32 summation order, so a code can
    # flip at a rounding boundary: the losses agree closely, not bit for bit.
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=5e-3, atol=1e-5)
    e_scales = {k: v for k, v in eager.state_dict().items() if k.endswith(".scale")}
    c_scales = {k: v for k, v in compiled_model.state_dict().items() if k.endswith(".scale")}
    assert e_scales.keys() == c_scales.keys() and e_scales
    for k in e_scales:
        torch.testing.assert_close(c_scales[k], e_scales[k], rtol=1e-2, atol=0, msg=k)
    # Same model, same scales: compiled eval equals eager eval up to float accumulation.
    x, _ = _batch(kind, 99)
    compiled_model.eval()
    torch.testing.assert_close(compiled(x), compiled_model(x), rtol=1e-4, atol=1e-5)


def _save(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_compiled_backward_uses_the_scale_the_forward_quantized_with():
    # The forward quantizes with the held scale and then updates it in place: the compiled
    # backward must still mask with the old one, exactly as eager autograd does.
    torch.manual_seed(0)
    fq = sq.FakeQuantizer("int4", "iterative").train()
    fq(torch.randn(4096) * 2)
    twin = copy.deepcopy(fq)
    compiled = torch.compile(twin, fullgraph=True)
    x = (torch.randn(4096) * 5).requires_grad_()  # a scale jump: the masks would differ
    x2 = x.detach().clone().requires_grad_()
    old = fq.scale.clone()
    fq(x).sum().backward()
    compiled(x2).sum().backward()
    v = x.detach() / old
    inside = ((v >= -8) & (v <= 7)).float()  # int4 codes -8..7, with the scale before the update
    assert not torch.equal(old, fq.scale)
    assert torch.equal(x.grad, inside) and torch.equal(x2.grad, inside)


@pytest.mark.parametrize("kind", ["cnn", "block"])
def test_save_load_and_resume_give_identical_outputs(kind):
    trained = _cnn() if kind == "cnn" else _block()
    _train(trained, kind, 3)
    state = torch.load(_save(trained.state_dict()), weights_only=True)
    assert any(k.endswith(".scale") for k in state) and any(k.endswith("_extra_state") for k in state)

    torch.manual_seed(123)  # a fresh model with other weights, prepared without data
    fresh_float = DigitsCNN(width=16) if kind == "cnn" else TransformerBlock(dim=64)
    resumed = sq.prepare_qat_fx(fresh_float, sq.statqat_qconfig)
    resumed.load_state_dict(state)
    x, _ = _batch(kind, 50)
    assert same_bits(resumed.eval()(x), trained.eval()(x))
    # Resume: the next training steps are the same as continuing the original.
    continued = _train(trained, kind, 2)
    again = _train(resumed, kind, 2)
    assert continued == again
    assert same_bits(resumed.eval()(x), trained.eval()(x))


def test_loaded_uninitialised_quantizer_stays_uninitialised():
    qat = sq.prepare_qat_fx(MLP(), sq.statqat_qconfig)  # activations never saw data
    other = sq.prepare_qat_fx(MLP(), sq.statqat_qconfig)
    other.load_state_dict(torch.load(_save(qat.state_dict()), weights_only=True))
    assert not other.fc1.input_fake_quant.is_initialized
    assert other.fc1.weight_fake_quant.is_initialized


def test_prepared_models_pickle_whole_with_future_annotations():
    # models.py uses `from __future__ import annotations`: fx keeps those annotations as
    # strings its generated code cannot import, and the BN fold must stay one call when
    # fx re-traces the code on load. (Converted models: statqat_ao.tools.saved_model, because
    # fx's re-trace folds the weight dequantize of constant codes into a float constant.)
    x = digits()[2][:16]
    prepared = sq.prepare_qat_fx(DigitsCNN(), sq.statqat_qconfig, (digits()[0][:64],))
    for model in (prepared,):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        targets = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
        assert targets == [n.target for n in model.graph.nodes if n.op == "call_function"]
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_compiling_right_after_prepare_traces_the_training_step_once():
    # The README's flow: torch.compile straight after prepare. A buffer that changed shape
    # at the first step (the output-aware input moments did) re-traced the whole graph.
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    x, y = digits()[:2]
    qat = sq.prepare_qat_fx(DigitsCNN(), sq.statqat_qconfig, (x[:64],))
    counter = CompileCounter()
    step = torch.compile(qat, backend=counter, fullgraph=True)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for i in range(3):
        loss = nn.functional.cross_entropy(step(x[64 * i : 64 * (i + 1)]), y[64 * i : 64 * (i + 1)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert counter.frame_count == 1
