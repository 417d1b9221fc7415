"""The estimator registry: one entry per method, looked up by name.

An :class:`Estimator` bundles what the rest of statqat-ao needs to know of a method:
its offline estimate (``estimate_qparams``, calibration, analysis), its per-step update
for a :class:`~statqat_ao.FakeQuantizer` (``online``; ``None`` for methods that cannot
run per training step), and the few properties the quantizer acts on. A new method is
one file that defines its functions and calls :func:`register`, plus one import line in
``statqat_ao/estimators/__init__.py``.

Example:
    >>> import statqat_ao as sq
    >>> from statqat_ao.estimators import get_estimator, online_methods
    >>> get_estimator("iterative").keeps_zero_point, "mse" in online_methods()
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from statqat_ao.numerics.formats import Format

QParams = tuple[torch.Tensor, torch.Tensor]
EstimateFn = Callable[..., QParams]  # (blocks [B, ...], fmt, symmetric, **options) -> (s [B], zp [B])


class OnlineStep(NamedTuple):
    """What a quantizer hands its method on one training forward.

    Attributes:
        blocks: the batch as a block view ``[B, ...]`` (float32).
        shared: further operands of a shared per-tensor quantizer, passed separately
            only to methods with ``sums_shared_operands`` (others get them joined into
            ``blocks``).
        fmt, symmetric: the quantizer's format and symmetry.
        scale, zero_point: the previous per-block ``[B]`` scale and zero point, or
            ``None`` on the first estimate (a cold start).
        weights: per-element error weights broadcastable to ``blocks`` (an output-aware
            weight quantizer: the layer input's second moments), or ``None`` (plain MSE).
            Given only to methods with ``error_weighted``.
        tensor_scale: NVFP4's float32 per-tensor scale, for methods with
            ``representable_scales`` (they return block scales on the scale format's grid).
    """

    blocks: torch.Tensor
    shared: tuple[torch.Tensor, ...]
    fmt: Format
    symmetric: bool
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None

    @property
    def warm(self) -> bool:
        return self.scale is not None


OnlineFn = Callable[[OnlineStep], QParams]


@dataclass(frozen=True)
class Estimator:
    """One scale-estimation method.

    Attributes:
        name: what users pass as ``method=``.
        estimate: the offline estimate from a block view.
        online: the per-training-step update (``None``: offline only).
        symmetric_only: the method has no asymmetric (zero-point) form.
        keeps_zero_point: the online step refines the scale for a fixed zero point.
        sums_shared_operands: a warm per-tensor step adds its statistics over the
            operands of a shared quantizer instead of needing them in one tensor.
        standard_scale_rounding: MX / NV block scales follow the standard's own rule
            (the baseline's behaviour) instead of the lower-error neighbour.
        error_weighted: the method minimises a weighted error when given per-element
            ``weights`` (output-aware weight quantizers, ``error="output"``).
        representable_scales: for MX / NV formats the method returns scales already on
            the scale format's grid (it searched them), so no rounding step follows.
    """

    name: str
    estimate: EstimateFn
    online: OnlineFn | None = None
    symmetric_only: bool = False
    keeps_zero_point: bool = False
    sums_shared_operands: bool = False
    standard_scale_rounding: bool = False
    error_weighted: bool = False
    representable_scales: bool = False


def each_step(estimate: EstimateFn) -> OnlineFn:
    """An online update that re-estimates from every batch with ``estimate``."""

    def step(s: OnlineStep) -> QParams:
        if s.weights is None:
            return estimate(s.blocks, s.fmt, s.symmetric)
        return estimate(s.blocks, s.fmt, s.symmetric, weights=s.weights)

    step.__name__ = f"{getattr(estimate, '__name__', 'estimate')}_each_step"
    return step


ESTIMATORS: dict[str, Estimator] = {}


def register(estimator: Estimator) -> Estimator:
    """Add ``estimator`` to the registry under its name (a name can be registered once)."""
    if estimator.name in ESTIMATORS:
        raise ValueError(f"an estimator named {estimator.name!r} is registered already")
    ESTIMATORS[estimator.name] = estimator
    return estimator


def get_estimator(method: str) -> Estimator:
    """The registered estimator called ``method``; ValueError naming the known ones."""
    try:
        return ESTIMATORS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(ESTIMATORS)}") from None


def error_weighted_methods() -> tuple[str, ...]:
    """The methods that can minimise the output-aware (input-moment weighted) error."""
    return tuple(name for name, e in ESTIMATORS.items() if e.error_weighted)


def online_methods() -> tuple[str, ...]:
    """The methods a :class:`~statqat_ao.FakeQuantizer` can run once per training step."""
    return tuple(name for name, e in ESTIMATORS.items() if e.online is not None)
