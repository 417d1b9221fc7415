"""Every format's grid and rounding, against torch / torchao casts and a brute-force nearest point."""

import pytest
import torch

import statqat_ao as sq
from statqat_ao.numerics.rounding import round_to_grid

ALL = sq.known_formats()


def brute_force_nearest(v: torch.Tensor, grid: tuple[float, ...]) -> torch.Tensor:
    g = torch.tensor(grid, dtype=torch.float64)
    idx = (v.double()[:, None] - g[None, :]).abs().argmin(dim=1)
    return g[idx].float()


def test_unknown_format_lists_known_names():
    with pytest.raises(ValueError, match="unknown format 'int5'.*int4.*nvfp4"):
        sq.get_format("int5")


@pytest.mark.parametrize(
    "name,levels,max_value",
    [
        ("int2", 4, 2), ("int3", 8, 4), ("int4", 16, 8), ("int8", 256, 128), ("uint4", 16, 15),
        ("int4_narrow", 15, 7), ("fp4_e2m1", 15, 6), ("fp4_e3m0", 15, 16), ("fp6_e2m3", 63, 7.5),
        ("fp6_e3m2", 63, 28), ("fp8_e4m3", 253, 448), ("fp8_e5m2", 247, 57344), ("nf4", 16, 1),
        ("sf4", 16, 1), ("mxfp4", 15, 6), ("nvfp4", 15, 6),
    ],
)  # fmt: skip
def test_grid_sizes(name, levels, max_value):
    fmt = sq.get_format(name)
    assert fmt.levels == levels and fmt.max_value == max_value
    assert list(fmt.grid) == sorted(set(fmt.grid))


def test_block_formats():
    assert (sq.get_format("mxfp4").block_size, sq.get_format("mxfp4").scale_format) == (32, "e8m0")
    assert (sq.get_format("nvfp4").block_size, sq.get_format("nvfp4").scale_format) == (16, "fp8_e4m3")


@pytest.mark.parametrize("name", ALL)
def test_rounding_is_nearest_grid_point(name):
    fmt = sq.get_format(name)
    torch.manual_seed(0)
    span = fmt.max_value * 1.3
    v = torch.cat([torch.rand(20000) * 2 * span - span, torch.tensor(fmt.grid)])
    g = torch.tensor(fmt.grid, dtype=torch.float64)
    d = (v.double()[:, None] - g[None, :]).abs().sort(dim=1).values
    v = v[d[:, 0] < d[:, 1]]  # exact ties are checked against torch's casts below
    assert torch.equal(round_to_grid(v, fmt), brute_force_nearest(v, fmt.grid))


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_bit_exact_with_torch_casts_including_ties(name, dtype):
    fmt = sq.get_format(name)
    g = torch.tensor(fmt.grid)
    mids = (g[1:] + g[:-1]) / 2  # exact ties
    torch.manual_seed(0)
    rand = (torch.randn(100000) * fmt.max_value / 8).clamp(-fmt.max_value, fmt.max_value)
    tiny = torch.tensor([2.0**-12, 2.0**-9, 3 * 2.0**-10, 2.0**-17, 2.0**-16, 1e-30, 0.0, -0.0])
    v = torch.cat([g, mids, rand, tiny, -tiny])
    assert torch.equal(round_to_grid(v, fmt), v.to(dtype).float())


def test_fp4_bit_exact_with_torchao():
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, f32_to_f4_unpacked

    fmt = sq.get_format("fp4_e2m1")
    g = torch.tensor(fmt.grid)
    v = torch.cat([g, (g[1:] + g[:-1]) / 2, torch.randn(50000) * 3]).clamp(-6, 6)
    assert torch.equal(round_to_grid(v, fmt), f4_unpacked_to_f32(f32_to_f4_unpacked(v)))


@pytest.mark.parametrize("name", ["fp6_e2m3", "fp6_e3m2"])
def test_fp6_bit_exact_with_torchao(name):
    from torchao.prototype.mx_formats import kernels

    fmt = sq.get_format(name)
    enc = getattr(kernels, f"f32_to_f6_{name[4:]}_unpacked")
    dec = getattr(kernels, f"f6_{name[4:]}_unpacked_to_f32")
    g = torch.tensor(fmt.grid)
    v = torch.cat([g, (g[1:] + g[:-1]) / 2, torch.randn(50000) * fmt.max_value / 3])
    v = v.clamp(-fmt.max_value, fmt.max_value)
    assert torch.equal(round_to_grid(v, fmt), dec(enc(v)))


def test_int_rounding_ties_to_even_like_torch_round():
    fmt = sq.get_format("int8")
    v = torch.arange(-300, 300, dtype=torch.float32) / 2  # every half-integer
    assert torch.equal(round_to_grid(v, fmt), torch.round(v).clamp(-128, 127))


def test_nf4_table_matches_torchao():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    # torchao stores the QLoRA table to 4 decimals; ours is the full-precision one
    # bitsandbytes uses.
    fmt = sq.get_format("nf4")
    w = torch.randn(64, 64)
    nf4 = NF4Tensor.from_tensor(w, block_size=64, scaler_block_size=64)
    assert torch.allclose(torch.tensor(fmt.grid), nf4.nf4.float(), atol=1e-4)


def test_sf4_follows_the_nf4_construction():
    from scipy import stats

    from statqat_ao.numerics.formats import NF4_TABLE, _normal_float_table

    # The construction reproduces the published NF4 table, so SF4 (same construction on
    # Student-t, nu=5) is built the way its authors built it.
    assert max(abs(a - b) for a, b in zip(_normal_float_table(stats.norm.ppf), NF4_TABLE, strict=False)) < 1e-6
    sf4 = sq.get_format("sf4").grid
    assert sf4[0] == -1.0 and sf4[-1] == 1.0 and 0.0 in sf4
    assert all(abs(s) <= abs(n) + 1e-9 or abs(n) == 1 for s, n in zip(sf4, NF4_TABLE, strict=False))
