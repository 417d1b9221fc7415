"""Keyword calls into a graph traced by torch.export, as the model was called.

``torch.export``'s module checks its inputs against the traced call's exact structure, so
a model traced as ``model(x)`` rejects ``model(pixel_values=x)`` with "kwarg keyword
mismatch". Training loops call models by keyword (Hugging Face's ``model(**batch)``).
:func:`accept_keyword_inputs` adds a forward pre-hook, run before torch's check, that
passes each keyword naming a positional graph input in its place, keeps the keywords the
trace was given (``example_kwargs``), drops a keyword the traced call left at the model's
own default (``labels=None``), and refuses any other by name, saying what the graph takes.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, pixel_values, labels=None):
    ...         return pixel_values * 2
    >>> gm = torch.export.export(Net(), (torch.ones(2),)).module()
    >>> accept_keyword_inputs(gm, Net())
    >>> gm(pixel_values=torch.ones(2), labels=None)
    tensor([2., 2.])
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from torch import nn

_MISSING = object()


def accept_keyword_inputs(graph_module: nn.Module, model: nn.Module, traced_keywords: Iterable[str] = ()) -> None:
    """Let ``graph_module`` (``torch.export``'s) be called by keyword as ``model`` was.

    ``traced_keywords``: the keyword inputs of the traced call, which every call passes
    by keyword (a graph traced with ``labels=`` computes its loss inside).
    """
    keywords = set(traced_keywords)
    inputs = [k for k in inspect.signature(graph_module.forward).parameters if k not in keywords]
    try:
        defaults = {
            name: p.default
            for name, p in inspect.signature(model.forward).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    except (TypeError, ValueError):
        defaults = {}
    name = type(model).__name__

    def bind(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.keys() == keywords:  # called as traced: nothing to do on the training step
            return None
        absent = sorted(keywords - kwargs.keys())
        if absent:
            raise TypeError(
                f"the {name} graph was traced with {absent} as keyword inputs (example_kwargs): pass them on every call"
            )
        positional = list(args)
        for input_name in inputs[len(args) :]:
            if input_name not in kwargs:
                break
            positional.append(kwargs[input_name])
        taken = set(inputs[: len(positional)]) | keywords
        rest = {k: v for k, v in kwargs.items() if k not in taken}
        unknown = [k for k, v in rest.items() if k not in inputs and defaults.get(k, _MISSING) is not v]
        if unknown:
            raise TypeError(
                f"the {name} graph traced by torch.export takes ({', '.join(inputs)}); got {unknown}, which the "
                "trace left out. Pass only those inputs and compute the rest outside (for labels: "
                "loss = torch.nn.functional.cross_entropy(out.logits, labels)), or trace with them in example_kwargs."
            )
        late = [k for k in rest if k in inputs]
        if late:
            raise TypeError(
                f"the {name} graph takes ({', '.join(inputs)}); {late} came without {inputs[len(positional)]!r} before it"
            )
        return tuple(positional), {k: kwargs[k] for k in keywords}

    graph_module.register_forward_pre_hook(bind, with_kwargs=True, prepend=True)
