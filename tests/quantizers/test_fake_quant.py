"""The fake-quant op: values, gradients, torch.compile and torch.export."""

import pytest
import torch

import statqat_ao as sq
from statqat_ao.numerics.rounding import round_to_grid


def reference_fake_quant(x, s, zp, fmt):
    f = sq.get_format(fmt)
    g = torch.tensor(f.grid, dtype=torch.float64)
    v = (x.double() / s.double() + zp.double()).clamp(f.qmin, f.qmax)
    nearest = g[(v[..., None] - g).abs().argmin(dim=-1)]
    return ((nearest - zp.double()) * s.double()).float()


@pytest.mark.parametrize("fmt", ["int4", "int8", "uint8", "fp4_e2m1", "fp8_e4m3", "nf4"])
def test_values_match_reference_per_channel(fmt):
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    sym = fmt != "uint8"
    s, zp = sq.estimate_qparams(x, fmt, "analytic", "channel", symmetric=sym)
    out = sq.fake_quantize(x, s, zp, fmt)
    torch.testing.assert_close(out, reference_fake_quant(x, s, zp, fmt), rtol=1e-6, atol=1e-7)


def test_per_group_scales_group_the_rows():
    x = torch.randn(8, 64)
    s, zp = sq.estimate_qparams(x, "int4", "minmax", granularity=16)
    assert s.shape == (8, 4)
    out = sq.fake_quantize(x, s, zp, "int4")
    manual = torch.cat(
        [sq.fake_quantize(x[:, 16 * g : 16 * (g + 1)], s[:, g : g + 1], None, "int4") for g in range(4)],
        dim=1,
    )
    assert torch.equal(out, manual)
    w4 = torch.randn(8, 4, 3, 3)  # conv weight: groups run over in*kh*kw
    s, zp = sq.estimate_qparams(w4, "int4", "minmax", granularity=12)
    assert sq.fake_quantize(w4, s, zp, "int4").shape == w4.shape


def test_incompatible_scale_shape_raises():
    with pytest.raises(ValueError, match="neither broadcasts"):
        sq.fake_quantize(torch.randn(8, 64), torch.ones(3, 5), None, "int4")


def test_straight_through_gradient_inside_zero_outside_none_to_scale():
    x = torch.tensor([-20.0, -1.3, 0.2, 3.9, 7.0, 7.6, 100.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    out = sq.fake_quantize(x, s, None, "int4")
    out.backward(torch.arange(1.0, 8.0))
    # clip range is [-8, 7] * s: inside values pass the gradient through
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0]
    assert s.grad is None


def test_lsq_scale_gradient_matches_the_lsq_formula():
    x = torch.tensor([-20.0, -1.3, 0.2, 3.9, 7.0, 100.0])
    s = torch.tensor(0.9, requires_grad=True)
    sq.fake_quantize(x, s, None, "int4", learn_scale=True).sum().backward()
    v = x / 0.9
    inside = (v >= -8) & (v <= 7)
    expected = torch.where(inside, torch.round(v) - v, v.clamp(-8, 7)).sum()
    torch.testing.assert_close(s.grad, expected)


def test_lsq_module_learns_a_scale():
    torch.manual_seed(0)
    target = torch.randn(32, 64)
    fq = sq.LSQFakeQuantize("int4", granularity="channel")
    fq(target)  # initialise from the data
    start = sq.snr_db(target, fq(target))
    opt = torch.optim.Adam(fq.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        ((fq(target) - target) ** 2).mean().backward()
        opt.step()
    assert sq.snr_db(target, fq(target)) > start + 1.0


@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "nf4", "fp8_e5m2"])
def test_idempotent(fmt):
    x = torch.randn(16, 64)
    s, zp = sq.estimate_qparams(x, fmt, "iterative", "channel")
    once = sq.fake_quantize(x, s, zp, fmt)
    assert torch.equal(sq.fake_quantize(once, s, zp, fmt), once)


def test_codes_on_grid_with_power_of_two_scale():
    x = torch.randn(1000) * 3
    s = torch.tensor(0.25)
    for fmt in ["int3", "fp4_e2m1", "fp6_e3m2"]:
        codes = sq.fake_quantize(x, s, None, fmt) / s
        assert set(codes.tolist()) <= set(sq.get_format(fmt).grid)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(dtype):
    x = torch.randn(8, 32).to(dtype)
    s, zp = sq.estimate_qparams(x, "int4", "analytic", "channel")
    out = sq.fake_quantize(x, s, zp, "int4")
    assert out.dtype == dtype
    assert torch.equal(out, sq.fake_quantize(x.float(), s, zp, "int4").to(dtype))


class QuantLinear(torch.nn.Module):
    """Weight fake-quant per channel, activation fake-quant per tensor, stats every step."""

    def __init__(self, fmt_w="int4", fmt_a="int8", granularity="channel"):
        super().__init__()
        self.lin = torch.nn.Linear(64, 32)
        self.fmt_w, self.fmt_a, self.granularity = fmt_w, fmt_a, granularity
        self.register_buffer("act_scale", torch.tensor(0.05))

    def forward(self, x):
        s_w, zp_w = sq.estimators.analytic_qparams(
            sq.blocks.block_layout(self.lin.weight.shape, self.granularity, 0).to_blocks(
                self.lin.weight.detach()
            ),
            sq.get_format(self.fmt_w),
            True,
        )
        layout = sq.blocks.block_layout(self.lin.weight.shape, self.granularity, 0)
        w = sq.fake_quantize(self.lin.weight, layout.from_blocks(s_w), None, self.fmt_w)
        x = sq.fake_quantize(x, self.act_scale, None, self.fmt_a)
        return torch.nn.functional.linear(x, w, self.lin.bias)


@pytest.mark.parametrize("fmt_w,granularity", [("int4", "channel"), ("fp4_e2m1", 32), ("nf4", 16)])
def test_compiled_fullgraph_equals_eager_forward_and_backward(fmt_w, granularity):
    torch.manual_seed(0)
    model = QuantLinear(fmt_w, "int8", granularity)
    x = torch.randn(16, 64)
    out_e = model(x)
    out_e.square().sum().backward()
    grad_e = model.lin.weight.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    out_c = compiled(x)
    out_c.square().sum().backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lin.weight.grad, grad_e, rtol=1e-4, atol=1e-5)


def test_compiled_codes_bit_identical_to_eager():
    x = torch.randn(64, 256)
    for fmt in ["int4", "fp4_e2m1", "fp8_e4m3", "nf4"]:
        s, zp = sq.estimate_qparams(x, fmt, "analytic", "channel")
        torch._dynamo.reset()
        fn = torch.compile(lambda t, s=s, zp=zp, fmt=fmt: sq.fake_quantize(t, s, zp, fmt), fullgraph=True)
        assert torch.equal(fn(x), sq.fake_quantize(x, s, zp, fmt))


def test_one_recognisable_node_after_export():
    model = QuantLinear()
    ep = torch.export.export(model, (torch.randn(4, 64),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.statqat.fake_quantize.default) == 2
    # the exported program runs and matches eager
    x = torch.randn(4, 64)
    torch.testing.assert_close(ep.module()(x), model(x))
    decomposed = ep.run_decompositions()
    assert torch.ops.statqat.fake_quantize.default not in [n.target for n in decomposed.graph.nodes]


def test_rounding_used_by_op_is_the_tested_rounding():
    v = torch.linspace(-7, 7, 1001)
    assert torch.equal(sq.fake_quantize(v, torch.tensor(1.0), None, "fp4_e2m1"), round_to_grid(v, sq.get_format("fp4_e2m1")))
