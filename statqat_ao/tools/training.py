"""A small supervised training loop (Adam, cosine schedule) for the demo and examples.

Example:
    >>> import torch
    >>> from statqat_ao.models import DigitsCNN, load_digits_split
    >>> x, y, x_test, y_test = load_digits_split()
    >>> model = DigitsCNN()
    >>> losses = train_classifier(model, x[:256], y[:256], epochs=1, lr=3e-3, batch=64, seed=0)
    >>> len(losses), accuracy(model, x_test, y_test) >= 0.0
    (4, True)
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from statqat_ao.quantizers.nonfinite import check_finite


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    desc: str | None = None,
) -> list[float]:
    """Train with cross-entropy; returns the loss of every step.

    The batch order depends only on ``seed``, so runs that share a seed see the same
    batches (a fair comparison between quantization methods). A NaN loss stops the run
    with a ValueError naming the step.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(y) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in tqdm(range(epochs), desc=desc, leave=False, disable=desc is None):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                check_finite(model)  # names the quantizer that saw a NaN first, if one did
                raise ValueError(f"{desc or 'training'}: loss is {loss.item()} at step {len(losses)}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()
