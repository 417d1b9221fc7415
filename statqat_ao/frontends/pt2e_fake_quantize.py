"""torchao PT2E fake-quantize and observer modules with StatQAT scales.

:class:`StatQATPT2EFakeQuantize` (QAT, ``prepare_qat_pt2e``) and
:class:`StatQATPT2EObserver` (calibration, ``prepare_pt2e``) are torchao pt2e
``FakeQuantizeBase`` / ``ObserverBase`` modules running a :class:`~statqat_ao.FakeQuantizer`;
:func:`quantization_spec` is the ``QuantizationSpec`` that asks for one.

Example:
    >>> spec = quantization_spec(QuantSpec("int8", method="iterative"), is_activation=True)
    >>> spec.dtype, spec.quant_min, spec.quant_max
    (torch.quint8, 0, 255)
"""

from __future__ import annotations

from functools import cache

import torch
from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase
from torchao.quantization.pt2e.quantizer import QuantizationSpec

from statqat_ao.estimators import online_methods
from statqat_ao.numerics.blocks import Granularity
from statqat_ao.numerics.formats import Format
from statqat_ao.quantizers.fake_quant import fake_quantize
from statqat_ao.quantizers.fake_quantizer import FakeQuantizer

from .exported_mode import FollowsExportedMode
from .qconfig import QuantSpec
from .torch_ao import _ObserveOnlyMixin, _TorchAOQuantizerMixin

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


class StatQATPT2EFakeQuantize(FollowsExportedMode, _TorchAOQuantizerMixin, FakeQuantizer, FakeQuantizeBase):
    """A torchao PT2E fake-quantize module with a StatQAT scale.

    Args:
        fmt, method, granularity, axis, symmetric: as :class:`~statqat_ao.FakeQuantizer`.
        is_activation: report the activation carrier dtype (see
            :func:`statqat_ao.frontends.torch_ao.carrier`).
        dtype, quant_min, quant_max, qscheme, ch_axis, is_dynamic: what torchao passes
            from a ``QuantizationSpec``. ``dtype`` / ``quant_min`` / ``quant_max`` may
            choose another carrier of the same width (e.g. ``torch.int8`` -128..127 for
            INT8 activations: the codes shift, the values do not); anything that
            contradicts the format raises ``ValueError``.

    One instance may be shared by several tensors (the inputs of a residual add or a
    cat): :class:`StatQATQuantizer` tells it how many (``uses``). All of them are then
    quantized with the same scale in a forward, and the last one re-estimates it from
    all of them (joint statistics, applied from the next forward on).

    Example:
        >>> import torch
        >>> fq = StatQATPT2EFakeQuantize(fmt="int4", granularity="channel")
        >>> fq.dtype, fq.quant_min, fq.quant_max, fq.qscheme
        (torch.qint8, -8, 7, torch.per_channel_symmetric)
        >>> fq(torch.randn(4, 16)).shape, fq.fake_quant_enabled
        (torch.Size([4, 16]), True)
    """

    def __init__(
        self,
        fmt: str | Format = "int8",
        method: str = "analytic",
        granularity: Granularity = "tensor",
        axis: int = 0,
        symmetric: bool = True,
        is_activation: bool = False,
        dtype: torch.dtype | None = None,
        quant_min: int | None = None,
        quant_max: int | None = None,
        qscheme: torch.qscheme | None = None,
        ch_axis: int | None = None,
        is_dynamic: bool = False,
    ):
        super().__init__(fmt, method, granularity, axis, symmetric)
        self._init_torch_ao(is_activation)
        self._check_spec(dtype, quant_min, quant_max, qscheme, ch_axis, is_dynamic)
        self.uses = 1
        self._call = 0
        self._observing = False
        self._pending: list[torch.Tensor] = []

    def _check_spec(self, dtype, quant_min, quant_max, qscheme, ch_axis, is_dynamic) -> None:
        where = f"StatQATPT2EFakeQuantize({self.extra_repr()})"
        if is_dynamic:
            raise ValueError(f"{where}: StatQAT scales are static; use is_dynamic=False")
        if qscheme is not None and (qscheme in _PER_CHANNEL) != (self.qscheme in _PER_CHANNEL):
            raise ValueError(
                f"{where}: qscheme {qscheme} contradicts granularity {self.granularity!r}"
            )
        if ch_axis is not None and self.qscheme in _PER_CHANNEL and ch_axis != self.axis:
            raise ValueError(f"{where}: ch_axis {ch_axis} contradicts axis {self.axis}")
        if dtype is None and quant_min is None and quant_max is None:
            return
        lo, hi = self.quant_min - self._zp_offset, self.quant_max - self._zp_offset
        qmin = self.quant_min if quant_min is None else int(quant_min)
        qmax = self.quant_max if quant_max is None else int(quant_max)
        if qmax - qmin != hi - lo:
            raise ValueError(
                f"{where}: quant range [{qmin}, {qmax}] does not hold the {hi - lo + 1} codes of "
                f"{self.fmt.name} (its carrier range is [{self.quant_min}, {self.quant_max}])"
            )
        self.dtype = self.dtype if dtype is None else dtype
        self.quant_min, self.quant_max, self._zp_offset = qmin, qmax, qmin - lo

    def forward(
        self, x: torch.Tensor, *shared: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Fake-quantize ``x`` (see :class:`~statqat_ao.FakeQuantizer`); shared use as above."""
        if shared or self.uses <= 1:
            return super().forward(x, *shared)
        first, last = self._call == 0, self._call == self.uses - 1
        self._call = 0 if last else self._call + 1
        if first:
            self._observing = self.observer_enabled and (self.training or not self.is_initialized)
            self._pending = []
            if self._observing and not self.is_initialized:
                self._estimate(x)  # the first forward: start from the first input's scale
        out = (
            fake_quantize(x, self.scale, self.zero_point, self.fmt)
            if self.fake_quant_enabled
            else x
        )
        if self._observing:
            self._pending.append(x)
            if last:
                self._estimate(*self._pending)  # joint, as FakeQuantizer's shared inputs
                self._pending = []
        return out

    def extra_repr(self) -> str:
        uses = f", uses={self.uses}" if getattr(self, "uses", 1) > 1 else ""
        return super().extra_repr() + uses


@cache
def quantization_spec(spec: QuantSpec, is_activation: bool, observer: bool = False) -> QuantizationSpec:
    """The torchao ``QuantizationSpec`` that makes a :class:`StatQATPT2EFakeQuantize` for ``spec``
    (a :class:`StatQATPT2EObserver` with ``observer=True``).

    Cached, so equal specs give one object.

    Example:
        >>> qs = quantization_spec(QuantSpec("int4", granularity="channel"), False)
        >>> qs.dtype, qs.quant_min, qs.quant_max, qs.qscheme, qs.ch_axis
        (torch.qint8, -8, 7, torch.per_channel_symmetric, 0)
    """
    if spec.method not in online_methods():
        raise ValueError(
            f"StatQATQuantizer runs online estimators only; {spec.method!r} is not one "
            f"(use one of {', '.join(online_methods())}, or the FX flow for LSQ)"
        )
    kwargs = dict(
        fmt=spec.fmt,
        method=spec.method,
        granularity=spec.granularity,
        axis=spec.axis,
        symmetric=spec.symmetric,
        is_activation=is_activation,
    )
    probe = StatQATPT2EFakeQuantize(**kwargs)
    return QuantizationSpec(
        dtype=probe.dtype,
        observer_or_fake_quant_ctr=(StatQATPT2EObserver if observer else StatQATPT2EFakeQuantize).with_args(**kwargs),
        quant_min=probe.quant_min,
        quant_max=probe.quant_max,
        qscheme=probe.qscheme,
        ch_axis=spec.axis if probe.qscheme in _PER_CHANNEL else None,
    )



class StatQATPT2EObserver(_ObserveOnlyMixin, StatQATPT2EFakeQuantize, ObserverBase):
    """A torchao PT2E observer (post-training calibration, ``prepare_pt2e``) with a StatQAT scale.

    Estimates on every forward while observing (one warm-started step per batch for
    ``iterative``) and returns its input unchanged; ``convert_pt2e`` reads the scale.

    Example:
        >>> import torch
        >>> obs = StatQATPT2EObserver(fmt="int8", method="iterative", is_activation=True)
        >>> obs(torch.randn(100)).shape, isinstance(obs, ObserverBase)
        (torch.Size([100]), True)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fake_quant_enabled = False


__all__ = ["StatQATPT2EFakeQuantize", "StatQATPT2EObserver", "quantization_spec"]
