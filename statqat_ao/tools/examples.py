"""Converted example models on real data, ready to export.

Each function runs a short QAT on sklearn's digits (from random weights, a few seconds
on a CPU), converts, and returns ``(converted_model, example_inputs)``: the form
``statqat export package.module:function`` takes.

Example:
    $ statqat export statqat_ao.tools.examples:digits_cnn_w8a8 --to onnx --out digits.onnx
    $ statqat export statqat_ao.tools.examples:digits_cnn_w4 --to executorch --activations dynamic_int8 --out digits.pte

    >>> import torch
    >>> model, (x,) = digits_cnn_w4a8(steps=2)
    >>> model(x).shape
    torch.Size([32, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from statqat_ao.models import DigitsCNN, load_digits_split


def qat_and_convert(
    make_model: Callable[[], nn.Module],
    qconfig,
    steps: int = 60,
    batch: int = 128,
    seed: int = 0,
    data: tuple | None = None,
) -> tuple[fx.GraphModule, torch.Tensor]:
    """Seed, build ``make_model()``, prepare it with ``qconfig``, train ``steps`` Adam steps
    (lr 3e-3) on random batches of digits, convert.

    Returns the converted model and 32 test images. ``data`` is
    ``load_digits_split()``'s tuple, to reuse a loaded copy.
    """
    from statqat_ao.passes import convert, prepare_qat_fx

    torch.manual_seed(seed)
    x, y, x_test, _ = data if data is not None else load_digits_split()
    qat = prepare_qat_fx(make_model(), qconfig, (x[:batch],))
    opt = torch.optim.Adam(qat.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    qat.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = nn.functional.cross_entropy(qat(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return convert(qat), x_test[:32].clone()


def qat_digits_cnn(qconfig, steps: int = 60, batch: int = 128, seed: int = 0) -> tuple[fx.GraphModule, tuple]:
    """:func:`qat_and_convert` of :class:`DigitsCNN`; the test images as a tuple of inputs."""
    converted, x_test = qat_and_convert(DigitsCNN, qconfig, steps, batch, seed)
    return converted, (x_test,)


def digits_cnn_w8a8(steps: int = 60) -> tuple[fx.GraphModule, tuple]:
    """INT8 weights per channel, INT8 activations per tensor (every backend)."""
    from statqat_ao.frontends.qconfig import get_statqat_qconfig

    return qat_digits_cnn(get_statqat_qconfig("int8", "int8"), steps)


def digits_cnn_w4a8(steps: int = 60) -> tuple[fx.GraphModule, tuple]:
    """INT4 weights per channel, INT8 activations per tensor (torchao, ONNX)."""
    from statqat_ao.frontends.qconfig import get_statqat_qconfig

    return qat_digits_cnn(get_statqat_qconfig("int4", "int8"), steps)


def digits_cnn_w4(steps: int = 60) -> tuple[fx.GraphModule, tuple]:
    """INT4 weights in groups of 32 on the classifier only, float activations (8da4w on ExecuTorch)."""
    from statqat_ao.frontends.qconfig import get_statqat_qconfig

    return qat_digits_cnn(get_statqat_qconfig("int4", None, weight_granularity=32, skip=["stem", "dw", "pw"]), steps)
