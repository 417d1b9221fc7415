"""Saving a converted model with its example inputs, and naming one for the command line.

``statqat export MODEL`` takes either a file written by :func:`save_converted` or a
``package.module:function`` returning ``(model, example_inputs)``. A saved file holds the
fx graph itself and the module tree (not regenerated code, which fx would re-trace and
could constant-fold); it is a pickle, so load only files you trust.

Example:
    >>> import tempfile, torch, statqat_ao as sq
    >>> from statqat_ao.tools.saved_model import load_model, save_converted
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    >>> x = torch.randn(2, 16)
    >>> q = sq.convert(sq.prepare_qat_fx(model, sq.statqat_qconfig, (x,)))
    >>> path = tempfile.mkdtemp() + "/model.pt"
    >>> save_converted(q, (x,), path)
    >>> loaded, inputs = load_model(path)
    >>> torch.equal(loaded(*inputs), q(x))
    True
"""

from __future__ import annotations

import copy
import importlib
import os
import pickle
from pathlib import Path

import torch
from torch import fx, nn

_KIND = "statqat-converted-model"


def save_converted(model: fx.GraphModule, example_inputs: tuple | torch.Tensor, path: str | os.PathLike) -> None:
    """Save a converted model and the inputs to check its exports with.

    Raises:
        ValueError: the model cannot be pickled (some models traced with torch.export):
            use a ``module:function`` spec for ``statqat export`` instead.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    graph = copy.deepcopy(model.graph)
    for node in graph.nodes:
        node.meta = {}  # tracing metadata (stack traces, fake tensors) is not needed to run
    root = nn.Module()
    for name, child in model.named_children():
        root.add_module(name, child)
    for node in graph.nodes:  # top-level constants and buffers the graph reads
        if node.op == "get_attr" and "." not in node.target:
            setattr(root, node.target, getattr(model, node.target))
    saved = {"kind": _KIND, "version": 1, "root": root, "graph": graph, "example_inputs": inputs}
    try:
        torch.save(saved, path)
    except (AttributeError, TypeError, RuntimeError, pickle.PicklingError) as err:
        Path(path).unlink(missing_ok=True)
        raise ValueError(
            f"{type(model).__name__} cannot be pickled ({err}). "
            "Give `statqat export` a 'package.module:function' that returns (model, example_inputs) instead."
        ) from err


def _graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(root, graph)
    for name, child in root.named_children():  # fx copies tensors only; keep the real modules
        setattr(gm, name, child)
    return gm


def load_model(spec: str) -> tuple[nn.Module, tuple]:
    """``(model, example_inputs)`` from a saved file or a ``package.module:function`` spec.

    Raises:
        ValueError: the file is not a saved model, or the function returns something else.
    """
    if Path(spec).is_file():
        saved = torch.load(spec, weights_only=False, map_location="cpu")
        if not isinstance(saved, dict) or saved.get("kind") != _KIND:
            raise ValueError(f"{spec} is not a model saved by statqat_ao.tools.saved_model.save_converted")
        return _graph_module(saved["root"], saved["graph"]), tuple(saved["example_inputs"])
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"{spec!r} is neither a file nor a 'package.module:function' spec")
    result = getattr(importlib.import_module(module_name), attr)()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ValueError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
