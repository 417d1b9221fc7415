"""The breakpoint sweep finds the exact (weighted) MSE-optimal scale: checked against a brute-force scan."""

from __future__ import annotations

import pytest
import torch

from statqat_ao.numerics.block_error import block_sse
from statqat_ao.numerics.formats import get_format
from statqat_ao.numerics.optimal_scale import optimal_scale, sweep_supported

FORMATS = ("int4", "int3", "int2", "fp4_e2m1", "fp4_e3m0", "nf4")


def brute_force_min(x: torch.Tensor, fmt, weights=None, n: int = 20000) -> torch.Tensor:
    """The lowest error over a dense scan of scales (0.02 .. 3 x max|x| / g_K), per block."""
    base = x.abs().amax(dim=1).clamp(min=1e-12) / fmt.max_value
    zp = torch.zeros(x.shape[0])
    best = torch.full((x.shape[0],), float("inf"))
    for r in torch.linspace(0.02, 3.0, n).tolist():
        best = torch.minimum(best, block_sse(x, base * r, zp, fmt, weights))
    return best


@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("weighted", [False, True])
def test_the_sweep_is_never_beaten_by_a_dense_scan(fmt_name, weighted):
    fmt = get_format(fmt_name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 32, generator=g) * torch.rand(48, 1, generator=g).mul(3).add(0.1)
    x[:8] = torch.distributions.StudentT(3.0).sample((8, 32))  # heavy tails
    h = torch.rand(48, 32, generator=g) ** 4 if weighted else None
    s, predicted = optimal_scale(x, fmt, h)
    got = block_sse(x, s, torch.zeros(48), fmt, h)
    scan = brute_force_min(x, fmt, h, n=4000)
    # float32 error sums: the sweep may lose only rounding noise to the scan, and must find
    # the narrow minima a scan of 4000 ratios can miss (it is strictly better somewhere).
    assert bool((got <= scan * (1 + 1e-5)).all())
    assert bool((got < scan * (1 - 1e-6)).any())
    torch.testing.assert_close(predicted, got, rtol=1e-3, atol=1e-6)


def test_all_zero_blocks_get_scale_zero_and_zero_error():
    s, err = optimal_scale(torch.zeros(3, 16), get_format("fp4_e2m1"))
    assert s.tolist() == [0.0, 0.0, 0.0] and err.tolist() == [0.0, 0.0, 0.0]


def test_exactly_representable_blocks_have_zero_error():
    x = torch.tensor([[0.5, -1.0, 1.5, 3.0, -6.0, 0.0]]) * 0.37
    s, err = optimal_scale(x, get_format("fp4_e2m1"))
    assert block_sse(x, s, torch.zeros(1), get_format("fp4_e2m1")).item() == pytest.approx(0.0, abs=1e-10)


def test_where_the_sweep_applies():
    assert sweep_supported(get_format("fp4_e2m1")) and sweep_supported(get_format("int4"))
    assert not sweep_supported(get_format("int8"))  # 128 levels a side: candidate searches instead
    assert not sweep_supported(get_format("int4"), symmetric=False)
    with pytest.raises(ValueError, match="breakpoint sweep"):
        optimal_scale(torch.randn(2, 8), get_format("int8"))
