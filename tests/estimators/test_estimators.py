"""Estimators against torch's observers, brute-force search and their defining properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import statqat_ao as sq
from statqat_ao.estimators import least_squares_step
from statqat_ao.numerics.block_error import block_sse
from statqat_ao.numerics.error_model import LAPLACE, student_t
from statqat_ao.numerics.rounding import round_to_grid

METHODS = ["minmax", "analytic", "iterative", "mse", "octav", "lsq"]
FAST_METHODS = [m for m in METHODS if m != "mse"]  # mse (a slow reference) is tested on its own


def snr_of(x, fmt, method, **kw):
    s, zp = sq.estimate_qparams(x, fmt, method, **kw)
    return sq.snr_db(x, sq.fake_quantize(x, s, zp, fmt))


def test_minmax_matches_torch_per_channel_observer():
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    w = torch.randn(32, 64)
    obs = PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-8, quant_max=7
    )
    obs(w)
    ref_scale, _ = obs.calculate_qparams()
    s, zp = sq.estimate_qparams(w, "int4", "minmax", "channel")
    torch.testing.assert_close(s.flatten(), ref_scale, rtol=1e-6, atol=0)
    assert (zp == 0).all()


def test_asymmetric_minmax_matches_torch_observer():
    from torch.ao.quantization.observer import MinMaxObserver

    x = torch.rand(1000) * 5 - 1
    obs = MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    obs(x)
    ref_s, ref_zp = obs.calculate_qparams()
    s, zp = sq.estimate_qparams(x, "uint8", "minmax", symmetric=False)
    torch.testing.assert_close(s.reshape(1), ref_s, rtol=1e-6, atol=0)
    assert int(zp) == int(ref_zp)


@pytest.mark.parametrize("fmt", ["int3", "fp4_e2m1", "nf4"])
def test_mse_search_matches_brute_force(fmt):
    torch.manual_seed(0)
    x = torch.randn(1, 256) * 0.3
    f = sq.get_format(fmt)
    s_mm = x.abs().max() / f.max_value
    best = min(
        block_sse(x, torch.tensor([s_mm * r]), torch.zeros(1), f).item()
        for r in np.linspace(0.05, 1.3, 5000)
    )
    s, zp = sq.estimate_qparams(x, fmt, "mse")
    got = block_sse(x, s.reshape(1), torch.zeros(1), f).item()
    assert got <= best * 1.0005


@pytest.mark.parametrize("fmt", ["int4", "int3", "fp4_e2m1"])
def test_analytic_is_within_0p1_db_of_optimum_on_gaussian_rows(fmt):
    torch.manual_seed(0)
    w = torch.randn(64, 4096)
    opt = snr_of(w, fmt, "mse", granularity="channel")
    assert snr_of(w, fmt, "analytic", granularity="channel") > opt - 0.1
    assert snr_of(w, fmt, "analytic", granularity="channel", family="gaussian") > opt - 0.1


@pytest.mark.parametrize("fmt", ["int4", "int3", "fp4_e2m1"])
@pytest.mark.parametrize("family", [LAPLACE, student_t(4)])
def test_iterative_reaches_optimum_and_analytic_beats_minmax_on_heavy_tails(fmt, family):
    rng = np.random.default_rng(0)
    w = torch.from_numpy(family.sample(64 * 1024, rng).reshape(64, 1024)).float()
    opt = snr_of(w, fmt, "mse", granularity="channel")
    assert snr_of(w, fmt, "iterative", granularity="channel") > opt - 0.1
    assert snr_of(w, fmt, "analytic", granularity="channel") > snr_of(
        w, fmt, "minmax", granularity="channel"
    )


def test_lsq_initial_scale_is_lsq_formula():
    w = torch.randn(8, 100)
    s, _ = sq.estimate_qparams(w, "int4", "lsq", "channel")
    torch.testing.assert_close(s, 2 * w.abs().mean(dim=1, keepdim=True) / math.sqrt(7))


FORMATS = st.sampled_from(["int2", "int3", "int4", "int8", "uint4", "fp4_e2m1", "fp8_e4m3", "nf4"])
GRANULARITY = st.sampled_from(["tensor", "channel", 16])
DISTRIBUTION = st.sampled_from(["normal", "laplace", "uniform", "sparse", "outlier"])


def draw_tensor(dist: str, seed: int, rows: int, cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        return torch.randn(rows, cols, generator=g)
    if dist == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample((rows, cols))
    if dist == "uniform":
        return torch.rand(rows, cols, generator=g) * 2 - 1
    if dist == "sparse":
        return torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < 0.1)
    x = torch.randn(rows, cols, generator=g)
    x[:, 0] = 50.0
    return x


@settings(max_examples=40, deadline=None)
@given(FORMATS, GRANULARITY, DISTRIBUTION, st.integers(0, 10_000), st.sampled_from(FAST_METHODS))
def test_scales_are_finite_and_positive(fmt, granularity, dist, seed, method):
    x = draw_tensor(dist, seed, 4, 64)
    s, zp = sq.estimate_qparams(x, fmt, method, granularity)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.isfinite(sq.fake_quantize(x, s, zp, fmt)).all()


@settings(max_examples=40, deadline=None)
@given(FORMATS, DISTRIBUTION, st.integers(0, 10_000), st.floats(0.05, 20.0))
def test_one_iterative_step_never_raises_the_mse(fmt, dist, seed, factor):
    f = sq.get_format(fmt)
    x = draw_tensor(dist, seed, 4, 64)
    if not f.signed:
        x = x.abs()
    s = x.abs().amax(dim=1) / f.max_value * factor + 1e-6
    zp = torch.zeros_like(s)
    before = block_sse(x, s, zp, f)
    after = block_sse(x, least_squares_step(x, s, zp, f), zp, f)
    assert (after <= before * (1 + 1e-5) + 1e-12).all()


def nonzero_blocks(x: torch.Tensor, granularity) -> torch.Tensor:
    """Mask, shaped like the scales, of blocks holding a nonzero value (all-zero blocks
    get an arbitrary fallback scale, which need not scale with x)."""
    layout = sq.blocks.block_layout(x.shape, granularity, 0)
    return layout.from_blocks(layout.to_blocks(x).abs().amax(dim=1) > 0)


@settings(max_examples=30, deadline=None)
@given(FORMATS, GRANULARITY, DISTRIBUTION, st.integers(0, 10_000), st.sampled_from(FAST_METHODS), st.integers(-6, 6))
def test_scale_is_equivariant_under_power_of_two_scaling(fmt, granularity, dist, seed, method, k):
    x = draw_tensor(dist, seed, 4, 64)
    a = 2.0**k
    s1, zp1 = sq.estimate_qparams(x, fmt, method, granularity)
    s2, zp2 = sq.estimate_qparams(x * a, fmt, method, granularity)
    keep = nonzero_blocks(x, granularity)
    torch.testing.assert_close(s2[keep], s1[keep] * a, rtol=1e-6, atol=0)
    assert torch.equal(zp1, zp2)


@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "mxfp4"])
def test_mse_search_is_equivariant_and_finite(fmt):
    x = draw_tensor("laplace", 3, 8, 64)
    gran = None if fmt == "mxfp4" else "channel"
    s1, _ = sq.estimate_qparams(x, fmt, "mse", gran)
    s2, _ = sq.estimate_qparams(x * 4.0, fmt, "mse", gran)
    assert torch.isfinite(s1).all() and (s1 > 0).all()
    torch.testing.assert_close(s2, s1 * 4.0, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["minmax", "analytic", "octav", "lsq"])
def test_scale_is_equivariant_under_any_positive_scaling(method):
    x = torch.randn(8, 64)
    for a in [0.37, 3.1, 1234.5]:
        s1, _ = sq.estimate_qparams(x, "int4", method, "channel")
        s2, _ = sq.estimate_qparams(x * a, "int4", method, "channel")
        torch.testing.assert_close(s2, s1 * a, rtol=1e-4, atol=0)


def test_bf16_statistics_are_computed_in_float32():
    x = torch.randn(16, 256).bfloat16()
    for method in ["analytic", "iterative"]:
        s_bf, _ = sq.estimate_qparams(x, "int4", method, "channel")
        s_f, _ = sq.estimate_qparams(x.float(), "int4", method, "channel")
        assert s_bf.dtype == torch.float32 and torch.equal(s_bf, s_f)


def test_asymmetric_estimates_beat_symmetric_on_shifted_data():
    x = torch.randn(16, 512) + 2.0
    for method in ["minmax", "analytic", "iterative"]:
        s, zp = sq.estimate_qparams(x, "uint4", method, "channel", symmetric=False)
        assert ((zp >= 0) & (zp <= 15)).all()
        asym = sq.snr_db(x, sq.fake_quantize(x, s, zp, "uint4"))
        assert asym > snr_of(x, "int4", method, granularity="channel")


def _best_asymmetric_snr(x, fmt, zero_points, steps=300):
    """Grid search over the zero point and the scale: the reference optimum."""
    f = sq.get_format(fmt)
    best = -math.inf
    for z in zero_points:
        top = float(x.max()) / (f.qmax - z)
        for s in torch.linspace(0.2 * top, 1.01 * top, steps):
            best = max(best, float(sq.snr_db(x, sq.fake_quantize(x, s, torch.tensor(float(z)), fmt))))
    return best


@pytest.mark.parametrize("fmt, tolerance_db", [("uint8", 0.5), ("uint4", 0.3)])
def test_asymmetric_grid_on_relu_outputs_starts_at_zero_and_reaches_the_searched_optimum(fmt, tolerance_db):
    # One-sided data (a ReLU's output): codes below 0 would represent nothing.
    torch.manual_seed(0)
    x = torch.relu(torch.randn(1, 20000) + 0.3)
    optimum = _best_asymmetric_snr(x, fmt, range(0, 8))
    for method in ["analytic", "iterative"]:
        s, zp = sq.estimate_qparams(x, fmt, method, symmetric=False)
        assert zp.item() == sq.get_format(fmt).qmin
        snr = float(sq.snr_db(x, sq.fake_quantize(x, s, zp, fmt)))
        # analytic assumes a Gaussian (this is a clipped one): 1.5 dB short at 4 bits
        assert snr > optimum - (tolerance_db if method == "iterative" else 2.0), (method, snr, optimum)


def test_block_format_scales_lie_on_their_scale_grids():
    w = torch.randn(32, 128)
    e4m3 = set(sq.get_format("fp8_e4m3").grid)
    for method in ["minmax", "analytic", "iterative", "mse"]:
        s, _ = sq.estimate_qparams(w, "mxfp4", method)
        assert s.shape == (32, 4)
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)
        s, _ = sq.estimate_qparams(w, "nvfp4", method)
        ts = w.abs().max() / (448 * 6)
        assert s.shape == (32, 8)
        # the effective scale is the float32 product of the tensor scale and an E4M3 value
        block = round_to_grid(s / ts, sq.get_format("fp8_e4m3"))
        assert all(v in e4m3 for v in block.flatten().tolist())
        assert torch.equal(ts * block, s)


def test_minmax_block_formats_bit_exact_with_torchao():
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    w = torch.randn(64, 128) * 0.05
    s, zp = sq.estimate_qparams(w, "mxfp4", "minmax")
    ref = MXTensor.to_mx(w, torch.float4_e2m1fn_x2, 32).dequantize(torch.float32)
    assert torch.equal(sq.fake_quantize(w, s, zp, "mxfp4"), ref)
    s, zp = sq.estimate_qparams(w, "nvfp4", "minmax")
    ts = per_tensor_amax_to_scale(w.abs().amax())
    ref = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=ts).dequantize(torch.float32)
    assert torch.equal(sq.fake_quantize(w, s, zp, "nvfp4"), ref)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_statqat_block_formats_beat_minmax(fmt):
    w = torch.randn(128, 256)
    mm = snr_of(w, fmt, "minmax")
    assert snr_of(w, fmt, "analytic") > mm and snr_of(w, fmt, "iterative") > mm


class TestBadInput:
    def test_nan_and_inf_raise_naming_the_problem(self):
        x = torch.randn(4, 8)
        x[1, 2] = float("nan")
        x[0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"layer1.weight holds 1 NaN and 1 Inf"):
            sq.estimate_qparams(x, "int4", name="layer1.weight")

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "nvfp4", "mxfp4"])
    def test_all_zero_block_gives_finite_scale_and_exact_zeros(self, method, fmt):
        x = torch.randn(4, 64)
        x[2] = 0.0
        gran = None if fmt in ("nvfp4", "mxfp4") else "channel"
        s, zp = sq.estimate_qparams(x, fmt, method, gran)
        assert torch.isfinite(s).all() and (s > 0).all()
        out = sq.fake_quantize(x, s, zp, fmt)
        assert torch.equal(out[2], torch.zeros(64))
        s, zp = sq.estimate_qparams(torch.zeros(8, 32), fmt, method, gran)
        assert torch.equal(sq.fake_quantize(torch.zeros(8, 32), s, zp, fmt), torch.zeros(8, 32))

    def test_group_size_that_does_not_divide_names_both_numbers(self):
        with pytest.raises(ValueError, match=r"group size 48 does not divide the row length 64"):
            sq.estimate_qparams(torch.randn(4, 64), "int4", granularity=48)

    def test_empty_tensor(self):
        with pytest.raises(ValueError, match="empty"):
            sq.estimate_qparams(torch.randn(0, 8), "int4")

    def test_unknown_method_and_bad_options(self):
        with pytest.raises(ValueError, match="unknown method 'magic'.*analytic"):
            sq.estimate_qparams(torch.randn(4, 8), "int4", "magic")
        with pytest.raises(ValueError, match="asymmetric quantization needs an INT format"):
            sq.estimate_qparams(torch.randn(4, 8), "fp4_e2m1", symmetric=False)
        with pytest.raises(ValueError, match="fixed block size of 16"):
            sq.estimate_qparams(torch.randn(4, 64), "nvfp4", granularity=32)
        with pytest.raises(ValueError, match="floating-point"):
            sq.estimate_qparams(torch.ones(4, 8, dtype=torch.int32), "int4")
