"""Rewrite ``call_module`` Linear / Conv nodes as functional ops on ``get_attr`` weights.

After this pass every weighted op has the same shape in fx and torch.export graphs,
``op(x, get_attr(owner.weight), get_attr(owner.bias), ...)``, so inserting weight
fake-quant and converting it are one code path. The module stays registered as the
owner of its parameters, so state_dict names do not change. torch.ao's QAT modules
(``torch.ao.nn.qat.Linear`` / ``Conv2d``) keep their ``weight_fake_quant`` in the graph.

Example:
    >>> import torch
    >>> from statqat_ao.passes.functionalize import functionalize_weighted_modules
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    >>> functionalize_weighted_modules(gm)
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'get_attr', 'get_attr', 'call_function', 'output']
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

_CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}


def _fused_activation(mod: nn.Module):
    """The activation torch.ao fused into ``mod`` (``LinearReLU``, ``ConvReLU2d``, ...), or None.

    torch.ao's ``prepare_qat_fx`` fuses Linear+ReLU and Conv+ReLU into one QAT module whose
    forward applies the ReLU; a functional rewrite must keep it.
    """
    import torch.ao.nn.intrinsic as nni
    import torch.ao.nn.intrinsic.qat as nniqat

    fused_relu = (nni.LinearReLU, nni.ConvReLU1d, nni.ConvReLU2d, nniqat.LinearReLU, nniqat.ConvReLU1d, nniqat.ConvReLU2d)
    return F.relu if isinstance(mod, fused_relu) else None


def _base_type(mod: nn.Module) -> type | None:
    import torch.ao.nn.intrinsic.qat as nniqat

    if isinstance(mod, nniqat.modules.conv_fused._ConvBnNd):
        raise NotImplementedError(
            f"{type(mod).__name__} (torch.ao's fused conv-bn QAT module) folds batch norm its own way; "
            "prepare with statqat_ao.prepare_qat_fx, or convert with torch.ao's convert_fx"
        )
    for base in (nn.Linear, nn.Conv1d, nn.Conv2d):
        if isinstance(mod, base):
            return base
    return None


def functionalize_weighted_modules(gm: fx.GraphModule) -> None:
    """In place: Linear / Conv1d / Conv2d ``call_module`` nodes become functional ops."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        base = _base_type(mod)
        if base is None or getattr(mod, "padding_mode", "zeros") != "zeros" or len(node.args) != 1 or node.kwargs:
            continue
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            fq = getattr(mod, "weight_fake_quant", None)
            if fq is not None:  # torch.ao QAT module: its weight fake quant becomes a graph node
                weight = gm.graph.call_module(f"{node.target}.weight_fake_quant", (weight,))
            bias = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
            if base is nn.Linear:
                new = gm.graph.call_function(F.linear, (node.args[0], weight, bias))
            else:
                args = (node.args[0], weight, bias, mod.stride, mod.padding, mod.dilation, mod.groups)
                new = gm.graph.call_function(_CONV_FN[base], args)
            activation = _fused_activation(mod)
            out = new if activation is None else gm.graph.call_function(activation, (new,))
        new.meta = dict(node.meta)
        new.meta["statqat_module"] = (node.target, base)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()
