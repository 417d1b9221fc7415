"""The ``search`` and ``auto`` estimators: representable, never worse than their candidates, cheap when warm."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import statqat_ao as sq
from statqat_ao.estimators import iterative as iterative_module
from statqat_ao.estimators.iterative import least_squares_step
from statqat_ao.estimators.registry import OnlineStep
from statqat_ao.estimators.search import search_step
from statqat_ao.numerics import block_error
from statqat_ao.numerics.block_error import block_sse
from statqat_ao.numerics.blocks import block_layout
from statqat_ao.numerics.formats import get_format
from statqat_ao.numerics.scale_formats import E4M3_MAX, nvfp4_tensor_scale

E4M3_POSITIVE = [v for v in get_format("fp8_e4m3").grid if v > 0]


def weight(seed: int = 0, rows: int = 64, cols: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, :4] *= 6  # a few outlier columns, as in LLM weights
    return w


def blocks_of(w, fmt, granularity):
    return block_layout(w.shape, granularity, 0, get_format(fmt)).to_blocks(w)


def per_block_error(w, s, zp, fmt, granularity, weights=None):
    x = blocks_of(w, fmt, granularity)
    h = None if weights is None else blocks_of(torch.broadcast_to(weights, w.shape), fmt, granularity)
    return block_sse(x, s.reshape(-1), zp.reshape(-1).float(), get_format(fmt), h)


@pytest.mark.parametrize("method", ["search", "auto"])
def test_nvfp4_and_mxfp4_scales_are_representable(method):
    w = weight()
    s, _ = sq.estimate_qparams(w, "nvfp4", method)
    t = (s / nvfp4_tensor_scale(w)).flatten()  # s = ts * t in float32: t back within an ulp
    grid = torch.tensor(E4M3_POSITIVE)
    nearest = grid[(t[:, None] - grid).abs().argmin(dim=1)]
    assert bool(((t - nearest).abs() <= nearest * 2**-22).all()) and float(nearest.max()) <= E4M3_MAX
    s, _ = sq.estimate_qparams(w, "mxfp4", method)
    assert bool((torch.exp2(torch.log2(s).round()) == s).all())


def test_nvfp4_search_beats_every_representable_scale_in_its_window():
    w = weight(1)
    fmt = get_format("nvfp4")
    s, zp = sq.estimate_qparams(w, "nvfp4", "search")
    got = per_block_error(w, s, zp, "nvfp4", 16)
    ts = nvfp4_tensor_scale(w)
    x = blocks_of(w, "nvfp4", 16)
    amax = x.abs().amax(dim=1)
    zero = torch.zeros(x.shape[0])
    for t in E4M3_POSITIVE:  # every candidate from 0.6 to 1.4 x amax / 6 (inside the window)
        cand = torch.full_like(amax, t) * ts
        inside = (cand >= 0.6 * amax / 6) & (cand <= 1.4 * amax / 6)
        err = block_sse(x, cand, zero, fmt)
        assert bool((got[inside] <= err[inside] * (1 + 1e-6)).all()), t


@pytest.mark.parametrize(
    "fmt,granularity,symmetric",
    [("fp4_e2m1", 32, True), ("fp4_e2m1", 16, True), ("int4", "channel", True), ("int4", 32, True), ("int8", "channel", True), ("nvfp4", 16, True), ("mxfp4", 32, True), ("uint8", "channel", False), ("int4", 32, False)],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_search_is_never_worse_than_minmax(fmt, granularity, symmetric, weighted):
    w = weight(2)
    h = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) ** 4 if weighted else None
    s, zp = sq.estimate_qparams(w, fmt, "search", granularity, symmetric=symmetric, weights=h)
    s_mm, zp_mm = sq.estimate_qparams(w, fmt, "minmax", granularity, symmetric=symmetric)
    got = per_block_error(w, s, zp, fmt, granularity, h)
    base = per_block_error(w, s_mm, zp_mm, fmt, granularity, h)
    assert bool((got <= base * (1 + 1e-6) + 1e-12).all())
    assert float(got.sum()) < float(base.sum())


@pytest.mark.parametrize("fmt,granularity", [("fp4_e2m1", 32), ("nvfp4", 16), ("mxfp4", 32)])
def test_search_is_within_0_05_db_of_the_exhaustive_optimum(fmt, granularity):
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(4))
    s, zp = sq.estimate_qparams(w, fmt, "search", granularity)
    s_ref, zp_ref = sq.estimate_qparams(w, fmt, "mse", granularity)
    err = float(per_block_error(w, s, zp, fmt, granularity).sum())
    ref = float(per_block_error(w, s_ref, zp_ref, fmt, granularity).sum())
    assert 10 * math.log10(err / ref) <= 0.05


def test_output_aware_search_lowers_the_output_error_of_a_layer():
    """The point of the weighted error: a Linear's output error, against the float layer."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2048, 256, generator=g) * torch.logspace(-1.5, 1.0, 256)[torch.randperm(256, generator=g)]
    h = (x * x).mean(dim=0)
    errors = {}
    for name, weights in (("weight", None), ("output", h)):
        s, zp = sq.estimate_qparams(w, "fp4_e2m1", "search", 32, weights=weights)
        errors[name] = float(((x @ (sq.fake_quantize(w, s, zp, "fp4_e2m1") - w).T) ** 2).mean())
    assert errors["output"] < 0.8 * errors["weight"]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    fmt=st.sampled_from(["int4", "int3", "fp4_e2m1", "nf4", "int8"]),
    scale_factor=st.floats(0.3, 3.0),
)
def test_a_weighted_least_squares_step_never_raises_the_weighted_error(seed, fmt, scale_factor):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 32, generator=g) * torch.rand(16, 1, generator=g).add(0.1)
    h = torch.rand(16, 32, generator=g) ** 3
    f = get_format(fmt)
    zp = torch.zeros(16)
    s = x.abs().amax(dim=1) / f.max_value * scale_factor
    before = block_sse(x, s, zp, f, h)
    after = block_sse(x, least_squares_step(x, s, zp, f, h), zp, f, h)
    assert bool((after <= before * (1 + 1e-5) + 1e-9).all())


@pytest.mark.parametrize("fmt,granularity", [("fp4_e2m1", 32), ("nvfp4", 16), ("mxfp4", 32), ("int4", "channel")])
def test_a_warm_qat_step_takes_at_most_3_passes_over_the_weight(monkeypatch, fmt, granularity):
    f = get_format(fmt)
    w = weight(6)
    x = blocks_of(w, fmt, granularity)
    ts = nvfp4_tensor_scale(w) if fmt == "nvfp4" else None
    s, zp = sq.estimate_qparams(w, fmt, "search", granularity)
    passes = []
    real = block_error.centered_codes

    def counting(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(block_error, "centered_codes", counting)
    monkeypatch.setattr(iterative_module, "centered_codes", counting)
    step = OnlineStep(x, (), f, True, s.reshape(-1), zp.reshape(-1).float(), weights=None, tensor_scale=ts)
    new_s, _ = search_step(step)
    assert 1 <= len(passes) <= 3
    assert bool((block_sse(x, new_s, zp.reshape(-1).float(), f) <= block_sse(x, s.reshape(-1), zp.reshape(-1).float(), f) * (1 + 1e-6)).all())


def test_auto_takes_search_for_small_blocks_and_analytic_for_large():
    w = weight(7, 32, 1024)
    for fmt, granularity, same_as in (("fp4_e2m1", 32, "search"), ("nvfp4", 16, "search"), ("int4", "channel", "analytic")):
        got = sq.estimate_qparams(w, fmt, "auto", granularity)
        want = sq.estimate_qparams(w, fmt, same_as, granularity)
        assert torch.equal(got[0], want[0]), (fmt, granularity)
