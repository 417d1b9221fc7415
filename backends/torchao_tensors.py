"""torchao tensor subclasses built from a converted weight's codes and scales.

One builder per torchao type; each takes a :class:`~statqat_ao.quantizers.quantized.QuantizedParams`
of a 2-D Linear weight and returns the torchao tensor holding the same codes and scales
(nothing is re-estimated or re-rounded):

================================  ==========================================  ============
formats                           torchao tensor                              storage
================================  ==========================================  ============
int8, symmetric per channel       ``Int8Tensor``                              1 byte / w
int4 / uint4, groups 32, 64, 128  ``Int4OpaqueTensor`` (CPU tinygemm, packed) 0.5 byte / w
or per channel (rows of 32k)
int2-int8, any granularity        ``IntxUnpackedToInt8Tensor``                1 byte / w
nvfp4                             ``NVFP4Tensor`` (E2M1 pairs, E4M3 scales)   0.5 byte / w
mxfp4                             ``MXTensor`` (emulated: dequantized to run) 0.5 byte / w
================================  ==========================================  ============

Example:
    >>> import torch, statqat_ao as sq
    >>> from statqat_ao.quantizers.quantized import QuantizedParams
    >>> w = torch.randn(32, 64)
    >>> p = QuantizedParams.from_tensor(w, *sq.estimate_qparams(w, "int3", granularity=32), "int3")
    >>> t = intx_tensor(p)
    >>> type(t).__name__, torch.equal(t.dequantize(), p.dequantize())
    ('IntxUnpackedToInt8Tensor', True)
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.formats import get_format
from statqat_ao.quantizers.quantized import QuantizedParams

INT4_PACKED_GROUPS = (32, 64, 128)  # what the CPU tinygemm kernel accepts


def _block_size(p: QuantizedParams) -> tuple[int, int]:
    n, k = p.codes.shape
    g = p.granularity
    return (n, k) if g == "tensor" else (1, k) if g == "channel" else (1, g)


def _grouped(t: torch.Tensor, p: QuantizedParams) -> torch.Tensor:
    """Scale / zero point as torchao's ``[N / block_n, K / block_k]``."""
    bn, bk = _block_size(p)
    n, k = p.codes.shape
    return t.reshape(n // bn, k // bk).clone()  # the torchao tensor owns its scales


def int8_tensor(p: QuantizedParams):
    """``Int8Tensor`` of a symmetric per-channel (or per-tensor) INT8 weight."""
    from torchao.quantization import Int8Tensor

    return Int8Tensor(p.codes, _grouped(p.scale, p), list(_block_size(p)), p.dtype)


def intx_tensor(p: QuantizedParams):
    """``IntxUnpackedToInt8Tensor``: INT2-INT8 codes (one int8 each), any granularity.

    torchao keeps signed codes; an unsigned format's codes and zero point are shifted
    by ``2^(bits-1)``, which leaves ``code - zero_point`` (the dequantized value) unchanged.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    f = p.fmt
    shift = 0 if f.signed else 1 << (f.bits - 1)
    qdata = (p.codes.to(torch.int16) - shift).to(torch.int8)
    zero_point = (_grouped(p.zero_point, p) - shift).to(torch.int8)
    target = getattr(torch, f"int{f.bits}")
    return IntxUnpackedToInt8Tensor(qdata, _grouped(p.scale, p), zero_point, target, _block_size(p), p.dtype, None)


def int4_packed_group(p: QuantizedParams) -> int | None:
    """The tinygemm group size for a 4-bit weight, or None when the kernel cannot take it.

    A per-channel weight uses the largest accepted group that divides its rows, with
    its one scale repeated per group (the same values, so still exact).
    """
    n, k = p.codes.shape
    g = p.granularity
    if p.fmt.family != "int" or p.fmt.bits != 4 or n % 16 or g == "tensor":
        return None
    if g == "channel":
        return next((c for c in reversed(INT4_PACKED_GROUPS) if k % c == 0), None)
    return g if g in INT4_PACKED_GROUPS else None


def int4_packed_tensor(p: QuantizedParams):
    """``Int4OpaqueTensor`` for CPU's tinygemm kernel: 4-bit codes packed two per byte.

    tinygemm computes ``(q - 8) * scale + zero`` with ``q`` in 0..15, so a signed code
    becomes ``q = code + 8`` with ``zero = 0``, and an unsigned code with zero point
    ``zp`` becomes ``q = code`` with ``zero = (8 - zp) * scale``.
    """
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    group = int4_packed_group(p)
    if group is None:
        raise ValueError(f"tinygemm needs groups of {INT4_PACKED_GROUPS} and a multiple of 16 rows")
    f = p.fmt
    n, k = p.codes.shape
    per_group = k // group
    scale = _grouped(p.scale, p).to(p.dtype).repeat_interleave(per_group // (p.scale.numel() // n), dim=1)
    zp = _grouped(p.zero_point, p).to(p.dtype).repeat_interleave(per_group // (p.zero_point.numel() // n), dim=1)
    q = p.codes.to(torch.int32) + (8 if f.signed else 0)
    zero = torch.zeros_like(scale) if f.signed else (8 - zp) * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale, zero, p.dtype)
    return Int4OpaqueTensor(packed, scale_and_zero, [1, group], p.codes.shape)


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the low nibble (torchao's FP4 packing)."""
    flat = codes.contiguous().reshape(*codes.shape[:-1], -1, 2)
    return flat[..., 0] | (flat[..., 1] << 4)


_E4M3_POSITIVE = torch.tensor([v for v in get_format("fp8_e4m3").grid if v > 0])


def nvfp4_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split NVFP4 effective block scales into ``(e4m3 block scales, fp32 tensor scale)``.

    For QuantizedParams without a stored tensor scale (convert stores it): the scales are
    ``fl(tensor_scale * e4m3)``, and the tensor scale is recovered from the largest block scale: for each E4M3 value ``v`` that block may have
    used, the float32 numbers within a few ulps of ``max(scale) / v`` are tried, and one
    is accepted only when it reproduces every block scale exactly.

    Raises:
        ValueError: no tensor scale reproduces these scales (they were not NVFP4's).
    """
    s = scale.float()
    top = s.max()
    for v in reversed(_E4M3_POSITIVE.tolist()):
        base = top / v
        for ts in _nearby_floats(base, 4):
            e4m3 = (s / ts).to(torch.float8_e4m3fn)
            if torch.equal(ts * e4m3.float(), s):
                return e4m3, ts
    raise ValueError("these block scales are not an FP32 tensor scale times E4M3 values")


def _nearby_floats(x: torch.Tensor, ulps: int) -> list[torch.Tensor]:
    """``x`` and the float32 numbers up to ``ulps`` steps either side, nearest first."""
    out, up, down = [x], x, x
    for _ in range(ulps):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(0.0))
        out += [up, down]
    return out


def nvfp4_block_scales(scale: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 block scales of effective scales ``fl(tensor_scale * e4m3)``, checked exactly.

    Raises:
        ValueError: some block scale is not ``tensor_scale`` times an E4M3 value.
    """
    e4m3 = (scale.float() / tensor_scale).to(torch.float8_e4m3fn)
    if not torch.equal(tensor_scale * e4m3.float(), scale.float()):
        raise ValueError("the NVFP4 block scales are not the stored tensor scale times E4M3 values")
    return e4m3


def nvfp4_tensor(p: QuantizedParams):
    """``NVFP4Tensor`` from the E2M1 codes and the E4M3 x FP32 scales (block 16).

    The tensor scale is the one convert stored; QuantizedParams built without it (by hand)
    have it recovered by :func:`nvfp4_scales`.
    """
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

    scale = _grouped(p.scale, p)
    if p.tensor_scale is not None:
        e4m3, ts = nvfp4_block_scales(scale, p.tensor_scale), p.tensor_scale
    else:
        e4m3, ts = nvfp4_scales(scale)
    return NVFP4Tensor(_pack_pairs(p.codes), e4m3, 16, p.dtype, per_tensor_scale=ts)


def mxfp4_tensor(p: QuantizedParams):
    """``MXTensor`` (emulated kernel) from the E2M1 codes and E8M0 block scales (block 32)."""
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.quantization.quantize_.common import KernelPreference

    scale = _grouped(p.scale, p)
    e8m0 = scale.to(torch.float8_e8m0fnu)
    if not torch.equal(e8m0.float(), scale):
        raise ValueError("MXFP4 scales are not powers of two")
    return MXTensor(
        _pack_pairs(p.codes), e8m0, torch.float4_e2m1fn_x2, 32, p.dtype, KernelPreference.EMULATED, None, False
    )


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes of the tensors a torchao subclass holds (codes, scales, zero points)."""
    names, _ = t.__tensor_flatten__()
    inner = [getattr(t, n) for n in names]
    return sum(x.numel() * x.element_size() for x in inner if isinstance(x, torch.Tensor))

