"""StatQAT fake-quantize and observer modules for torch.ao's own FX flow.

``StatQATFakeQuantize`` is a torch.ao ``FakeQuantizeBase`` and ``StatQATObserver`` a
torch.ao ``ObserverBase``; both run a :class:`~statqat_ao.FakeQuantizer` (statistics
once per training forward, Python-bool flags). torch.ao matches quantizers against its
BackendConfig by ``dtype``, so every format reports an 8-bit *carrier* dtype: signed
INT formats ``qint8`` with their narrow range (INT4: -8..7), activations ``quint8`` with
the zero point shifted by 128 (torch's symmetric quint8 convention: the same codes).

torch.ao's own ``convert_fx`` can express INT formats per tensor or per channel only;
for FP4/NF4/MX/NV formats and per-group scales use :func:`statqat_ao.convert`, which
reads the same modules.

Example:
    >>> import torch, statqat_ao as sq
    >>> from torch.ao.quantization.quantize_fx import prepare_qat_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4)).train()
    >>> prepared = prepare_qat_fx(model, sq.statqat_qconfig, (torch.randn(2, 8),))
    >>> type(prepared.get_submodule("0").weight_fake_quant).__name__
    'StatQATFakeQuantize'
"""

from __future__ import annotations

import torch
from torch.ao.quantization import FakeQuantizeBase, ObserverBase, QConfig

from statqat_ao.numerics.formats import Format
from statqat_ao.quantizers.fake_quantizer import FakeQuantizer


def carrier(fmt: Format, symmetric: bool, is_activation: bool) -> tuple[torch.dtype, int, int, int]:
    """torch.ao ``(dtype, quant_min, quant_max, zero_point_offset)`` that carries ``fmt``.

    Non-INT formats report the carrier of an INT format of the same width, for
    BackendConfig matching only (their codes are not integers).

    Example:
        >>> from statqat_ao import get_format
        >>> carrier(get_format("int4"), True, False), carrier(get_format("int8"), True, True)
        ((torch.qint8, -8, 7, 0), (torch.quint8, 0, 255, 128))
    """
    lo, hi = (int(fmt.qmin), int(fmt.qmax)) if fmt.family == "int" else (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1)
    if is_activation and lo < 0 and fmt.bits == 8 and symmetric:
        offset = 2 ** (fmt.bits - 1)  # torch's symmetric quint8: zero point 128
        return torch.quint8, lo + offset, hi + offset, offset
    if lo < 0:
        return torch.qint8, max(lo, -128), min(hi, 127), 0
    return torch.quint8, lo, min(hi, 255), 0


class _TorchAOQuantizerMixin:
    """What torch.ao reads from an observer / fake quantize: dtype, qscheme, range, axis."""

    def _init_torch_ao(self, is_activation: bool) -> None:
        self.is_activation = is_activation
        self.dtype, self.quant_min, self.quant_max, self._zp_offset = carrier(
            self.fmt, self.symmetric, is_activation
        )
        per_channel = self.granularity != "tensor"
        if self.symmetric:
            self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        else:
            self.qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
        self.ch_axis = self.axis
        self.is_dynamic = False

    @property
    def activation_post_process(self):
        # torch.ao reads a fake quantize's inner observer from this attribute; ours is itself.
        return self

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point in torch.ao's convention (for its ``convert_fx``).

        Raises:
            NotImplementedError: for formats and granularities torch.ao cannot express.
        """
        if self.fmt.family != "int" or self.granularity not in ("tensor", "channel"):
            raise NotImplementedError(
                f"torch.ao's convert cannot express {self.fmt.name} with granularity "
                f"{self.granularity!r}; convert with statqat_ao.convert(model) instead"
            )
        return self.scale.reshape(-1), self.zero_point.reshape(-1) + self._zp_offset


class _ObserveOnlyMixin:
    """Observers: estimate on every forward while observing, return the input unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self._estimate(x)
        return x


class StatQATFakeQuantize(_TorchAOQuantizerMixin, FakeQuantizer, FakeQuantizeBase):
    """A torch.ao fake-quantize module with a StatQAT scale.

    Args:
        fmt, method, granularity, axis, symmetric, error: as :class:`~statqat_ao.FakeQuantizer`.
        is_activation: report torch.ao's activation carrier dtype.
        factory_kwargs: accepted for torch.ao's QAT modules (device is honoured).

    Example:
        >>> fq = StatQATFakeQuantize.with_args(fmt="int4", granularity="channel")()
        >>> fq.dtype, fq.quant_min, fq.quant_max
        (torch.qint8, -8, 7)
    """

    nonfinite_hint = (
        " Under torch.ao's prepare_qat_fx, a batch norm weight of exactly 0 after a conv (timm's zero_init_last, "
        "torchvision's zero_init_residual) makes torch.ao's ConvBn2d divide its conv output 0/0 before any quantizer: "
        "call sq.torch_ao_exact_zero_batch_norm_weights(prepared_model) before training (torch.ao's own exact fold "
        "for those modules), or prepare with sq.prepare_qat_fx, whose fold takes a zero weight exactly."
    )

    def __init__(
        self,
        fmt="int8",
        method="analytic",
        granularity="tensor",
        axis=0,
        symmetric=True,
        is_activation=False,
        factory_kwargs=None,
        error="weight",
    ):
        super().__init__(fmt, method, granularity, axis, symmetric, error=error)
        self._init_torch_ao(is_activation)
        device = (factory_kwargs or {}).get("device")
        if device is not None:
            self.to(device)


class StatQATObserver(_ObserveOnlyMixin, _TorchAOQuantizerMixin, FakeQuantizer, ObserverBase):
    """A torch.ao observer (post-training calibration) with a StatQAT scale.

    Estimates on every forward while observing and returns its input unchanged.

    Example:
        >>> obs = StatQATObserver(fmt="int8", method="iterative")
        >>> _ = obs(torch.randn(100))
        >>> obs.calculate_qparams()[0].item() > 0
        True
    """

    def __init__(self, fmt="int8", method="iterative", granularity="tensor", axis=0, symmetric=True, is_activation=True, factory_kwargs=None):
        FakeQuantizer.__init__(self, fmt, method, granularity, axis, symmetric)
        self._init_torch_ao(is_activation)
        self.fake_quant_enabled = False


def torch_ao_qconfig(weight, activation) -> QConfig | None:
    """A torch.ao ``QConfig`` for two :class:`~statqat_ao.frontends.qconfig.QuantSpec` (None if both float).

    Example:
        >>> from statqat_ao.frontends.qconfig import QuantSpec
        >>> qc = torch_ao_qconfig(QuantSpec("int4", granularity="channel"), None)
        >>> type(qc.weight()).__name__, qc.activation().dtype
        ('StatQATFakeQuantize', torch.float32)
    """
    if weight is None and activation is None:
        return None
    from torch.ao.quantization import PlaceholderObserver

    def ctor(spec, is_activation):
        if spec is None:
            return PlaceholderObserver.with_args(dtype=torch.float)
        return StatQATFakeQuantize.with_args(
            fmt=spec.fmt,
            method=spec.method,  # "lsq" raises when torch.ao builds it: LSQ runs in sq.prepare_qat_fx
            granularity=spec.granularity,
            axis=spec.axis,
            symmetric=spec.symmetric,
            is_activation=is_activation,
            error=spec.error,  # torch.ao's QAT modules pass no layer input: "auto" is the weight's error
        )

    return QConfig(activation=ctor(activation, True), weight=ctor(weight, False))


__all__ = ["StatQATFakeQuantize", "StatQATObserver", "carrier", "torch_ao_qconfig"]
