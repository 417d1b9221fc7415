"""Models the backends were not written against, QAT-trained for a few steps on real digits.

* :class:`SmallCNN`: conv-bn-relu, max-pool, a second conv with bias, a linear head.
* :class:`DigitsTransformer`: each image row is a token (8 tokens of 8 pixels), a
  linear embedding, statqat_ao's :class:`TransformerBlock`, mean pooling, a linear head.

``converted(model, qconfig)`` prepares, trains 6 steps and converts; it returns the
converted model and a test batch of real digits to lower and run with.
"""

from __future__ import annotations

import torch
from torch import nn

from statqat_ao.models import TransformerBlock, load_digits_split
from statqat_ao.tools.examples import qat_and_convert

_DIGITS = None


def digits():
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = load_digits_split()
    return _DIGITS


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        y = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        y = torch.relu(self.conv2(y))
        return self.head(y.flatten(1))


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.block = TransformerBlock(dim, heads, mlp_ratio=2)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], 8, 8))
        return self.head(self.block(tokens).mean(1))


MODELS = {"cnn": SmallCNN, "transformer": DigitsTransformer}


def converted(model_name: str, qconfig, steps: int = 6, batch: int = 64, seed: int = 0):
    """``(converted_model, x_test)``: prepare, ``steps`` Adam QAT steps on digits, convert."""
    return qat_and_convert(MODELS[model_name], qconfig, steps, batch, seed, data=digits())
