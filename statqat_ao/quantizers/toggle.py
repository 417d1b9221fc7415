"""The fake-quant switch torch.ao's helpers call (``model.apply(torch.ao.quantization.disable_fake_quant)``).

Example:
    >>> class Q(FakeQuantToggle):
    ...     fake_quant_enabled = True
    >>> q = Q(); q.disable_fake_quant(); q.fake_quant_enabled
    False
"""

from __future__ import annotations


class FakeQuantToggle:
    """``enable_fake_quant`` / ``disable_fake_quant`` on a Python-bool ``fake_quant_enabled``
    (a bool, not a tensor, so a compiled graph specialises on it instead of breaking)."""

    fake_quant_enabled: bool

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled = enabled

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)
