"""FSDP2 per layer on a prepared (fx) model.

``prepare_qat_fx`` turns each Linear / Conv into a functional op that reads the layer's
weight by ``get_attr`` (through its weight fake quant), so the graph never *calls* the
layer, and ``fully_shard(layer)`` alone never all-gathers: the op would read a sharded
DTensor. :func:`shard_per_module` marks where each unit's part of the graph begins and
ends with two parameter-free pass-through calls, ``<unit>._fsdp_enter`` and
``<unit>._fsdp_exit``, and runs the unit's own FSDP2 pre- and post-forward there, which
is what FSDP runs around ``module.forward``. The forward all-gathers before the
weight is read, and reshards after the unit's last use of it. Backward all-gathers
again when the gradient reaches the unit's outputs, and reduce-scatters when it leaves
through its inputs. Weight quantizers therefore see the whole weight, as they do
unsharded, and their per-channel statistics are the same.

Example (two processes, e.g. ``torchrun --nproc_per_node=2``)::

    model = sq.prepare_qat_fx(TransformerLM(), sq.statqat_qconfig, example_inputs)
    shard_per_module(model, [f"layers.{i}" for i in range(n_layers)])  # and the root
    opt = torch.optim.AdamW(model.parameters())
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

from torch import fx, nn


class FSDPBoundary(nn.Module):
    """A pass-through call marking where an FSDP unit's region of the graph starts or ends.

    It holds no state, so the state dict does not change.

    Example:
        >>> FSDPBoundary()(1, 2)
        (1, 2)
    """

    def forward(self, *xs: Any) -> tuple:
        return xs


def unit_region(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    """The nodes from the first that reads or calls something under ``path`` to the last
    user of one of its parameters or buffers (``F.linear`` reads the bias after the
    weight's quantizer).

    Example:
        >>> import torch, statqat_ao as sq
        >>> gm = sq.prepare_qat_fx(torch.nn.Sequential(torch.nn.Linear(4, 4)), sq.statqat_qconfig)
        >>> [n.op for n in unit_region(gm, "0")]
        ['call_module', 'get_attr', 'get_attr', 'call_module', 'call_module', 'call_function']
    """
    prefix = path + "."
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    own = [n for n in nodes if n.op in ("get_attr", "call_module") and str(n.target).startswith(prefix)]
    if not own:
        raise ValueError(
            f"the prepared graph never reads or calls anything under {path!r}: name a module "
            "that holds a quantized layer (see model.named_modules())"
        )
    last = max(index[n] for n in own)
    for n in own:
        if n.op == "get_attr":
            last = max([last, *(index[u] for u in n.users)])
    return nodes[index[own[0]] : last + 1]


def _insert_boundaries(gm: fx.GraphModule, path: str) -> None:
    region = unit_region(gm, path)
    inside = set(region)
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside and a.op != "get_attr"))
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    unit = gm.get_submodule(path)
    for name in ("_fsdp_enter", "_fsdp_exit"):
        if hasattr(unit, name):
            raise ValueError(f"{path!r} already has {name}: shard_per_module was applied to it before")
        unit.add_module(name, FSDPBoundary())
    graph = gm.graph
    with graph.inserting_before(region[0]):
        enter = graph.call_module(f"{path}._fsdp_enter", tuple(inputs))
        for i, x in enumerate(inputs):
            item = graph.call_function(operator.getitem, (enter, i))
            for n in region:
                n.replace_input_with(x, item)
    with graph.inserting_after(region[-1]):
        leave = graph.call_module(f"{path}._fsdp_exit", tuple(outputs))
    with graph.inserting_after(leave):
        for i, y in enumerate(outputs):
            item = graph.call_function(operator.getitem, (leave, i))
            for user in [u for u in y.users if u not in inside and u is not leave]:
                user.replace_input_with(y, item)


def _pre_forward(state, unit, _boundary, args, kwargs):
    return state._pre_forward(unit, args, kwargs)


def _post_forward(state, unit, _boundary, args, output):
    return state._post_forward(unit, args, output)


def shard_per_module(
    prepared: fx.GraphModule, module_paths: Sequence[str], *, root: bool = True, **fsdp_kwargs: Any
) -> fx.GraphModule:
    """``fully_shard`` each of ``module_paths`` of a prepared model, and the root.

    Args:
        prepared: a model from :func:`statqat_ao.prepare_qat_fx`, on every rank alike.
        module_paths: the FSDP units, e.g. the transformer blocks ``layers.0``, ``layers.1``...
            Units may nest; parameters outside every unit belong to the root.
        root: also ``fully_shard`` the whole model (what FSDP2 expects at the top).
        fsdp_kwargs: passed to every ``fully_shard`` call (``mesh``,
            ``reshard_after_forward``, ``mp_policy``, ...).

    Returns:
        ``prepared``, sharded in place. Parameter and state-dict names do not change.

    This uses FSDP2's per-unit ``_pre_forward`` / ``_post_forward``, which torch's own
    ``register_fsdp_forward_method`` calls. They are private, so the pinned torch is
    tested with two processes in tests/parallel/test_distributed.py.
    """
    from torch.distributed.fsdp import fully_shard

    paths = sorted(dict.fromkeys(module_paths), key=lambda p: -p.count("."))  # innermost first
    for path in paths:
        _insert_boundaries(prepared, path)
    prepared.graph.lint()
    prepared.recompile()
    for path in paths:
        unit = fully_shard(prepared.get_submodule(path), **fsdp_kwargs)
        state = unit._get_fsdp_state()
        unit._fsdp_enter.register_forward_pre_hook(functools.partial(_pre_forward, state, unit), with_kwargs=True)
        unit._fsdp_exit.register_forward_hook(functools.partial(_post_forward, state, unit))
    if root:
        fully_shard(prepared, **fsdp_kwargs)
    return prepared
