"""A Hugging Face causal LM as a graph a backend can export: token ids in, logits out.

A decoder's ``forward`` returns a ``ModelOutput`` with a KV cache (``DynamicCache``),
which ONNX and ExecuTorch programs cannot hold. :func:`deployable` wraps such a model in
:class:`CausalLMLogits`: ``(input_ids[, attention_mask]) -> logits`` with the cache off,
the graph that ``generate()``'s first step runs. Any other model passes through.

Example:
    >>> import torch
    >>> deployable(torch.nn.Linear(2, 2)).__class__.__name__
    'Linear'
"""

from __future__ import annotations

import torch
from torch import nn

from statqat_ao.frontends.causal_lm import CausalLMGraph, is_causal_lm


class CausalLMLogits(nn.Module):
    """``model(input_ids, attention_mask, use_cache=False).logits`` as a plain module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def deployable(model: nn.Module) -> nn.Module:
    """:class:`CausalLMLogits` around a Hugging Face causal LM (or its graph), else ``model`` itself."""
    return CausalLMLogits(model).eval() if is_causal_lm(model) or isinstance(model, CausalLMGraph) else model
