"""Scale estimators, one registry, and the one entry point, :func:`estimate_qparams`.

Methods: ``minmax`` (baseline), ``analytic`` and ``iterative`` (StatQAT), ``search``
(candidate scales on the scale format's grid, for small blocks), ``auto`` (analytic or
search by block size: the weight default), ``mse`` (the exact / exhaustive optimum: the
reference limit), ``octav`` and ``lsq`` (baselines). Each file
defines one method and registers it (:mod:`statqat_ao.estimators.registry`); the import
order below is the order ``ESTIMATORS`` lists them in.
"""

# ruff: noqa: I001 (the imports below run in registration order: see the docstring)
from __future__ import annotations

from .minmax import minmax_qparams
from .analytic import analytic_qparams
from .iterative import iterative_qparams, least_squares_step
from .search import search_qparams
from .auto import auto_qparams
from .mse_search import mse_qparams
from .octav import octav_qparams
from .lsq import lsq_qparams
from .estimate import estimate_qparams, finalize_scale
from .registry import (
    ESTIMATORS,
    Estimator,
    OnlineStep,
    error_weighted_methods,
    get_estimator,
    online_methods,
    register,
)

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "OnlineStep",
    "analytic_qparams",
    "auto_qparams",
    "error_weighted_methods",
    "estimate_qparams",
    "finalize_scale",
    "get_estimator",
    "iterative_qparams",
    "least_squares_step",
    "lsq_qparams",
    "minmax_qparams",
    "mse_qparams",
    "octav_qparams",
    "online_methods",
    "register",
    "search_qparams",
]
