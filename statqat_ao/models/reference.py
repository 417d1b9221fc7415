"""Small reference models and real data for examples, tests and benchmarks.

* :class:`DigitsCNN`: a CNN for sklearn's 8x8 digits with BatchNorm, a depthwise conv
  and a residual add (the shapes QAT has to handle in CNNs).
* :class:`TransformerBlock`: pre-norm attention with explicit matmuls and softmax,
  LayerNorm, a GELU MLP and residual adds.
* :func:`load_digits_split`: sklearn's digits (1,797 real images) with a fixed split.

Example:
    >>> import torch
    >>> x_train, y_train, x_test, y_test = load_digits_split()
    >>> x_train.shape, DigitsCNN()(x_train[:2]).shape
    (torch.Size([1348, 1, 8, 8]), torch.Size([2, 10]))
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv-bn-relu, depthwise + pointwise residual block, linear head (10 classes)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, width, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem_bn(self.stem(x)))
        y = y + torch.relu(self.pw(torch.relu(self.dw_bn(self.dw(y)))))
        return self.fc(torch.flatten(self.pool(y), 1))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: multi-head attention written with matmuls, GELU MLP."""

    def __init__(self, dim: int = 256, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // h)
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = x + self.proj(context.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def load_digits_split(test_fraction: float = 0.25, seed: int = 0):
    """sklearn's digits as float tensors ``[N, 1, 8, 8]`` in [0, 1], with a fixed split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
