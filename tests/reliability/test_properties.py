"""Property tests of the fake quant, over formats, granularities, shapes and distributions.

The estimator properties (finite positive scales, equivariance under positive scaling,
one least-squares step never raising the MSE) live in tests/estimators/test_estimators.py;
these are the quantizer's own: codes on the grid, the half-step bound, idempotence,
compiled equals eager, and online scales that stay finite and positive over steps.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import statqat_ao as sq
from statqat_ao.estimators import online_methods

ONLINE_METHODS = online_methods()

ALL_FORMATS = st.sampled_from(sq.known_formats())
GRANULARITY = st.sampled_from(["tensor", "channel", 16, 32])
DISTRIBUTION = st.sampled_from(["normal", "laplace", "uniform", "student_t", "sparse", "outlier", "shifted"])
METHODS = st.sampled_from(["minmax", "analytic", "iterative", "octav"])


def draw(dist: str, seed: int, rows: int, cols: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(rows, cols, generator=g)
    if dist == "laplace":
        x = torch.log(torch.rand(rows, cols, generator=g) + 1e-12) * torch.sign(n)
    elif dist == "uniform":
        x = torch.rand(rows, cols, generator=g) * 2 - 1
    elif dist == "student_t":  # three degrees of freedom: heavy tails
        chi = sum(torch.randn(rows, cols, generator=g) ** 2 for _ in range(3)) / 3
        x = n / chi.sqrt()
    elif dist == "sparse":
        x = n * (torch.rand(rows, cols, generator=g) < 0.1)
    elif dist == "outlier":
        x = n
        x[:, 0] = 40.0
    elif dist == "shifted":
        x = n + 3.0
    else:
        x = n
    return x * magnitude


@st.composite
def cases(draw_fn, formats=ALL_FORMATS):
    fmt = sq.get_format(draw_fn(formats))
    granularity = fmt.block_size if fmt.is_block_format else draw_fn(GRANULARITY)
    rows = draw_fn(st.integers(1, 6))
    cols = 32 * draw_fn(st.integers(1, 4))
    dist = draw_fn(DISTRIBUTION)
    x = draw(dist, draw_fn(st.integers(0, 2**16)), rows, cols, 10.0 ** draw_fn(st.integers(-4, 4)))
    if not fmt.signed:
        x = x.abs()
    symmetric = True if fmt.family != "int" else draw_fn(st.booleans())
    return fmt, granularity, x, symmetric


def quantized(fmt, granularity, x, symmetric, method="analytic"):
    symmetric = symmetric or method == "octav"  # OCTAV estimates symmetric quantizers only
    s, zp = sq.estimate_qparams(x, fmt, method, granularity, symmetric=symmetric)
    return s, zp, sq.fake_quantize(x, s, zp, fmt)


def per_element(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-tensor, per-channel or per-group scale (or zero point) expanded to x's shape."""
    if t.dim() == 0 or t.shape[-1] in (1, x.shape[-1]):
        return t.expand_as(x)
    return t.repeat_interleave(x.shape[-1] // t.shape[-1], dim=-1)


def quantized_elementwise(case, method):
    """``(fmt, x, x_hat, s, zp)`` with the scale and zero point expanded to x's shape."""
    fmt, _, x, _ = case
    s, zp, x_hat = quantized(*case, method)
    return fmt, x, x_hat, per_element(s, x), per_element(zp, x).float()


@settings(max_examples=60, deadline=None)
@given(cases(), METHODS)
def test_codes_lie_on_the_grid(case, method):
    fmt, x, x_hat, s, zp = quantized_elementwise(case, method)
    codes = x_hat / s + zp
    grid = fmt.grid_tensor()
    nearest = grid[(codes.unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.allclose(codes, nearest, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(cases(), METHODS)
def test_error_inside_the_clip_range_is_at_most_half_a_step(case, method):
    fmt, x, x_hat, s, zp = quantized_elementwise(case, method)
    v = x / s + zp  # in code units
    grid = fmt.grid_tensor()
    inside = (v >= grid[0]) & (v <= grid[-1])
    i = torch.searchsorted(grid, v.clamp(grid[0], grid[-1]).contiguous()).clamp(1, len(grid) - 1)
    half_step = (grid[i] - grid[i - 1]) / 2
    error = (x - x_hat).abs() / s  # in code units
    assert (error[inside] <= half_step[inside] * (1 + 1e-4) + 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(cases(), METHODS)
def test_fake_quantize_is_idempotent(case, method):
    fmt = case[0]
    s, zp, x_hat = quantized(*case, method)
    assert torch.equal(sq.fake_quantize(x_hat, s, zp, fmt), x_hat)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(ONLINE_METHODS), ALL_FORMATS, st.sampled_from(["tensor", "channel"]), st.lists(DISTRIBUTION, min_size=2, max_size=5), st.integers(0, 2**16))
def test_online_scales_stay_finite_and_positive_across_changing_batches(method, fmt, granularity, dists, seed):
    f = sq.get_format(fmt)
    if f.is_block_format:
        granularity = f.block_size
    fq = sq.FakeQuantizer(f, method, granularity).train()
    for k, dist in enumerate(dists):
        x = draw(dist, seed + k, 4, 64, 10.0 ** ((seed + k) % 7 - 3))
        if k == 1:
            x[0] = 0.0  # an all-zero block mid-run
        out = fq(x)
        assert torch.isfinite(fq.scale).all() and (fq.scale > 0).all()
        assert torch.isfinite(out).all()


# Compiling is seconds per format: few examples, over the formats with distinct rounding code.
COMPILED_FORMATS = st.sampled_from(["int4", "int8", "fp4_e2m1", "fp8_e4m3", "nf4", "mxfp4", "nvfp4"])


@pytest.fixture(scope="module")
def compiled_fake_quantize():
    torch._dynamo.reset()
    return torch.compile(sq.fake_quantize, fullgraph=True, dynamic=True)


@settings(max_examples=4, deadline=None)  # each example compiles: 4 keeps the suite in budget
@given(cases(COMPILED_FORMATS))
def test_compiled_fake_quantize_equals_eager_bit_for_bit(compiled_fake_quantize, case):
    fmt, granularity, x, symmetric = case
    s, zp, eager = quantized(fmt, granularity, x, symmetric)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    # One compiled graph per format and scale layout: more than dynamo's default limit of 8.
    with torch._dynamo.config.patch(recompile_limit=64):
        compiled = compiled_fake_quantize(xc, s, zp, fmt.name)
    assert torch.equal(compiled, eager)
    compiled.sum().backward()  # the straight-through gradient, compiled too
    sq.fake_quantize(xe, s, zp, fmt).sum().backward()
    assert torch.equal(xc.grad, xe.grad)
