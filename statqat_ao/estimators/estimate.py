"""The offline entry point, :func:`estimate_qparams`: a tensor in, a scale and zero point out."""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_stats import tensor_abs_max
from statqat_ao.numerics.blocks import Granularity, block_layout
from statqat_ao.numerics.compute_range import count_beyond_float32
from statqat_ao.numerics.formats import Format, get_format
from statqat_ao.numerics.scale_formats import cap_scale, nvfp4_tensor_scale, round_scale
from statqat_ao.parallel.distributed import narrowed_to

from .common import usable_scale
from .minmax import minmax_qparams
from .registry import get_estimator


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError if ``x`` holds NaN or Inf (a scale from it would be NaN)."""
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name} holds {n_nan} NaN and {n_inf} Inf values out of {x.numel()}: "
            "a scale estimated from it would be NaN. Find where they come from "
            "(overflow, a bad batch) before quantizing."
        )


def check_float32_range(x: torch.Tensor, name: str) -> None:
    """Raise ValueError if a float64 ``x`` holds finite values that overflow float32."""
    n = count_beyond_float32(x)
    if n:
        raise ValueError(
            f"{name} holds {n} float64 values beyond float32's range (max |x| = "
            f"{float(x[torch.isfinite(x)].abs().max()):.3g}, float32's max is 3.4e38): statqat-ao "
            "estimates scales and fake-quantizes in float32, where they would be Inf. Rescale the "
            "tensor (e.g. by a power of two) or leave it unquantized."
        )


def estimate_qparams(
    x: torch.Tensor,
    fmt: str | Format,
    method: str = "analytic",
    granularity: Granularity | None = "tensor",
    axis: int = 0,
    symmetric: bool = True,
    name: str = "input",
    weights: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate the scale and zero point that quantize ``x`` to ``fmt``.

    Args:
        x: floating-point tensor (bf16/fp16 statistics are computed in float32).
        fmt: a format name or :class:`~statqat_ao.numerics.formats.Format`.
        method: one of ``minmax``, ``analytic``, ``iterative``, ``mse``, ``octav``, ``lsq``.
        granularity: ``"tensor"``, ``"channel"`` (along ``axis``) or an int group size
            (consecutive elements of each row along axis 0). Block formats (MXFP4,
            NVFP4) use their own block size.
        axis: the channel axis.
        symmetric: zero point 0. Asymmetric quantizers (integer zero point) need an INT format.
        name: what to call ``x`` in error messages (a module or tensor name).
        weights: non-negative per-element error weights broadcastable to ``x`` (e.g. a
            Linear input's second moments ``E[x_j^2]``, shape ``[in_features]``, for the
            output-aware error ``sum_j h_j (w_ij - q_ij)^2``); methods in
            :func:`~statqat_ao.estimators.error_weighted_methods` only.
        **options: method options, e.g. ``steps=`` and ``init=`` for ``iterative``,
            ``family=`` for ``analytic``.

    Returns:
        ``(scale, zero_point)``: float32 scale (finite, positive) and int32 zero point,
        shaped to broadcast against ``x`` (per tensor, per channel) or to group it (per
        group: ``[rows, row_len // group_size]``). Block formats return the effective
        scale, already rounded to their scale format.

    Example:
        >>> import torch, statqat_ao as sq
        >>> w = torch.randn(64, 128)
        >>> s, zp = sq.estimate_qparams(w, "int4", "analytic", granularity="channel")
        >>> s.shape, zp.dtype
        (torch.Size([64, 1]), torch.int32)

    Raises:
        ValueError: unknown method or format, NaN/Inf in ``x`` (or float64 values that
            overflow float32, where scales are computed), an empty ``x``, a group
            size that does not divide the row length, asymmetric non-INT formats.
    """
    fmt = get_format(fmt)
    estimator = get_estimator(method)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not symmetric and fmt.family != "int":
        raise ValueError(
            f"asymmetric quantization needs an INT format (integer zero point); {fmt.name} is "
            f"{fmt.family}. Use symmetric=True."
        )
    layout = block_layout(x.shape, granularity, axis, fmt, name)
    dtype = x.dtype
    check_float32_range(x.detach(), name)
    x = x.detach().float()
    check_finite(x, name)
    blocks = layout.to_blocks(x)
    if weights is not None:
        options["weights"] = layout.to_blocks(element_weights(weights, x, method, name))
    with narrowed_to(layout):  # under distributed.reduce_statistics: only blocks spanning ranks
        # The tensor amax of every rank (the global amax under reduce_statistics).
        ts = nvfp4_tensor_scale(tensor_abs_max(x)) if fmt.scale_format == "fp8_e4m3" else None
        if fmt.is_block_format and estimator.representable_scales:
            options["tensor_scale"] = ts
        s, zp = estimator.estimate(blocks, fmt, symmetric, **options)
        s = finalize_scale(blocks, s, fmt, symmetric)
        if fmt.is_block_format and not estimator.representable_scales:
            s = round_scale(blocks, s, fmt, estimator.standard_scale_rounding, ts, options.get("weights"))
        s = cap_scale(s, dtype, fmt, symmetric)  # every grid point finite in x's dtype
    return layout.from_blocks(s), layout.from_blocks(zp.to(torch.int32))


def element_weights(weights: torch.Tensor, x: torch.Tensor, method: str, name: str) -> torch.Tensor:
    """``weights`` checked (finite, non-negative, broadcastable) and expanded to ``x``'s shape."""
    if not get_estimator(method).error_weighted:
        from .registry import error_weighted_methods

        raise ValueError(f"method {method!r} does not minimise a weighted error; use one of {error_weighted_methods()}")
    w = weights.detach().float()
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError(f"the error weights for {name} must be finite and non-negative")
    try:
        return torch.broadcast_to(w, x.shape)
    except RuntimeError:
        raise ValueError(
            f"error weights of shape {tuple(w.shape)} do not broadcast against {name} of shape {tuple(x.shape)}"
        ) from None


def finalize_scale(blocks: torch.Tensor, s: torch.Tensor, fmt: Format, symmetric: bool) -> torch.Tensor:
    """Make every scale finite and positive.

    A block whose estimate is not (an all-zero or constant-zero block) gets MinMax's
    scale, or 1.0 where that is zero too: zeros then quantize to exact zeros.
    """
    bad = ~usable_scale(s)
    if bool(bad.any()):
        s_mm, _ = minmax_qparams(blocks, fmt, symmetric)
        fallback = torch.where(s_mm > 0, s_mm, torch.ones_like(s_mm))
        s = torch.where(bad, fallback, s)
    return s.clamp(min=torch.finfo(torch.float32).tiny)
