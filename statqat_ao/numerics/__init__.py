"""Numerics: formats and their grids, rounding, scale formats, storage codes, block layout
and block statistics, the error model and metrics. The bottom layer: it imports torch,
numpy and scipy only."""
