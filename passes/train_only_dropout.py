"""Functional dropout in a traced graph, made a module that ``.train()`` / ``.eval()`` switch.

A forward that holds layers and calls ``F.dropout(x, p, training=self.training)`` (timm's
ghostnet and many classifier heads) is traced with the flag's trace-time value as a
literal: a graph traced in training mode drops out in eval too (the prepared model, and
what it converts to, are random), one traced in eval never drops out in training.
:func:`dropout_calls_as_modules` replaces each call whose flag is the trace-time mode by
the matching ``nn.Dropout*`` module, which follows the GraphModule's mode as the original
model's ``self.training`` did. A call whose flag is the other literal was written that way
(``training=False`` in a model traced for training) and stays. fx records a flag left to its
default as a literal too, so an always-on ``F.dropout(x, p)`` traced in training mode
cannot be told from one that reads ``self.training`` and follows the mode as well.

Example:
    >>> import torch
    >>> from torch import fx
    >>> class Head(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.fc(torch.nn.functional.dropout(x, 0.2, training=self.training))
    >>> gm = fx.symbolic_trace(Head().train())
    >>> dropout_calls_as_modules(gm, traced_training=True)
    ['dropout']
    >>> gm.dropout
    Dropout(p=0.2, inplace=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class DropoutCall:
    """How a dropout function is called and which module replaces it."""

    module: type[nn.Module]
    params: tuple[str, ...]  # positional order of the function's parameters
    flag: str  # the parameter holding the train / eval switch


_FUNCTIONAL = ("input", "p", "training", "inplace")
_ATEN = ("input", "p", "train")

DROPOUT_CALLS: dict[object, DropoutCall] = {
    F.dropout: DropoutCall(nn.Dropout, _FUNCTIONAL, "training"),
    F.dropout1d: DropoutCall(nn.Dropout1d, _FUNCTIONAL, "training"),
    F.dropout2d: DropoutCall(nn.Dropout2d, _FUNCTIONAL, "training"),
    F.dropout3d: DropoutCall(nn.Dropout3d, _FUNCTIONAL, "training"),
    F.alpha_dropout: DropoutCall(nn.AlphaDropout, _FUNCTIONAL, "training"),
    F.feature_alpha_dropout: DropoutCall(nn.FeatureAlphaDropout, _FUNCTIONAL, "training"),
    torch.dropout: DropoutCall(nn.Dropout, _ATEN, "train"),
    torch.alpha_dropout: DropoutCall(nn.AlphaDropout, _ATEN, "train"),
    torch.feature_alpha_dropout: DropoutCall(nn.FeatureAlphaDropout, _ATEN, "train"),
    torch.ops.aten.dropout.default: DropoutCall(nn.Dropout, _ATEN, "train"),  # torch.export's graphs
}


def _arguments(node: fx.Node) -> dict:
    call = DROPOUT_CALLS[node.target]
    return {**dict(zip(call.params, node.args, strict=False)), **node.kwargs}


def dropout_calls_with_flag(gm: fx.GraphModule, training: bool) -> list[fx.Node]:
    """The dropout calls in ``gm`` whose train / eval flag is the literal ``training``, passed explicitly."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in DROPOUT_CALLS:
            flag = _arguments(node).get(DROPOUT_CALLS[node.target].flag)
            if isinstance(flag, bool) and flag is training:
                found.append(node)
    return found


def dropout_calls_as_modules(gm: fx.GraphModule, traced_training: bool) -> list[str]:
    """In place: each dropout call whose flag is ``traced_training`` (the mode ``gm`` was
    traced in) becomes a call of an ``nn.Dropout*`` module registered on ``gm``; returns
    their names. A call whose probability is not a literal stays."""
    names = []
    for node in dropout_calls_with_flag(gm, traced_training):
        arguments = _arguments(node)
        p = arguments.get("p", 0.5)
        if not isinstance(p, (int, float)):
            continue
        module = DROPOUT_CALLS[node.target].module(float(p), inplace=bool(arguments.get("inplace", False)))
        module.train(gm.training)
        name, k = node.name, 1
        while hasattr(gm, name):
            name, k = f"{node.name}_{k}", k + 1
        gm.add_module(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (arguments["input"],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        names.append(name)
    if names:
        gm.recompile()
    return names


def remove_baked_dropout(gm: fx.GraphModule) -> list[str]:
    """In place, for a deployment graph: drop every dropout call with a literal ``True`` flag
    (the identity in eval); returns the removed nodes' names."""
    removed = []
    for node in dropout_calls_with_flag(gm, True):
        node.replace_all_uses_with(_arguments(node)["input"])
        removed.append(node.name)
        gm.graph.erase_node(node)
    if removed:
        gm.recompile()
    return removed


__all__ = ["DROPOUT_CALLS", "DropoutCall", "dropout_calls_as_modules", "dropout_calls_with_flag", "remove_baked_dropout"]
