"""The bad-input catalogue: every row of RELIABILITY.md's table, tried.

Each test is named after its row. What must never happen: a NaN or non-positive scale,
an Inf produced by the quantizer itself, a silent change of what the model computes, or
an error that does not say which module or tensor and what to do.
"""

import copy

import pytest
import torch
from torch import nn

import statqat_ao as sq
from statqat_ao.estimators import ESTIMATORS, online_methods
from statqat_ao.models import load_digits_split
from statqat_ao.quantizers.nonfinite import (
    NonFiniteError,
    check_finite,
    nonfinite_report,
    set_policy,
)

ONLINE_METHODS = online_methods()

FORMATS = ["int4", "int8", "fp4_e2m1", "nf4", "fp8_e4m3"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def digits():
    x, y, _, _ = load_digits_split()
    return x.flatten(1), y


def prepared_mlp(qconfig=None, seed=0):
    """The MLP prepared with ``qconfig`` (default: INT4 analytic weights, INT8 activations)."""
    torch.manual_seed(seed)
    qconfig = qconfig or sq.get_statqat_qconfig("int4", "int8", weight_method="analytic")
    return sq.prepare_qat_fx(MLP().train(), qconfig, example_inputs=(torch.randn(4, 64),))


def step(model, opt, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def scales(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("scale", "zero_point"))}


# --- NaN and Inf during training --------------------------------------------------------


def test_nan_in_weights_raises_naming_the_module_and_step(digits):
    x, y = digits
    model = prepared_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(3):
        step(model, opt, x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32])
    with torch.no_grad():
        model.fc2.weight[3, 5] = float("nan")
    before = model.fc2.weight_fake_quant.scale.clone()
    with pytest.raises(NonFiniteError, match=r"'fc2\.weight_fake_quant' saw 1 NaN and 0 Inf .* weight at statistics update 3"):
        model(x[:32])
    assert torch.equal(model.fc2.weight_fake_quant.scale, before)  # never a NaN scale


def test_inf_in_activations_raises_naming_the_module_and_step(digits):
    x, y = digits
    model = prepared_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step(model, opt, x[:32], y[:32])
    bad = x[:32].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"'fc1\.input_fake_quant' saw 0 NaN and 1 Inf .* input at statistics update 1"):
        model(bad)


@pytest.mark.parametrize("flow", ["torch.ao prepare_qat_fx", "torchao PT2E"])
def test_nan_under_torch_flows_names_the_quantizer_after_name_quantizers(flow):
    example = (torch.randn(4, 64),)
    if flow == "torchao PT2E":
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        model = prepare_qat_pt2e(torch.export.export(MLP().train(), example).module(), sq.StatQATQuantizer())
    else:
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        model = prepare_qat_fx(MLP().train(), sq.statqat_qconfig, example)
    sq.nonfinite.name_quantizers(model)
    model(torch.randn(4, 64))
    bad = torch.randn(4, 64)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"quantizer 'activation_post_process_0' saw 1 NaN .* input at statistics update 1"):
        model(bad)


def test_nan_in_lsq_activations_raises_before_its_scale_gets_a_nan_gradient():
    qconfig = sq.get_statqat_qconfig("int4", "int8", weight_method="lsq", activation_method="lsq")
    model = prepared_mlp(qconfig)
    model(torch.randn(4, 64))
    with pytest.raises(NonFiniteError, match=r"'fc1\.input_fake_quant' saw 64 NaN"):
        model(torch.full((4, 64), float("nan")).index_fill_(0, torch.tensor([1, 2, 3]), 0.0))


def test_skip_policy_keeps_the_scales_that_saw_nan_and_training_goes_on(digits):
    """With nonfinite='skip' and a loop that skips the optimizer step on a NaN loss, the
    quantizers that saw the NaN keep their scales bit for bit and training continues,
    tracking a run that never saw the bad batch. (Not bit for bit: the weight quantizers
    upstream of nothing bad took their usual update on the skipped forward, and a
    training forward quantizes with the scale from the forward before.)"""
    x, y = digits
    batches = [(x[i * 64 : (i + 1) * 64], y[i * 64 : (i + 1) * 64]) for i in range(8)]
    poisoned = batches[0][0].clone()
    poisoned[5, 7] = float("nan")

    def run(with_bad_batch):
        model = set_policy(prepared_mlp(), "skip")
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        losses = []
        for i, (xb, yb) in enumerate(batches):
            if i == 3:
                if with_bad_batch:
                    before = scales(model)
                    loss = nn.functional.cross_entropy(model(poisoned), batches[0][1])
                    assert not torch.isfinite(loss)
                    opt.zero_grad()  # the documented skip: no backward, no optimizer step
                    after = scales(model)
                    for name in ("fc1.input_fake_quant.scale", "fc2.input_fake_quant.scale"):
                        assert torch.equal(after[name], before[name]), name
                continue
            losses.append(step(model, opt, xb, yb).item())
        return losses, model

    clean, _ = run(False)
    losses, model = run(True)
    assert losses[:3] == clean[:3]
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(clean), rtol=0.02, atol=0)
    assert all(torch.isfinite(v).all() and (v > 0).all() for k, v in scales(model).items() if k.endswith("scale"))
    assert nonfinite_report(model) == {"fc1.input_fake_quant": [3, 1], "fc2.input_fake_quant": [3, 1]}
    with pytest.raises(NonFiniteError, match=r"'fc1\.input_fake_quant' saw NaN or Inf first, at statistics update 3"):
        check_finite(model)


def test_a_skipped_nan_batch_leaves_folded_batch_norm_statistics_alone():
    """prepare folds BN into the conv weight through the running variance, so a NaN
    running variance would poison every later step: a non-finite batch does not update it."""
    from statqat_ao.models import DigitsCNN

    x, _, _, _ = load_digits_split()
    model = set_policy(sq.prepare_qat_fx(DigitsCNN(), sq.statqat_qconfig, (x[:64],)), "skip").train()
    model(x[:64])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert stats
    poisoned = x[64:128].clone()
    poisoned[3, 0, 3, 3] = float("nan")
    model(poisoned)
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items() if "running" in k)
    assert torch.isfinite(model(x[128:192])).all()  # the next batch trains as before


def test_compiled_training_records_and_check_finite_names_the_module():
    torch._dynamo.reset()
    fq = sq.FakeQuantizer("int4", "analytic", "channel")
    model = sq.nonfinite.name_quantizers(nn.ModuleDict({"w_fq": fq}))
    compiled = torch.compile(lambda w: model["w_fq"](w), fullgraph=True, backend="aot_eager")
    w = torch.randn(8, 32)
    compiled(w)
    s = fq.scale.clone()
    bad = w.clone()
    bad[2, 2] = float("nan")
    out = compiled(bad)  # no data-dependent raise inside a compiled graph: recorded instead
    assert torch.isnan(out[2, 2]) and torch.equal(fq.scale, s)
    with pytest.raises(NonFiniteError, match=r"'w_fq' saw NaN or Inf first, at statistics update 1"):
        check_finite(model)


def test_converting_a_nan_weight_raises_naming_it():
    model = prepared_mlp()
    model(torch.randn(8, 64))
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(sq.ConvertError, match=r"'fc1\.weight_quant' holds 1 NaN"):
        sq.convert(model.eval())


def test_nan_stays_nan_through_every_grid():
    x = torch.tensor([float("nan"), 1.0, -1.0])
    for fmt in sq.known_formats():
        if sq.get_format(fmt).is_block_format:
            continue
        assert torch.isnan(sq.fake_quantize(x, torch.tensor(0.5), None, fmt)[0]), fmt


# --- degenerate blocks and extreme magnitudes ------------------------------------------


@pytest.mark.parametrize("method", ONLINE_METHODS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_and_constant_blocks(method, fmt):
    w = torch.zeros(4, 32)
    w[1], w[2], w[3] = 0.37, -2.5, 1e-3
    fq = sq.FakeQuantizer(fmt, method, "channel")
    out = fq(w)
    assert torch.isfinite(fq.scale).all() and (fq.scale > 0).all()
    assert torch.equal(out[0], w[0])  # zeros are exact
    grid = sq.get_format(fmt).grid_tensor()
    for row in (1, 2, 3):
        v = (w[row, 0] / fq.scale[row, 0]).item()
        gaps = torch.diff(grid)
        i = int(torch.searchsorted(grid, torch.tensor(v)).clamp(1, len(grid) - 1))
        half_step = gaps[i - 1].item() / 2 * fq.scale[row, 0].item()
        assert (out[row] - w[row]).abs().max() <= half_step * (1 + 1e-4), (row, method)
    if method in ("analytic", "iterative") and fmt != "fp8_e4m3":
        # The error model with sigma = 0 puts the clip at the value itself: exact.
        assert torch.equal(out, w)


@pytest.mark.parametrize("method", ONLINE_METHODS)
@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "nf4"])
def test_denormal_tensors_flush_to_zero_with_a_finite_scale(method, fmt):
    w = torch.randn(4, 32) * 1e-40
    assert (w.abs() < torch.finfo(torch.float32).tiny).all() and (w != 0).any()
    fq = sq.FakeQuantizer(fmt, method, "tensor")
    out = fq(w)
    assert torch.isfinite(fq.scale).all() and fq.scale.item() >= torch.finfo(torch.float32).tiny
    assert torch.equal(out, torch.zeros_like(w))


@pytest.mark.parametrize("method", [*ONLINE_METHODS, "mse"])
@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "nf4", "int8"])
def test_values_near_float32_max(method, fmt):
    """Sums of squares overflow float32 here; the scale falls back to MinMax's, and the
    dequantized grid is capped below float32's max: finite output, MinMax-level error."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    w = w / w.abs().max() * 3.3e38
    if method == "mse":
        s, zp = sq.estimate_qparams(w, fmt, method)
        out = sq.fake_quantize(w, s, zp, fmt)
    else:
        fq = sq.FakeQuantizer(fmt, method, "tensor")
        out = fq(w)
        s = fq.scale
    assert torch.isfinite(s).all() and torch.isfinite(out).all()
    w64, ref = w.double(), sq.fake_quantize(w / 2.0**100, *sq.estimate_qparams(w / 2.0**100, fmt, "minmax"), fmt).double() * 2.0**100
    err, ref_err = (out.double() - w64).norm(), (ref - w64).norm()
    assert err <= ref_err * 1.5, (err / ref_err).item()


@pytest.mark.parametrize("method", ONLINE_METHODS)
@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "nf4", "int8", "fp8_e5m2", "mxfp4", "nvfp4"])
def test_fp16_near_its_max_never_overflows_to_inf(method, fmt):
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    w = (w / w.abs().max() * 65000).half()
    f = sq.get_format(fmt)
    granularity = f.block_size or "tensor"
    fq = sq.FakeQuantizer(fmt, method, granularity)
    out = fq(w)
    offline_s, offline_zp = sq.estimate_qparams(w, fmt, method, granularity)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.isfinite(sq.fake_quantize(w, offline_s, offline_zp, fmt)).all()
    # Every grid point is finite in fp16, not only the ones this batch used.
    top = f.grid_tensor().abs().max()
    assert (top * fq.scale <= 65504).all() and (top * offline_s <= 65504).all()


def test_eval_mode_keeps_nan_and_saturates_inf_without_a_check():
    """With statistics frozen nothing is estimated, so nothing is checked (no sync in
    inference): NaN stays NaN and +-Inf saturate to the grid's ends, as QuantizeLinear does."""
    for fmt in ["int8", "fp4_e2m1", "nf4", "fp8_e4m3"]:
        fq = sq.FakeQuantizer(fmt, "analytic")
        fq(torch.randn(64))
        fq.eval()
        out = fq(torch.tensor([float("inf"), float("-inf"), float("nan")]))
        top, bottom = (sq.get_format(fmt).grid_tensor()[[-1, 0]] * fq.scale).tolist()
        assert out[0].item() == pytest.approx(top) and out[1].item() == pytest.approx(bottom) and torch.isnan(out[2])


def test_fp16_activations_that_overflow_raise_naming_the_module():
    qconfig = sq.get_statqat_qconfig("int8", "int8", activation_method="analytic")
    model = prepared_mlp(qconfig).half()
    x = torch.randn(4, 64).half()
    model(x)
    with torch.no_grad():
        model.fc1.weight.mul_(4000)  # fc1's output overflows fp16: Inf into fc2's input quantizer
    model(x * 100)  # a training forward quantizes with the scales it holds, then updates them
    with pytest.raises(NonFiniteError, match=r"'fc2\.input_fake_quant' saw 0 NaN and \d+ Inf"):
        model(x * 100)


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_bf16_inputs_get_the_float32_statistics_of_their_values(method):
    w = torch.randn(16, 64).bfloat16()
    fq16, fq32 = sq.FakeQuantizer("int4", method, "channel"), sq.FakeQuantizer("int4", method, "channel")
    out = fq16(w)
    fq32(w.float())
    assert out.dtype == torch.bfloat16
    assert torch.equal(fq16.scale, fq32.scale)


# --- float64 inputs ---------------------------------------------------------------------

FLOAT64_FORMATS = ["int4", "int8", "fp4_e2m1", "nf4", "fp8_e4m3", "mxfp4", "nvfp4"]


def relative_gap(a, b):
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


FLOAT64_CASES = [
    (fmt, g)
    for fmt in FLOAT64_FORMATS
    for g in ([None] if sq.get_format(fmt).is_block_format else ["tensor", "channel", 32])  # MX / NV: own blocks
]


@pytest.mark.parametrize("method", list(ESTIMATORS))
@pytest.mark.parametrize(("fmt", "granularity"), FLOAT64_CASES)
def test_float64_tensors_get_the_float32_scale_of_their_values(method, fmt, granularity):
    """Before: every method raised 'value cannot be converted to type float without
    overflow' from cap_scale, which clamped a float32 scale with float64's cap."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.float64) * 3
    s64, zp64 = sq.estimate_qparams(x, fmt, method, granularity)
    s32, zp32 = sq.estimate_qparams(x.float(), fmt, method, granularity)
    assert s64.dtype == torch.float32 and s64.shape == s32.shape
    assert relative_gap(s64, s32) <= 1e-6 and torch.equal(zp64, zp32)
    out = sq.fake_quantize(x, s64, zp64, fmt)
    assert out.dtype == torch.float64
    assert torch.equal(out, sq.fake_quantize(x.float(), s32, zp32, fmt).double())


@pytest.mark.parametrize("method", ONLINE_METHODS)
@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "nvfp4"])
def test_a_fake_quantizer_fed_float64_trains_like_float32(method, fmt):
    torch.manual_seed(0)
    granularity = sq.get_format(fmt).block_size or "channel"
    fq64, fq32 = sq.FakeQuantizer(fmt, method, granularity), sq.FakeQuantizer(fmt, method, granularity)
    for _ in range(3):
        w = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
        out = fq64(w)
        fq32(w.detach().float())
        assert out.dtype == torch.float64
        out.sum().backward()
        assert w.grad.dtype == torch.float64
        assert relative_gap(fq64.scale, fq32.scale) <= 1e-6


def test_a_float64_model_prepares_trains_and_converts(digits):
    x, y = digits
    model = prepared_mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(3):
        loss = step(model, opt, x[64 * i : 64 * (i + 1)].double(), y[64 * i : 64 * (i + 1)])
        assert loss.dtype == torch.float64 and torch.isfinite(loss)
    model.eval()
    expected = model(x[:64].double())
    assert torch.equal(sq.convert(model)(x[:64].double()), expected)


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_float64_values_beyond_float32_range_are_refused_by_name(method):
    x = torch.randn(4, 32, dtype=torch.float64)
    x[1, 3] = 1e300
    with pytest.raises(ValueError, match=r"layer.weight holds 1 float64 values beyond float32's range.*Rescale"):
        sq.estimate_qparams(x, "int4", method, name="layer.weight")


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_a_fake_quantizer_refuses_float64_values_beyond_float32_range(method):
    fq = sq.FakeQuantizer("int4", method, "tensor")
    fq(torch.randn(4, 32, dtype=torch.float64))
    before = fq.scale.clone()
    big = torch.randn(4, 32, dtype=torch.float64)
    big[0, 0] = -1e200
    with pytest.raises(NonFiniteError, match=r"0 NaN and 0 Inf values and 1 float64 values beyond float32's range"):
        fq(big)
    assert torch.equal(fq.scale, before)
    fq.nonfinite = "skip"
    fq(big)
    assert torch.equal(fq.scale, before) and int(fq.nonfinite_updates) == 2


@pytest.mark.parametrize("method", [*ONLINE_METHODS, "mse"])
def test_float64_near_float32_max_and_below_float32_tiny(method):
    """Within float32's range the float32 rows hold: near its max, finite scales and output;
    below its smallest normal, zeros with a finite scale (as float32 denormals flush)."""
    torch.manual_seed(0)
    w = torch.randn(8, 64, dtype=torch.float64)
    near_max = w / w.abs().max() * 3.3e38
    tiny = w * 1e-300
    for x in (near_max, tiny):
        if method == "mse":
            s, zp = sq.estimate_qparams(x, "int4", method)
            out = sq.fake_quantize(x, s, zp, "int4")
        else:
            fq = sq.FakeQuantizer("int4", method, "tensor")
            out, s = fq(x), fq.scale
        assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(tiny))


# --- batch shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_empty_batch_passes_through_and_changes_nothing(method):
    fq = sq.FakeQuantizer("int8", method).train()
    cold = fq(torch.randn(0, 16))
    assert cold.shape == (0, 16) and not fq.is_initialized
    fq(torch.randn(8, 16))
    s, updates = fq.scale.clone(), int(fq.updates)
    assert fq(torch.randn(0, 16)).shape == (0, 16)
    assert torch.equal(fq.scale, s) and int(fq.updates) == updates


def test_empty_batch_through_a_prepared_model():
    model = prepared_mlp()
    before = scales(model)
    assert model(torch.randn(0, 64)).shape == (0, 10)
    assert all(torch.equal(before[k], v) for k, v in scales(model).items())


def test_batch_and_sequence_lengths_may_change_between_steps():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x)

    model = sq.prepare_qat_fx(Tokens().train(), sq.statqat_qconfig, example_inputs=(torch.randn(2, 5, 16),))
    for shape in [(2, 5, 16), (7, 3, 16), (1, 11, 16)]:
        assert model(torch.randn(shape)).shape == shape


def test_a_per_channel_quantizer_whose_channel_count_changes_raises_naming_it():
    fq = sq.FakeQuantizer("int4", "analytic", "channel", axis=1)
    model = sq.nonfinite.name_quantizers(nn.ModuleDict({"act_fq": fq}))
    model["act_fq"](torch.randn(4, 8))
    for training in (True, False):
        fq.train(training)
        with pytest.raises(ValueError, match=r"'act_fq' holds channel-granularity scales of shape \(1, 8\) .* input of shape \(4, 6\)"):
            fq(torch.randn(4, 6))


def test_group_size_that_does_not_divide_names_the_layer_and_both_numbers():
    qconfig = sq.get_statqat_qconfig("int4", None, weight_granularity=48)
    with pytest.raises(ValueError, match=r"group size 48 does not divide the row length 64 of layer 'fc1' weight"):
        sq.prepare_qat_fx(MLP().train(), qconfig)


# --- configuration and models the tools cannot take ---------------------------------------


def test_unknown_format_and_method_name_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown format 'int5'; known formats: fp4_e2m1"):
        sq.QuantSpec("int5")
    with pytest.raises(ValueError, match=r"unknown QAT method 'mse' \(offline-only"):
        sq.QuantSpec("int4", "mse")
    with pytest.raises(ValueError, match=r"unknown method 'gptq'; known methods: " + ", ".join(ESTIMATORS)):
        sq.estimate_qparams(torch.randn(4, 4), "int4", "gptq")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        sq.FakeQuantizer("int4", nonfinite="ignore")


def test_untraceable_model_says_what_to_do():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on tensor values: neither fx nor export can trace it
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(sq.TraceError) as info:
        sq.prepare_qat_fx(DataDependent(), sq.statqat_qconfig, example_inputs=(torch.randn(2, 4),))
    message = str(info.value)
    assert "could not trace DataDependent" in message and "Make that construct traceable" in message


def test_backend_refuses_a_format_it_cannot_express_before_writing_anything(tmp_path):
    from statqat_ao.backends.onnx import export as onnx_export
    from statqat_ao.backends.parity import UnsupportedModelError
    from statqat_ao.backends.torchao import lower

    qconfig = sq.get_statqat_qconfig("fp6_e3m2", None)
    model = prepared_mlp(qconfig)
    converted = sq.convert(model.eval())
    with pytest.raises(UnsupportedModelError, match=r"fc1\.weight.*fp6_e3m2"):
        lower(converted, (torch.randn(2, 64),))
    target = tmp_path / "m.onnx"
    try:
        onnx_export(converted, (torch.randn(2, 64),), target)
    except UnsupportedModelError as exc:
        assert "fp6_e3m2" in str(exc)
        assert not target.exists()


def test_a_lowered_artifact_that_disagrees_with_the_trained_model_raises(tmp_path):
    import onnx
    from onnx import numpy_helper
    from statqat_ao.backends.onnx import export as onnx_export
    from statqat_ao.backends.onnx import verify
    from statqat_ao.backends.parity import ParityError

    qconfig = sq.get_statqat_qconfig("int8", None)
    model = prepared_mlp(qconfig)
    converted = sq.convert(model.eval())
    inputs = (torch.randn(4, 64),)
    path = tmp_path / "m.onnx"
    onnx_export(converted, inputs, path)
    verify(path, converted, inputs)  # the untouched artifact agrees
    graph = onnx.load(path)
    codes = next(t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    array = numpy_helper.to_array(codes).copy()
    array.flat[0] = -array.flat[0] if array.flat[0] != 0 else 100
    codes.CopyFrom(numpy_helper.from_array(array, codes.name))
    onnx.save(graph, path)
    with pytest.raises(ParityError):
        verify(path, converted, inputs)


# --- empty operands of a shared quantizer ---------------------------------------------------


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_an_empty_operand_of_a_shared_quantizer_does_not_freeze_its_scale(method):
    """Phi-3's rotary embedding cats the rotated half with an empty slice. Before: the shared
    quantizer returned early on the empty operand, its scale stayed 1.0, and the other operand
    trained rounded to integers without a word."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16) * 0.05
    shared, alone = sq.FakeQuantizer("int8", method), sq.FakeQuantizer("int8", method)
    out, empty_out = shared(x, x[..., :0])
    alone(x)
    assert torch.equal(shared.scale, alone.scale) and shared.scale.item() != 1.0
    assert empty_out.shape == (4, 8, 0) and torch.equal(out, sq.fake_quantize(x, alone.scale, alone.zero_point, "int8"))


def test_an_empty_operand_of_a_shared_lsq_quantizer_does_not_leave_it_uninitialised():
    x = torch.randn(4, 16) * 0.05
    lsq = sq.LSQFakeQuantize("int8", is_activation=True)
    lsq(x, x[:, :0])
    assert lsq.is_initialized and lsq.scale.item() != 1.0


def test_the_pass_gives_an_empty_cat_operand_no_quantizer():
    class RotaryLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            y = self.fc(x)
            return torch.cat([y * 2, y[..., 16:]], dim=-1)  # an empty pass-through slice

    x = torch.randn(4, 16)
    for example in ((x,), None):  # torch.export (shapes known) and fx
        method = "export" if example else "fx"
        qat = sq.prepare_qat_fx(RotaryLike(), sq.statqat_qconfig, (x,), trace_method=method)
        cat_quantizers = [n for n, _ in qat.named_modules() if "cat" in n and n.endswith("fake_quant")]
        if method == "export":
            assert cat_quantizers == []
        out = qat.train()(x)
        assert torch.isfinite(out).all()
        for name, m in qat.named_modules():
            if isinstance(m, sq.FakeQuantizer):
                assert m.is_initialized and m.scale.numel() >= 1 and float(m.scale.reshape(-1)[0]) != 1.0, name


# --- batch norm with a zero weight (zero_init_residual / zero_init_last) ---------------------


class ZeroInitResidual(nn.Module):
    """conv -> bn -> residual add, with the bn's weight zeroed as torchvision / timm do."""

    def __init__(self, zero_channels=slice(None)):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 8 * 8, 3)
        with torch.no_grad():
            self.bn.weight[zero_channels] = 0.0

    def forward(self, x):
        return self.fc((x + self.bn(self.conv(x))).flatten(1))


def test_a_zero_batch_norm_weight_folds_to_exact_zeros_and_still_learns():
    """Before: the folded batch norm divided the conv output by gamma * rsqrt(var), 0/0: NaN at
    the first QAT forward (timm's resnet18 could not be prepared)."""
    torch.manual_seed(0)
    model = ZeroInitResidual()
    x, target = torch.randn(16, 4, 8, 8), torch.randint(0, 3, (16,))
    reference = copy.deepcopy(model).train()
    nn.functional.cross_entropy(reference(x), target).backward()
    qat = sq.prepare_qat_fx(model.train(), sq.get_statqat_qconfig("int8", None), (x,))
    loss = nn.functional.cross_entropy(qat(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    gamma_grad = dict(qat.named_parameters())["bn.weight"].grad
    # gamma learns as in the float model (INT8 weights: nearly the same conv output)
    assert nn.functional.cosine_similarity(gamma_grad, reference.bn.weight.grad, dim=0) > 0.999
    qat.eval()
    converted = sq.convert(qat)
    assert torch.equal(converted(x), qat(x))
    codes = [m.codes for n, m in converted.named_modules() if n.startswith("conv") and getattr(m, "codes", None) is not None]
    assert len(codes) == 1 and not codes[0].any()  # the deployed conv weight: exactly zero


def test_partly_zero_batch_norm_weights_train_and_convert_exactly():
    torch.manual_seed(0)
    qat = sq.prepare_qat_fx(ZeroInitResidual(slice(0, None, 2)).train(), sq.statqat_qconfig, (torch.randn(16, 4, 8, 8),))
    opt = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(3):
        x, target = torch.randn(16, 4, 8, 8), torch.randint(0, 3, (16,))
        loss = nn.functional.cross_entropy(qat(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    qat.eval()
    assert torch.equal(sq.convert(qat)(x), qat(x))
