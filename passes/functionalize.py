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

    fused_relu = (nni.LinearReLU, nni.ConvReLU1d, nni.ConvReLU2d, nniqat.LinearReLU, nniqat.ConvReLU1d, nniqat.ConvReLU2d,
                  nniqat.ConvBnReLU1d, nniqat.ConvBnReLU2d)  # fmt: skip
    return F.relu if isinstance(mod, fused_relu) else None


def _is_conv_bn(mod: nn.Module) -> bool:
    import torch.ao.nn.intrinsic.qat as nniqat

    return isinstance(mod, nniqat.modules.conv_fused._ConvBnNd)


def _base_type(mod: nn.Module) -> type | None:
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
        if _is_conv_bn(mod):
            _functionalize_conv_bn(gm, node, mod)
            continue
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


def _functionalize_conv_bn(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> None:
    """torch.ao's fused QAT ``ConvBn*d`` / ``ConvBnReLU*d`` as the ops its eval forward computes.

    The same ops in the same order as the module's eval path, so a converted model
    computes what the QAT module computes in eval, bit for bit. Both of torch.ao's paths:
    the default ``_forward_approximate`` (the weight scaled by ``gamma / sqrt(running_var +
    eps)`` goes through ``weight_fake_quant``, whose codes convert stores; the conv output is
    divided by that factor again, the conv bias added, the module's own ``bn`` applied) and,
    where ``_enable_slow_path_for_better_numerical_stability`` is set (see
    :func:`statqat_ao.passes.torch_ao_config.exact_zero_batch_norm_weights`), ``_forward_slow``:
    the same fake-quantized weight, then the folded bias ``beta - gamma * (running_mean -
    bias) / running_std`` added, with no division by ``gamma``.
    """
    if len(node.args) != 1 or node.kwargs or getattr(mod, "padding_mode", "zeros") != "zeros":
        raise NotImplementedError(f"{node.target} ({type(mod).__name__}): only zero padding and one input are supported")
    import operator

    import torch

    t, g = node.target, gm.graph
    dims = mod.weight.dim()
    weight_shape, bias_shape = [-1] + [1] * (dims - 1), [1, -1] + [1] * (dims - 2)
    conv_fn = F.conv1d if dims == 3 else F.conv2d
    slow = getattr(mod, "_enable_slow_path_for_better_numerical_stability", False)
    with g.inserting_before(node):
        running_std = g.call_function(torch.sqrt, (g.call_function(operator.add, (g.get_attr(f"{t}.bn.running_var"), mod.bn.eps)),))
        factor = g.call_function(operator.truediv, (g.get_attr(f"{t}.bn.weight"), running_std))
        scaled = g.call_function(operator.mul, (g.get_attr(f"{t}.weight"), g.call_method("reshape", (factor, weight_shape))))
        weight = g.call_module(f"{t}.weight_fake_quant", (scaled,))
        zero_bias = g.call_function(torch.zeros_like, (factor,))
        conv = g.call_function(conv_fn, (node.args[0], weight, zero_bias, mod.stride, mod.padding, mod.dilation, mod.groups))
        if slow:
            mean = g.get_attr(f"{t}.bn.running_mean")
            if mod.bias is not None:
                mean = g.call_function(operator.sub, (mean, g.get_attr(f"{t}.bias")))
            shift = g.call_function(operator.truediv, (g.call_function(operator.mul, (g.get_attr(f"{t}.bn.weight"), mean)), running_std))
            folded_bias = g.call_function(operator.sub, (g.get_attr(f"{t}.bn.bias"), shift))
            out = g.call_function(operator.add, (conv, g.call_method("reshape", (folded_bias, bias_shape))))
        else:
            out = g.call_function(operator.truediv, (conv, g.call_method("reshape", (factor, bias_shape))))
            if mod.bias is not None:
                out = g.call_function(operator.add, (out, g.call_method("reshape", (g.get_attr(f"{t}.bias"), bias_shape))))
            out = g.call_module(f"{t}.bn", (out,))
        activation = _fused_activation(mod)
        if activation is not None:
            out = g.call_function(activation, (out,))
    conv.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    g.erase_node(node)
