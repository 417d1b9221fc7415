"""Storage codes and the quantize/dequantize ops, against torch and torchao casts."""

import io

import pytest
import torch

import statqat_ao as sq
from statqat_ao.numerics.codes import code_dtype, dequantize, quantize

ALL = sq.known_formats()


def _scales(x, f, symmetric=True):
    return sq.estimate_qparams(x, f, "minmax", granularity=f.block_size or "channel", symmetric=symmetric)


@pytest.mark.parametrize("name", ALL)
def test_dequantize_of_codes_is_bit_identical_to_fake_quantize(name):
    f = sq.get_format(name)
    torch.manual_seed(0)
    x = torch.randn(6, 64) * 3
    for symmetric in (True, False) if f.family == "int" else (True,):
        s, zp = _scales(x, f, symmetric)
        codes = quantize(x, s, zp, f)
        assert codes.dtype == code_dtype(f)
        # Equal values (fake_quantize's straight-through add turns -0.0 into +0.0; the
        # codes keep the sign of zero, as torch's and torchao's casts do).
        assert torch.equal(dequantize(codes, s, zp, f), sq.fake_quantize(x, s, zp, f))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_codes_are_torch_float8_bits(name):
    f = sq.get_format(name)
    v = torch.randn(4096) * 50
    v = v.clamp(-f.max_value, f.max_value)
    codes = quantize(v, torch.ones(()), None, f)
    assert torch.equal(codes, v.to(f.torch_dtype).view(torch.uint8))


def test_fp4_and_fp6_codes_match_torchao_packing_order():
    from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, f32_to_f6_e2m3_unpacked

    v = torch.randn(4096) * 3
    assert torch.equal(quantize(v, torch.ones(()), None, "fp4_e2m1"), f32_to_f4_unpacked(v))
    assert torch.equal(quantize(v, torch.ones(()), None, "fp6_e2m3"), f32_to_f6_e2m3_unpacked(v))


def test_int_codes_are_rounded_clamped_integers():
    x = torch.randn(8, 32) * 4
    s, zp = _scales(x, sq.get_format("int4"))
    codes = quantize(x, s, zp, "int4")
    expected = torch.clamp(torch.round(x / s), -8, 7).to(torch.int8)
    assert torch.equal(codes, expected)


def test_lut_codes_are_nearest_table_indices():
    f = sq.get_format("nf4")
    v = torch.rand(4096) * 2 - 1
    table = torch.tensor(f.grid)
    nearest = (v[:, None] - table[None, :]).abs().argmin(dim=1)
    assert torch.equal(quantize(v, torch.ones(()), None, f).long(), nearest)


def test_quantized_params_round_trip_with_weights_only_load():
    w = torch.randn(16, 64)
    s, zp = sq.estimate_qparams(w, "nvfp4", "analytic")
    q = sq.QuantizedParams.from_tensor(w, s, zp, "nvfp4")
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = sq.QuantizedParams("int8", torch.ones(()), torch.zeros((), dtype=torch.int32))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.fmt.name == "nvfp4" and fresh.granularity == 16
    assert torch.equal(fresh.dequantize(), sq.fake_quantize(w, s, zp, "nvfp4"))
