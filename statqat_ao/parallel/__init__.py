"""Multi-process QAT: block statistics combined over data-parallel ranks, and FSDP2 helpers.

Reaches the estimators only through :func:`statqat_ao.numerics.block_stats.reduced_over`.
"""
