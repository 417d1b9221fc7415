"""Compile fake quantization with the eager op's division, bit for bit, on GPUs too.

A fake quant rounds ``x / scale``. Triton's float32 ``/`` is an approximate division
(up to 2 ulp), so a compiled CUDA kernel can land on the other side of a rounding tie
than eager PyTorch and the exported model do. MinMax scales make exact ties common: ``max|x| / s``
is exactly ``qmax``. On an H100 (BENCHMARKS.md section 8), 41 to 1,364 of 524,288 codes
differed per tensor, as did the straight-through mask at the clip edges. Inductor's C++
(CPU) kernels divide exactly and need nothing.

:func:`exact_division` turns on Inductor's IEEE-exact division for what is compiled
inside it. Compilation happens at a compiled function's first call, so the first call
must run inside it. On the H100 it cost nothing measurable in a QAT step.

Example:
    >>> import torch, statqat_ao as sq
    >>> fq = sq.FakeQuantizer("int4", "minmax", "channel")
    >>> compiled = torch.compile(fq, fullgraph=True)
    >>> with sq.exact_division():
    ...     y = compiled(torch.randn(8, 32))  # compiled here: exact on GPUs too
"""

from __future__ import annotations

from contextlib import AbstractContextManager

# Inductor's name for the setting, newest first (torch 2.13 has the first).
_SETTING_NAMES = ("eager_numerics.division_rounding", "emulate_division_rounding", "emulate_divison_rounding")


def exact_division_setting() -> str:
    """The name of Inductor's exact-division setting in this torch.

    Example:
        >>> exact_division_setting()
        'eager_numerics.division_rounding'
    """
    import torch._inductor.config as config

    for name in _SETTING_NAMES:
        if name in config._config:
            return name
    raise RuntimeError(
        "this torch's Inductor has no exact-division setting (looked for "
        f"{', '.join(_SETTING_NAMES)}): compiled fake quant on GPUs may differ from eager at rounding ties"
    )


def exact_division() -> AbstractContextManager:
    """A context manager (and decorator) under which Inductor compiles float division exactly.

    Example:
        >>> import torch
        >>> with exact_division():
        ...     import torch._inductor.config as config
        ...     config.eager_numerics.division_rounding
        True
    """
    import torch._inductor.config as config

    return config.patch({exact_division_setting(): True})
