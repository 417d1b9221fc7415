"""QAT linears for the eager front end: a model's own ``nn.Linear`` (and GPT-2's ``Conv1D``)
with StatQAT fake quantization of its weight and, optionally, of its input.

A :class:`QATLinear` *is* an ``nn.Linear``: it keeps the original ``weight`` and ``bias``
Parameters (the same objects, so tied weights stay tied and optimizers, PEFT and
``state_dict`` keys see what they saw before) and adds ``weight_fake_quant`` and
``input_fake_quant`` submodules. GPT-2's ``Conv1D`` stores its weight as
``[in_features, out_features]``; :class:`QATConv1D` keeps that layout (checkpoints
load as they are) and quantizes the ``[out, in]`` view, so per-channel and per-group
blocks mean the same as for a Linear.

New layer types plug in through :func:`register_swap`.

Example:
    >>> import torch, statqat_ao as sq
    >>> layer = torch.nn.Linear(64, 16)
    >>> qat = QATLinear.from_float(layer, sq.QuantSpec("int4", granularity="channel"), None)
    >>> qat.weight is layer.weight, isinstance(qat, torch.nn.Linear), qat(torch.randn(2, 64)).shape
    (True, True, torch.Size([2, 16]))
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .qconfig import QuantSpec


class _FakeQuantizedLinearMixin:
    """The forward shared by the QAT linears: ``F.linear(fq_in(x), fq_w(W), b)``."""

    weight_layout_transposed: bool = False  # Conv1D: weight stored [in, out]

    def _attach_quantizers(self, weight: QuantSpec | None, activation: QuantSpec | None) -> None:
        self.weight_fake_quant = None if weight is None else weight.make(is_activation=False)
        self.input_fake_quant = None if activation is None else activation.make(is_activation=True)
        if self.weight_fake_quant is not None and hasattr(self.weight_fake_quant, "allocate_input_moments"):
            w = self.weight_out_in()  # output-aware moments: one per input feature, shaped now (input_moments.py)
            self.weight_fake_quant.allocate_input_moments(w.shape[1], w.device)

    def weight_out_in(self) -> torch.Tensor:
        """The weight as ``[out_features, in_features]`` (a view for Conv1D)."""
        return self.weight.t() if self.weight_layout_transposed else self.weight

    def quantized_weight(self, layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized ``[out, in]`` weight; ``layer_input`` feeds an output-aware quantizer's moments."""
        w = self.weight_out_in()
        fq = self.weight_fake_quant
        if fq is None:
            return w
        if layer_input is not None and getattr(fq, "output_aware", False):
            return fq(w, layer_input=layer_input)
        return fq(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        return F.linear(x, self.quantized_weight(x), self.bias)


class QATLinear(_FakeQuantizedLinearMixin, nn.Linear):
    """``nn.Linear`` with StatQAT fake quantization (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight_fake_quant = self.input_fake_quant = None

    @classmethod
    def from_float(cls, linear: nn.Linear, weight: QuantSpec | None, activation: QuantSpec | None) -> QATLinear:
        """A QAT linear that shares ``linear``'s Parameters (nothing is copied)."""
        qat = cls.__new__(cls)
        nn.Module.__init__(qat)
        qat.in_features, qat.out_features = linear.in_features, linear.out_features
        qat.weight, qat.bias = linear.weight, linear.bias
        qat._attach_quantizers(weight, activation)
        qat.train(linear.training)
        return qat


@functools.cache
def qat_conv1d_class() -> type:
    """``QATConv1D``, built on transformers' ``Conv1D`` (imported on first use)."""
    from transformers.pytorch_utils import Conv1D

    class QATConv1D(_FakeQuantizedLinearMixin, Conv1D):
        """GPT-2's ``Conv1D`` (``y = x W + b``, W ``[in, out]``) with StatQAT fake quantization."""

        weight_layout_transposed = True

        @classmethod
        def from_float(cls, conv: nn.Module, weight: QuantSpec | None, activation: QuantSpec | None):
            qat = cls.__new__(cls)
            nn.Module.__init__(qat)
            qat.nf, qat.nx = conv.nf, conv.weight.shape[0]
            qat.in_features, qat.out_features = conv.weight.shape
            qat.weight, qat.bias = conv.weight, conv.bias
            qat._attach_quantizers(weight, activation)
            qat.train(conv.training)
            return qat

    QATConv1D.__module__ = __name__
    return QATConv1D


# module type -> builder(module, weight_spec, activation_spec) -> QAT module.
Builder = Callable[[nn.Module, QuantSpec | None, QuantSpec | None], nn.Module]
_SWAPS: dict[type, Builder] = {nn.Linear: QATLinear.from_float}


def register_swap(module_type: type, builder: Builder) -> None:
    """Make :func:`statqat_ao.quantize_` swap modules of ``module_type`` with ``builder``."""
    _SWAPS[module_type] = builder


def swap_builder(module: nn.Module) -> Builder | None:
    """The builder for ``module``'s exact type (subclasses such as QAT linears are not swapped again)."""
    if "transformers" in sys.modules:  # a Hugging Face model: its Conv1D (GPT-2) is a linear too
        from transformers.pytorch_utils import Conv1D

        _SWAPS.setdefault(Conv1D, lambda m, w, a: qat_conv1d_class().from_float(m, w, a))
    return _SWAPS.get(type(module))


def is_qat_linear(module: nn.Module) -> bool:
    return isinstance(module, _FakeQuantizedLinearMixin)
