"""Per-layer parity of lowered linears, with a tolerance argued from floating-point arithmetic.

A torchao kernel computes each output ``y = sum_k x_k w_k`` in another order than
``F.linear`` on the dequantized weight. Both are float sums of the same products, so
their results differ by at most ``2 gamma_K sum_k |x_k| |w_k|`` per element, with
``gamma_K = K u / (1 - K u)`` and ``u`` the unit roundoff of the input's dtype (Higham,
*Accuracy and Stability of Numerical Algorithms*, eq. 3.5). :func:`check_layers` checks
each lowered linear against that bound on the very inputs the converted model feeds it.

End to end, a model with quantized activations can differ by more than the layers do:
where a layer's output lands within rounding of a code boundary, the next activation
quantizer can take the neighbouring code, and that one-step difference travels on.
This is not an error of the lowering (each layer is exact to rounding), so the backends
check such models layer by layer.

Example:
    >>> import torch
    >>> x, w = torch.randn(4, 64), torch.randn(8, 64)
    >>> bool((dot_rounding_bound(x, w) > 0).all())
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .parity import ParityError


def dot_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``2 gamma_K |x| |w|^T``: how far two float evaluations of ``x w^T`` can lie apart."""
    k = x.shape[-1]
    u = torch.finfo(x.dtype).eps / 2
    gamma = k * u / (1 - k * u)
    magnitude = F.linear(x.abs().double(), w.abs().double())
    return (2 * gamma * magnitude).to(torch.float64)


def check_layers(layers: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]], backend: str) -> float:
    """Raise ParityError unless ``F.linear(x, lowered)`` matches ``F.linear(x, reference)`` within
    :func:`dot_rounding_bound` for every ``(path, x, lowered_weight, reference_weight)``.

    Returns the largest ``|difference| / bound`` (at most 1 when the check passes).
    """
    worst = 0.0
    for path, x, lowered, reference in layers:
        with torch.no_grad():
            got, want = F.linear(x, lowered), F.linear(x, reference)
        diff = (got.double() - want.double()).abs()
        bound = dot_rounding_bound(x, reference) + torch.finfo(torch.float32).tiny
        ratio = float((diff / bound).max()) if diff.numel() else 0.0
        if ratio > 1.0:
            raise ParityError(
                f"{backend}: the lowered {path} differs from the converted layer on the converted model's own "
                f"inputs by up to {float(diff.max()):.4g}, {ratio:.3g}x the float rounding bound of its "
                f"{x.shape[-1]}-term dot products: the kernel does not compute this layer"
            )
        worst = max(worst, ratio)
    return worst
