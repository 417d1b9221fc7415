"""Reference models and real data that ship in packages: for examples, tests, benchmarks, the demo.

* :class:`DigitsCNN`, :class:`TransformerBlock`, :func:`load_digits_split`: small models and
  sklearn's digits.
* :func:`load_smollm2`: SmolLM2-135M-Instruct (a real Llama decoder), offline.
* :func:`pydoc_split`, :func:`perplexity`: Python's own documentation as LM text.

Example:
    >>> from statqat_ao.models import DigitsCNN, load_digits_split
    >>> x_train, *_ = load_digits_split()
    >>> DigitsCNN()(x_train[:2]).shape
    torch.Size([2, 10])
"""

from .reference import DigitsCNN, TransformerBlock, load_digits_split
from .smollm2 import ModelNotInstalledError, load_smollm2
from .text import TextSplit, perplexity, pydoc_split, pydoc_text

__all__ = [
    "DigitsCNN",
    "ModelNotInstalledError",
    "TextSplit",
    "TransformerBlock",
    "load_digits_split",
    "load_smollm2",
    "perplexity",
    "pydoc_split",
    "pydoc_text",
]
