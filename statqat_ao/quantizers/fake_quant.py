"""The fake-quantize op: ``statqat::fake_quantize``.

Registered as a CompositeImplicitAutograd custom op, so that

* torch.export keeps it as one recognisable node (``torch.ops.statqat.fake_quantize``)
  that graph passes can find, and ``run_decompositions()`` expands it;
* torch.compile traces through its body (plain elementwise ops) and Inductor fuses it
  into the surrounding kernel, forward and backward, with no graph break. An opaque
  custom op would not fuse.

Gradients come from autograd on the body: the straight-through estimate for ``x``
(the upstream gradient inside the clip range, zero outside) and none for the scale,
unless ``learn_scale=True`` (LSQ's gradient).
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.blocks import group_view
from statqat_ao.numerics.formats import Format, get_format
from statqat_ao.numerics.rounding import quantize_to_grid

_LIB = torch.library.Library("statqat", "DEF")
_LIB.define(
    "fake_quantize(Tensor x, Tensor scale, Tensor zero_point, str fmt, bool learn_scale=False) -> Tensor"
)


def _fake_quantize_impl(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str, learn_scale: bool = False
) -> torch.Tensor:
    f = get_format(fmt)
    shape, dtype = x.shape, x.dtype
    xf, s, z = x.float(), scale.float(), zero_point.float()
    grouped = group_view(x, scale)
    if grouped is not None:
        xf, s = xf.reshape(grouped[0]), s.reshape(grouped[1])
        if z.dim() > 0:
            z = z.reshape(grouped[1])
    s_fixed = s.detach()
    v = xf.detach() / s_fixed + z
    codes = quantize_to_grid(xf.detach() / s_fixed, z, f)
    x_hat = (codes - z) * s_fixed
    if learn_scale:
        # LSQ: x_hat = s * round(clamp(x/s + z) - z) with a straight-through round.
        v_grad = (xf / s + z).clamp(f.qmin, f.qmax)
        surrogate = (v_grad + (codes - v_grad).detach() - z) * s
        out = x_hat + (surrogate - surrogate.detach())
    else:
        inside = (v >= f.qmin) & (v <= f.qmax)
        out = x_hat + torch.where(inside, xf - xf.detach(), torch.zeros_like(xf))
    return out.reshape(shape).to(dtype)


_LIB.impl("fake_quantize", _fake_quantize_impl, "CompositeImplicitAutograd")


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    fmt: str | Format = "int8",
    learn_scale: bool = False,
) -> torch.Tensor:
    """Quantize and dequantize ``x``: ``scale * (clamp(round_G(x / scale) + zp) - zp)``.

    ``scale`` broadcasts against ``x`` (per tensor, per channel) or groups it (per
    group, ``[rows, row_len // group_size]``, as :func:`estimate_qparams` returns).
    Computed in float32 and returned in ``x``'s dtype.

    Example:
        >>> import torch, statqat_ao as sq
        >>> w = torch.randn(16, 64, requires_grad=True)
        >>> s, zp = sq.estimate_qparams(w, "fp4_e2m1", "analytic", granularity=32)
        >>> w_q = sq.fake_quantize(w, s, zp, "fp4_e2m1")
        >>> w_q.sum().backward()  # straight-through gradient
    """
    f = get_format(fmt)
    if zero_point is None:
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
    return torch.ops.statqat.fake_quantize(x, scale, zero_point, f.name, learn_scale)
