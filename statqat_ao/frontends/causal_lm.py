"""Graph-mode QAT of Hugging Face causal LMs: the traced graph, called as the model is.

``sq.prepare_qat_fx`` traces a decoder with torch.export (torch.fx cannot trace one) with
its KV cache off, and returns a :class:`CausalLMGraph`: the prepared GraphModule behind
the calling convention HF training loops use, ``model(input_ids=..., attention_mask=...,
labels=...)`` returning an output with ``.loss`` and ``.logits``. ``attention_mask`` may be
omitted (all ones) when the graph was traced with one; the loss is the model's own
(``model.loss_function``) on the graph's logits. ``sq.convert`` and the backends unwrap
it and wrap the result again.

For ``generate()``, ``save_pretrained`` and PEFT, use the eager front end
(:func:`statqat_ao.quantize_`), which keeps the model object.

Example:
    >>> import torch
    >>> is_causal_lm(torch.nn.Linear(2, 2))
    False
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face model with ``generate()`` and a KV-cache switch."""
    if isinstance(model, CausalLMGraph):
        return False
    if not (hasattr(model, "generate") and hasattr(model, "config") and hasattr(model, "forward")):
        return False
    return "use_cache" in inspect.signature(model.forward).parameters


def trace_kwargs(model: nn.Module, example_kwargs: dict | None) -> dict:
    """The keyword inputs to trace a causal LM with: the user's, with the KV cache off."""
    kwargs = dict(example_kwargs or {})
    if kwargs.get("use_cache"):
        raise ValueError(
            f"{type(model).__name__}: graph-mode QAT traces the training forward, which has no KV cache; "
            "drop use_cache=True from example_kwargs (generate() with a cache: use sq.quantize_)"
        )
    kwargs["use_cache"] = False
    unknown = [k for k, v in kwargs.items() if k not in ("attention_mask", "use_cache") and v is not None]
    if unknown:
        raise ValueError(
            f"{type(model).__name__}: graph mode traces (input_ids[, attention_mask]); "
            f"example_kwargs {unknown} would be fixed into the graph. Pass only attention_mask"
        )
    return kwargs


class CausalLMOutput(dict):
    """``loss`` (None without labels) and ``logits``, readable as attributes or keys."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CausalLMGraph(nn.Module):
    """A prepared or converted decoder graph behind the model's calling convention.

    Attributes:
        graph_module: the GraphModule (``sq.prepare_qat_fx``'s or ``sq.convert``'s).
        with_mask: whether the graph takes an ``attention_mask``.
    """

    def __init__(self, graph_module: nn.Module, with_mask: bool, loss_function: Callable, vocab_size: int, model_name: str):
        super().__init__()
        self.graph_module = graph_module
        self.with_mask = with_mask
        self.loss_function = loss_function
        self.vocab_size = vocab_size
        self.model_name = model_name

    def rewrap(self, graph_module: nn.Module) -> CausalLMGraph:
        """The same calling convention around another graph (the converted or lowered one)."""
        out = CausalLMGraph(graph_module, self.with_mask, self.loss_function, self.vocab_size, self.model_name)
        return out.train(graph_module.training)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **unused,
    ) -> CausalLMOutput:
        passed = [k for k, v in unused.items() if v is not None and not (k == "use_cache" and v is False)]
        if passed:
            raise TypeError(
                f"the {self.model_name} graph takes input_ids, attention_mask and labels; got {passed}. "
                "Graph mode fixes everything else at trace time (use sq.quantize_ to keep the model's full forward)"
            )
        kwargs = {"use_cache": False}
        if self.with_mask:
            kwargs["attention_mask"] = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        elif attention_mask is not None and not bool(attention_mask.all()):
            raise TypeError(
                f"the {self.model_name} graph was traced without attention_mask, so it cannot take padding: "
                "prepare with example_kwargs={'attention_mask': mask}"
            )
        logits = self.graph_module(input_ids, **kwargs).logits
        loss = None if labels is None else self.loss_function(logits, labels, self.vocab_size)
        return CausalLMOutput(loss=loss, logits=logits)


def wrap_prepared(model: nn.Module, graph_module: nn.Module, kwargs: dict) -> CausalLMGraph:
    """The :class:`CausalLMGraph` of ``model``'s prepared graph (traced with ``kwargs``)."""
    vocab = getattr(model.config, "vocab_size", None)
    wrapped = CausalLMGraph(graph_module, "attention_mask" in kwargs, model.loss_function, vocab, type(model).__name__)
    return wrapped.train(graph_module.training)


__all__ = ["CausalLMGraph", "CausalLMOutput", "is_causal_lm", "trace_kwargs", "wrap_prepared"]
