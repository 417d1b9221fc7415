"""GPT-2's ``Conv1D`` as a linear on the transposed weight, so the pass sees ``linear(x, W^T, b)``.

transformers' ``Conv1D`` stores its weight as ``[in_features, out_features]`` and computes
``addmm(b, x, W)``: to the graph pass an ``addmm`` is no layer, so GPT-2's weights stayed
float. Before tracing, each ``Conv1D`` of the (copied) model becomes a
:class:`Conv1DAsLinear` holding the *same* Parameters under the same names and computing
``F.linear(x, W.t(), b)``: the pass then quantizes the ``[out, in]`` view, per output
channel and in groups along the input, as for any Linear, and convert stores its codes.

Example:
    >>> import torch
    >>> linearize_conv1d(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    []
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Conv1DAsLinear(nn.Module):
    """``y = x W + b`` with ``W`` ``[in, out]`` (transformers' Conv1D), written as a linear."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.nf = conv.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def linearize_conv1d(model: nn.Module) -> list[str]:
    """In place: replace every transformers ``Conv1D`` by :class:`Conv1DAsLinear`; return their names."""
    names = [name for name, m in model.named_modules() if _is_conv1d(m)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, Conv1DAsLinear(owner.get_submodule(leaf)))
    return names
