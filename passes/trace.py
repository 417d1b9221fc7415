"""Trace a model into a GraphModule: torch.fx first, torch.export where fx cannot.

Example:
    >>> import torch
    >>> from statqat_ao.passes.trace import trace
    >>> gm, how = trace(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    >>> how
    'fx'
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import sys
import traceback
import types
import warnings

import torch
from torch import fx, nn

from . import attention
from .keyword_inputs import accept_keyword_inputs
from .train_only_dropout import dropout_calls_as_modules


class TraceError(RuntimeError):
    """The model could not be traced; the message names the construct and the way out."""


def reads_training_flag(module: nn.Module) -> bool:
    """A module without parameters, buffers or children whose ``forward`` reads ``self.training``.

    Stochastic depth (torchvision's ``StochasticDepth``, timm's ``DropPath``) and custom
    dropouts are such modules. Traced through, fx evaluates ``self.training`` once and bakes
    the trace-time mode into the graph (a model traced in training mode stays random in
    eval); kept as a module, ``.train()`` / ``.eval()`` switch it as on the original model.
    """
    if next(module.children(), None) is not None or next(module.parameters(), None) is not None:
        return False
    if next(module.buffers(), None) is not None:
        return False
    return _forward_reads_training(type(module))


@functools.cache
def _forward_reads_training(cls: type) -> bool:
    # Once per class: a deep model repeats a few module types many times.
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source


# Batch norms with an activation attached (module, class) -> the children their forward
# applies after normalising, in order. timm's BatchNormAct2d copies nn.BatchNorm2d's
# forward (branching on self.training, which a trace would bake in) and then applies
# `drop` and `act`; traced as a batch-norm leaf followed by those children, the batch norm
# folds into its conv and .train() / .eval() switch it (split_norm_act).
NORM_ACT: dict[tuple[str, str], tuple[str, ...]] = {
    ("timm.layers.norm_act", "BatchNormAct2d"): ("drop", "act"),
}


def _norm_act_children(module: nn.Module) -> tuple[str, ...] | None:
    cls = type(module)
    return NORM_ACT.get((cls.__module__, cls.__qualname__))


class ModeAwareTracer(fx.Tracer):
    """torch.fx's tracer, keeping modules that read ``self.training`` as leaves (see :func:`reads_training_flag`)
    and tracing ``nn.MultiheadAttention`` through its projections where it can (:mod:`.attention`)."""

    _rewriting: nn.Module | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if m is self._rewriting:
            return False
        return super().is_leaf_module(m, module_qualified_name) or reads_training_flag(m)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        children = _norm_act_children(m)
        if children is not None and not kwargs and len(args) == 1:
            # The batch norm as a leaf, then its children (split_norm_act makes the leaf plain).
            out = self.create_proxy("call_module", self.path_of_module(m), args, {})
            for name in children:
                child = getattr(m, name)
                out = super().call_module(child, child.forward, (out,), {})
            return out
        if not attention.rewritable_call(m, args, kwargs):
            return super().call_module(m, forward, args, kwargs)
        self._rewriting = m
        try:
            return super().call_module(m, functools.partial(attention.traced_multihead_attention, m), args, kwargs)
        finally:
            self._rewriting = None


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with :class:`ModeAwareTracer`.

    Example:
        >>> class DropPath(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * (torch.rand(x.shape[0], 1) > 0.5) if self.training else x
        >>> gm = symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), DropPath()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    graph = ModeAwareTracer().trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    gm = fx.GraphModule(model, graph, name)
    split_norm_act(gm)
    dropout_calls_as_modules(gm, traced_training=getattr(model, "training", True))
    drop_identities(gm)
    return gm


def drop_identities(gm: fx.GraphModule) -> None:
    """In place: calls of ``nn.Identity`` (timm's ``drop_block`` / ``aa`` placeholders between a
    conv and its activation) are bypassed, so patterns that span them (a GEMM, its ReLU, the
    next quantize) match as in a model without them."""
    dropped = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropped = True
    if dropped:
        gm.recompile()


def split_norm_act(gm: fx.GraphModule) -> None:
    """In place: each registered norm-act module a ``call_module`` node calls becomes its
    plain batch-norm base class over the same parameters, buffers and children (state-dict
    names unchanged); the trace already calls the children after it (:data:`NORM_ACT`)."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if _norm_act_children(module) is None:
            continue
        plain = copy.copy(module)  # shares the parameter, buffer and child dicts
        plain.__class__ = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, plain)


def _fx_failure_site(exc: BaseException) -> str:
    """The innermost frame of the model's own code in a tracing traceback."""
    import statqat_ao.numerics

    core = os.path.dirname(os.path.dirname(os.path.abspath(statqat_ao.numerics.__file__)))  # statqat_ao/
    ours = (
        os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
        core + os.sep,
        os.path.dirname(os.path.abspath(sys.modules[__package__].__file__)) + os.sep,
    )
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not os.path.abspath(f.filename).startswith(ours)]
    if not frames:
        return "an unknown place"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} ({f.name}): {f.line}"


def _auto_dynamic(example):
    # Every tensor dimension dynamic where export can keep it so (batch, sequence length).
    return torch.utils._pytree.tree_map(
        lambda t: {d: torch.export.Dim.AUTO for d in range(t.dim()) if t.shape[d] > 1}
        if isinstance(t, torch.Tensor)
        else None,
        example,
    )


def trace(
    model: nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    method: str = "auto",
) -> tuple[fx.GraphModule, str]:
    """Trace ``model``; return the GraphModule and how (``"fx"`` or ``"export"``).

    ``method="auto"`` tries ``torch.fx.symbolic_trace`` and falls back to
    ``torch.export`` (non-strict, dynamic batch and sequence dims), which needs
    ``example_inputs``.

    Raises:
        TraceError: naming the construct fx stopped at, and what to pass to use torch.export.
    """
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"method must be 'auto', 'fx' or 'export', got {method!r}")
    fx_error: BaseException | None = None
    if method in ("auto", "fx") and not isinstance(model, fx.GraphModule):
        try:
            gm = drop_string_annotations(symbolic_trace(model))
        except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
            fx_error = exc
            if method == "fx":
                raise TraceError(_fx_message(model, exc)) from exc
        else:
            warn_if_mode_changes_graph(model, gm)  # outside the try: a warning raised as an error is no fx failure
            return gm, "fx"
    elif isinstance(model, fx.GraphModule) and method != "export":
        return model, "fx"
    if example_inputs is None:
        raise TraceError(
            _fx_message(model, fx_error)
            + " Pass example_inputs=(...) to prepare_qat_fx so it can trace with torch.export instead."
        )
    args = tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    # Exported in eval mode: dropout probabilities inside fused ops (SDPA's dropout_p)
    # would otherwise be baked in; .train() / .eval() on the result still switch the
    # dropout and batch-norm nodes torchao knows how to move.
    was_training = model.training
    model.eval()
    try:
        try:
            bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
            dynamic = {name: _auto_dynamic(value) for name, value in bound.items()}
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        except Exception:
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:
        prefix = _fx_message(model, fx_error) + " " if fx_error is not None else ""
        raise TraceError(
            f"{prefix}torch.export also failed for {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Make that construct traceable "
            "(see torch.export's docs on control flow), or quantize the submodules that trace."
        ) from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    _dropout_as_modules(gm)
    accept_keyword_inputs(gm, model, kwargs)  # model(pixel_values=x, labels=y), as training loops call it
    return gm, "export"


def _ops(gm: fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def warn_if_mode_changes_graph(model: nn.Module, gm: fx.GraphModule) -> bool:
    """Warn (and return True) if ``model`` traced in the other mode gives another graph.

    A forward that branches on ``self.training`` outside the modules the trace keeps whole
    (torchvision's googlenet and inception_v3 run and return their auxiliary heads in
    training only) is traced once, in the model's current mode: ``.eval()`` on the prepared
    model does not switch that branch.
    """
    if not isinstance(model, nn.Module):
        return False
    mode = model.training
    modes = [(m, m.training) for m in model.modules()]  # per module: a frozen batch norm stays in eval
    try:
        model.train(not mode)
        other = symbolic_trace(model)
    except Exception:  # the other mode does not trace: nothing to compare
        return False
    finally:
        for m, training in modes:
            m.training = training
    ops, other_ops = _ops(gm), _ops(other)
    if ops == other_ops:
        return False
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    first = next((i for i, (a, b) in enumerate(zip(ops, other_ops, strict=False)) if a != b), min(len(ops), len(other_ops)))
    where = f" (the graphs part at node {nodes[first].name!r})" if first < len(nodes) else ""
    warnings.warn(
        f"statqat: {type(model).__name__}'s forward branches on self.training outside a module{where}: it was "
        f"traced in {'training' if mode else 'eval'} mode, and .train() / .eval() on the prepared model do not "
        "switch that branch (torchvision's googlenet / inception_v3 keep running and returning their auxiliary "
        "heads in eval). Build the model without the branch (torchvision: aux_logits=False).",
        stacklevel=4,
    )
    return True


def drop_string_annotations(gm: fx.GraphModule) -> fx.GraphModule:
    """Forget input/output annotations that are strings (``from __future__ import annotations``).

    fx keeps them as names its generated code cannot import, which makes the module
    impossible to pickle (``torch.save(model)``).
    """
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    gm.recompile()
    return gm


def _dropout_as_modules(gm: fx.GraphModule) -> None:
    """Exported (in eval mode) dropout nodes carry a fixed train flag: make them ``nn.Dropout``
    modules, so ``.train()`` / ``.eval()`` on the GraphModule switch them as on the original model."""
    dropout_calls_as_modules(gm, traced_training=False)
    # ExportedProgram.module() refuses .train()/.eval(); with dropout as modules, the
    # plain nn.Module behaviour is the right one.
    gm.train = types.MethodType(nn.Module.train, gm)
    gm.eval = types.MethodType(nn.Module.eval, gm)


def _fx_message(model: nn.Module, exc: BaseException | None) -> str:
    if exc is None:
        return f"{type(model).__name__} could not be traced."
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {detail}, "
        f"at {_fx_failure_site(exc)}."
    )
