"""``auto``: the default weight estimator, chosen per quantizer from its block size.

Small blocks (groups up to :data:`SEARCH_MAX_BLOCK` elements, and the MX / NV block
formats) take :mod:`search <statqat_ao.estimators.search>`: there the analytic clip is
capped by the block's own maximum and least squares stops in local minima. Larger
blocks (per channel, per tensor) take the analytic estimate, one reduction pass, where
the block's statistics are those of its distribution. The threshold comes from the
measurements in BENCHMARKS.md (the SmolLM2 and MiniLM fidelity tables).

Example:
    >>> from statqat_ao.numerics.formats import get_format
    >>> auto_choice(get_format("fp4_e2m1"), 32), auto_choice(get_format("int4"), 4096)
    ('search', 'analytic')
"""

from __future__ import annotations

import torch

from statqat_ao.numerics.block_stats import block_len
from statqat_ao.numerics.formats import Format

from .registry import Estimator, OnlineStep, get_estimator, register

SEARCH_MAX_BLOCK = 256


def auto_choice(fmt: Format, block_elements: int) -> str:
    """The method ``auto`` runs for blocks of ``block_elements`` elements of ``fmt``."""
    return "search" if fmt.is_block_format or block_elements <= SEARCH_MAX_BLOCK else "analytic"


def auto_qparams(
    x: torch.Tensor,
    fmt: Format,
    symmetric: bool,
    weights: torch.Tensor | None = None,
    tensor_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale and zero point of ``x`` ``[B, L]`` by the method :func:`auto_choice` picks."""
    if auto_choice(fmt, block_len(x)) == "search":
        return get_estimator("search").estimate(x, fmt, symmetric, weights=weights, tensor_scale=tensor_scale)
    return get_estimator("analytic").estimate(x, fmt, symmetric, weights=weights)


def auto_step(step: OnlineStep) -> tuple[torch.Tensor, torch.Tensor]:
    return get_estimator(auto_choice(step.fmt, block_len(step.blocks))).online(step)


# representable_scales holds: MX / NV formats always take the search.
register(Estimator("auto", auto_qparams, online=auto_step, error_weighted=True, representable_scales=True))
