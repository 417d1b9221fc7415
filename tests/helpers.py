"""Shared small models, data and a QAT loop for the graph-pass tests."""

import torch
from torch import nn

from statqat_ao.models import load_digits_split


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


_DIGITS = None


def digits():
    global _DIGITS
    if _DIGITS is None:
        _DIGITS = load_digits_split()
    return _DIGITS


def qat_losses(model, steps=8, lr=0.01, batch=128, seed=0):
    """Adam steps on real digits; returns the loss per step."""
    x, y, _, _ = digits()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)
