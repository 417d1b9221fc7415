"""Evaluate the constant part of a graph: nodes computed from parameters and buffers only.

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    >>> from statqat_ao.passes.functionalize import functionalize_weighted_modules
    >>> functionalize_weighted_modules(gm)
    >>> w = next(n for n in gm.graph.nodes if n.op == "get_attr")
    >>> is_constant(w), constant_value(w, gm).shape
    (True, torch.Size([2, 3]))
"""

from __future__ import annotations

import torch
from torch import fx


def is_constant(node) -> bool:
    """True if ``node`` depends on no graph input (only parameters, buffers, literals).

    Walks the inputs with an explicit stack: a deep network's activations reach back
    through thousands of nodes, more than Python's recursion limit (mobilenet_v3, convnext).
    """
    if not isinstance(node, fx.Node):
        return True
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n.op == "get_attr":
            continue
        if n.op not in ("call_function", "call_method", "call_module"):
            return False  # a placeholder: the node depends on an input
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return True


def param_path(node) -> str | None:
    """The qualified name of the parameter a constant weight subgraph starts from.

    Depth first along each node's inputs in order (the BN-fold scaling
    ``fold_scale(weight, var, gamma)`` starts from the weight), with an explicit stack.
    """
    if not isinstance(node, fx.Node):
        return None
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            return n.target
        stack.extend(reversed(n.all_input_nodes))  # the first input is visited first
    return None


@torch.no_grad()
def constant_value(node: fx.Node, gm: fx.GraphModule, _cache: dict | None = None) -> torch.Tensor:
    """The value of a constant node (call_module nodes run their module as it is now)."""
    cache = {} if _cache is None else _cache
    if node in cache:
        return cache[node]

    def value(a):
        return constant_value(a, gm, cache) if isinstance(a, fx.Node) else a

    args = torch.utils._pytree.tree_map(value, node.args)
    kwargs = torch.utils._pytree.tree_map(value, node.kwargs)
    if node.op == "get_attr":
        out = get_attr(gm, node.target)
    elif node.op == "call_function":
        out = node.target(*args, **kwargs)
    elif node.op == "call_method":
        out = getattr(args[0], node.target)(*args[1:], **kwargs)
    elif node.op == "call_module":
        out = gm.get_submodule(node.target)(*args, **kwargs)
    else:
        raise ValueError(f"node {node.name} ({node.op}) is not constant")
    cache[node] = out
    return out


def get_attr(gm: fx.GraphModule, target: str):
    """The object a ``get_attr`` target names (a parameter, buffer or constant)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
