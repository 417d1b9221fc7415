"""``prepare_qat_fx``: trace a model and insert StatQAT fake quantization.

What gets a fake quant (the tensors a deployed integer graph stores or computes on):

* the weight of every Linear, Conv1d and Conv2d (per channel or group, the weight spec),
  after BatchNorm folding, stored at ``<layer>.weight_fake_quant``;
* the input of every such layer (``<layer>.input_fake_quant``; one module when several
  layers read the same tensor, such as Q/K/V projections);
* both operands of a matmul / bmm (attention scores and context);
* the operands of a residual add or a cat of computed activations, through *one*
  module with one scale, because the integer op needs equal scales.

Graph inputs, constants and integer tensors (masks, indices) stay float. Weighted ops the
pass cannot quantize (embeddings, transposed or 3-D convs, opaque modules) stay float
and are listed in one warning.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import fx, nn

from statqat_ao.frontends.causal_lm import is_causal_lm, trace_kwargs, wrap_prepared
from statqat_ao.frontends.qconfig import QuantSpec, StatQATQConfig, statqat_qconfig
from statqat_ao.numerics.blocks import block_layout
from statqat_ao.numerics.formats import get_format
from statqat_ao.quantizers.nonfinite import NonFiniteTracking

from .bias_quant import BiasGrid, integer_kernel, quantize_bias
from .constants import constant_value, get_attr, is_constant, param_path
from .conv1d_as_linear import linearize_conv1d
from .fold_bn import FoldedBatchNorm, fold_batchnorm
from .functionalize import functionalize_weighted_modules
from .model_attributes import carry_model_attributes
from .opaque_functions import linear_weight_nodes
from .patterns import (
    WEIGHTED_KINDS,
    enclosing_module,
    is_float_activation,
    op_kind,
    unfolded_batch_norm,
    unsupported_weighted_op,
)
from .trace import TraceError, trace


def _register(gm: fx.GraphModule, path: str, module: nn.Module) -> str:
    """Register ``module`` at ``path`` (a free name next to it if taken); return the path."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    name, k = leaf, 1
    while hasattr(parent, name):
        name, k = f"{leaf}_{k}", k + 1
    parent.add_module(name, module)
    path = f"{parent_path}.{name}" if parent_path else name
    module._statqat_name = path  # for error messages (statqat_ao.quantizers.nonfinite)
    return path


def _layer_input(node: fx.Node) -> fx.Node | None:
    """The input of a linear / conv node whose weight error it weights (None for a grouped conv)."""
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    x = node.args[0]
    return x if groups == 1 and isinstance(x, fx.Node) else None


class _Inserter:
    def __init__(self, gm: fx.GraphModule, qconfig: StatQATQConfig):
        self.gm, self.qconfig = gm, qconfig
        self.weight_fq: dict[str, fx.Node] = {}
        self.activation_fq: dict[tuple[fx.Node, QuantSpec], fx.Node] = {}

    def _module_of(self, node: fx.Node, weight_path: str) -> tuple[str, object]:
        if "statqat_module" in node.meta:
            return node.meta["statqat_module"]
        owner = weight_path.rpartition(".")[0]
        _, module_type = enclosing_module(node)
        return owner, module_type or self.gm.get_submodule(owner)

    def weighted(self, node: fx.Node) -> None:
        weight = node.args[1]
        path = param_path(weight)
        if path is None:  # weight computed from inputs: not a layer weight
            return self.operands(node, [node.args[0]])
        name, module = self._module_of(node, path)
        cfg = self.qconfig.for_module(name, module)
        if cfg is None:
            return None
        x = w = None
        if cfg.activation is not None and is_float_activation(node.args[0]):
            x = self._activation_fq(node.args[0], cfg.activation, f"{name}.input_fake_quant" if name else f"{node.name}_input_fake_quant")
            node.args = (x, *node.args[1:])
        if cfg.weight is not None:
            w = self._weight_fq(weight, path, name, cfg.weight, node)
            node.args = (node.args[0], w, *node.args[2:])
        if x is not None and w is not None and integer_kernel(cfg.activation, cfg.weight):
            self._int32_bias(node, x, w)
        return None

    def _int32_bias(self, node: fx.Node, x: fx.Node, w: fx.Node) -> None:
        """The layer's bias (or the bias its folded batch norm adds in eval) as int32 codes of
        ``s_x s_w`` (bias_quant.py)."""
        graph = self.gm.graph
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        users = list(node.users)
        folded = users[0] if len(users) == 1 and users[0].op == "call_module" and isinstance(
            self.gm.get_submodule(users[0].target), FoldedBatchNorm) else None  # fmt: skip
        if bias is None and folded is None:
            return
        grid = BiasGrid(self.gm.get_submodule(x.target), self.gm.get_submodule(w.target))
        owner = w.target.rpartition(".")[0]
        target = _register(self.gm, f"{owner}.bias_grid" if owner else "bias_grid", grid)
        with graph.inserting_before(node):
            scale = graph.call_module(target, ())
            if bias is not None and folded is None:
                quantized = graph.call_function(quantize_bias, (bias, scale))
                quantized.meta["is_wrapped"] = True
                if len(node.args) > 2:
                    node.args = (*node.args[:2], quantized, *node.args[3:])
                else:  # F.linear(x, w, bias=b)
                    node.kwargs = {**node.kwargs, "bias": quantized}
        if folded is not None:
            folded.kwargs = {**folded.kwargs, "bias_scale": scale}

    def opaque_weights(self, node: fx.Node) -> None:
        """Weight quantizers on the Linear weights a function the trace keeps whole takes as arguments."""
        for where, weight in linear_weight_nodes(node):
            path = param_path(weight)
            if path is None or not is_constant(weight):
                continue
            owner = path.rpartition(".")[0]
            cfg = self.qconfig.for_module(owner, self.gm.get_submodule(owner))
            if cfg is None or cfg.weight is None:
                continue
            fq = self._weight_fq(weight, path, owner, cfg.weight, node, sees_input=False)
            if isinstance(where, int):
                node.args = (*node.args[:where], fq, *node.args[where + 1 :])
            else:
                node.kwargs = {**node.kwargs, where: fq}

    def _weight_fq(self, weight: fx.Node, path: str, layer: str, spec: QuantSpec, node: fx.Node,
                   sees_input: bool = True) -> fx.Node:  # fmt: skip
        if path in self.weight_fq:
            return self.weight_fq[path]
        # The group size must divide the row: fail here, naming the layer. The quantized
        # tensor is the weight node's value (GPT-2's Conv1D: the transposed parameter).
        val = weight.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else tuple(get_attr(self.gm, path).shape)
        block_layout(shape, spec.granularity, spec.axis, get_format(spec.fmt), name=f"layer {layer!r} weight")
        owner = path.rpartition(".")[0]
        leaf = path.rpartition(".")[2]
        module = spec.make(False)
        target = _register(self.gm, f"{owner}.{leaf}_fake_quant" if owner else f"{leaf}_fake_quant", module)
        layer_input = _layer_input(node) if sees_input and getattr(module, "output_aware", False) else None
        if layer_input is None:
            with self.gm.graph.inserting_after(weight):
                fq = self.gm.graph.call_module(target, (weight,))
        else:  # the layer input feeds the quantizer's second moments: call it next to the layer
            module.input_feature_dim = -1 if op_kind(node, self.gm) == "linear" else 1
            with self.gm.graph.inserting_before(node):
                fq = self.gm.graph.call_module(target, (weight,), {"layer_input": layer_input})
        self.weight_fq[path] = fq
        return fq

    def _activation_fq(self, x: fx.Node, spec: QuantSpec, path: str) -> fx.Node:
        if spec.granularity == "token":
            raise ValueError(
                f"{path}: per-token activations (activation_granularity='token') are dynamic and run in the "
                "eager front end only: use sq.quantize_(model, qconfig), or per-tensor activations in graph mode"
            )
        key = (x, spec)
        if key not in self.activation_fq:
            target = _register(self.gm, path, spec.make(True))
            with self.gm.graph.inserting_after(x):
                self.activation_fq[key] = self.gm.graph.call_module(target, (x,))
        return self.activation_fq[key]

    def _spec_at(self, node: fx.Node) -> QuantSpec | None:
        name, module_type = enclosing_module(node)
        cfg = self.qconfig.for_module(name, module_type)
        return None if cfg is None else cfg.activation

    def operands(self, node: fx.Node, operands: list) -> None:
        """Independent fake quant on each float operand (matmul)."""
        spec = self._spec_at(node)
        if spec is None:
            return
        replace = {}
        for i, a in enumerate(operands):
            if is_float_activation(a):
                replace[a] = self._activation_fq(a, spec, f"{node.name}_in{i}_fake_quant")
        node.args = torch.utils._pytree.tree_map(lambda a: replace.get(a, a) if isinstance(a, fx.Node) else a, node.args)

    def shared(self, node: fx.Node, operands: list) -> None:
        """One fake quant, one scale, for all operands (residual add, cat)."""
        spec = self._spec_at(node)
        # Graph inputs are excluded here: an add of an input is usually a mask or a bias.
        if spec is None or len(operands) < 2 or not all(is_float_activation(a, allow_inputs=False) for a in operands):
            return
        target = _register(self.gm, f"{node.name}_fake_quant", spec.make(True))
        with self.gm.graph.inserting_before(node):
            fq = self.gm.graph.call_module(target, tuple(operands))
            outs = {a: self.gm.graph.call_function(operator.getitem, (fq, i)) for i, a in enumerate(operands)}
        node.args = torch.utils._pytree.tree_map(lambda a: outs.get(a, a) if isinstance(a, fx.Node) else a, node.args)


def prepare_qat_fx(
    model: nn.Module,
    qconfig: StatQATQConfig | None = None,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    trace_method: str = "auto",
) -> fx.GraphModule:
    """Trace ``model`` and insert StatQAT fake quantization for QAT.

    Args:
        model: the float model (copied, not modified).
        qconfig: a :class:`~statqat_ao.StatQATQConfig` (default :data:`statqat_qconfig`).
        example_inputs: positional inputs. Needed where torch.fx cannot trace the model
            (then torch.export is used) and to initialise the activation scales; without
            them activation scales start on the first forward.
        example_kwargs: keyword inputs for the torch.export path.
        trace_method: ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``.

    Returns:
        A trainable GraphModule in the model's train/eval mode (for a Hugging Face causal
        LM, a :class:`~statqat_ao.frontends.causal_lm.CausalLMGraph` around it, called as
        the model is: ``input_ids=``, ``attention_mask=``, ``labels=``). Parameter names are the
        model's own; quantizer state sits at ``<layer>.weight_fake_quant`` and
        ``<layer>.input_fake_quant``. The model's public plain attributes (timm's
        ``pretrained_cfg``, ``num_classes``) carry over, and so do the answers of the methods
        training recipes ask (``no_weight_decay()``, ``group_matcher()``;
        :mod:`statqat_ao.passes.model_attributes`).

    Example:
        >>> import torch, statqat_ao as sq
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (torch.randn(4, 16),))
        >>> qat(torch.randn(4, 16)).shape
        torch.Size([4, 2])
        >>> sorted(k for k in qat.state_dict() if k.startswith("0."))[:3]
        ['0.bias', '0.input_fake_quant._extra_state', '0.input_fake_quant.scale']

    Raises:
        TraceError: the model cannot be traced (naming the construct).
        ValueError: a group size that does not divide a layer's row, naming the layer.
    """
    qconfig = statqat_qconfig if qconfig is None else qconfig
    if not isinstance(qconfig, StatQATQConfig):
        raise TypeError(
            f"qconfig must be a StatQATQConfig (sq.get_statqat_qconfig(...)), got {type(qconfig).__name__}"
        )
    training = model.training
    modes = {name: m.training for name, m in model.named_modules()}
    causal_lm = is_causal_lm(model)
    source = copy.deepcopy(model)
    if causal_lm:  # a Hugging Face decoder: export with the KV cache off, GPT-2's Conv1D as linears
        if example_inputs is None:
            raise TraceError(
                f"{type(model).__name__} is traced with torch.export: pass example_inputs=(input_ids,) "
                "(and example_kwargs={'attention_mask': mask} for padded batches)"
            )
        example_kwargs = trace_kwargs(model, example_kwargs)
        trace_method = "export" if trace_method == "auto" else trace_method
        linearize_conv1d(source)
    gm, _ = trace(source, example_inputs, example_kwargs, trace_method)
    functionalize_weighted_modules(gm)
    fold_batchnorm(gm)
    inserter = _Inserter(gm, qconfig)
    unsupported = []
    for node in list(gm.graph.nodes):
        kind = op_kind(node, gm)
        if kind in WEIGHTED_KINDS and node.op == "call_function":
            inserter.weighted(node)
        elif kind == "matmul":
            inserter.operands(node, list(node.args[:2]))
        elif kind == "add" and len(node.args) >= 2 and not node.kwargs:
            inserter.shared(node, list(node.args[:2]))
        elif kind == "cat" and isinstance(node.args[0], (list, tuple)):
            inserter.shared(node, list(node.args[0]))
        else:
            inserter.opaque_weights(node)
            what = unsupported_weighted_op(node, gm) or unfolded_batch_norm(node)
            if what is not None:
                unsupported.append(what)
    gm.graph.lint()
    gm.recompile()
    if unsupported:
        warnings.warn(
            f"statqat: {len(unsupported)} weighted op(s) have no StatQAT quantizer and stay float: "
            + ", ".join(unsupported),
            stacklevel=2,
        )
    _initialize(gm, inserter, example_inputs, example_kwargs)
    gm.train(training)
    _restore_modes(gm, modes)
    if not causal_lm:  # a decoder's wrapper answers for the model itself
        carry_model_attributes(model, gm)
    return wrap_prepared(model, gm, example_kwargs) if causal_lm else gm


def _restore_modes(gm: fx.GraphModule, modes: dict[str, bool]) -> None:
    """Each module the model had takes back its own mode: a batch norm frozen with ``.eval()``
    inside a training model stays frozen (its folded form included, which keeps its name).
    Modules the pass added (quantizers) follow the model's mode."""
    for name, module in gm.named_modules():
        if name in modes:
            module.training = modes[name]


def _allocate_moments(fq: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: an output-aware weight quantizer's moments take their shape now."""
    x = kwargs.get("layer_input")
    if x is not None and hasattr(fq, "allocate_input_moments") and x.dim():
        fq.allocate_input_moments(x.shape[fq.input_feature_dim], x.device)


@torch.no_grad()
def _initialize(gm: fx.GraphModule, inserter: _Inserter, example_inputs, example_kwargs) -> None:
    """First scales: weights from the weights themselves, activations from the example inputs.

    Quantizers estimate in eval mode (once, with no training update). Batch norm runs as
    the model will: a model prepared in training mode normalises with batch statistics, so
    the first activation scales fit training's activations (with a fresh model's running
    statistics, eval-mode activations are unnormalised and can be far smaller: MobileNetV2's
    collapsed to 1e-8 at its first QAT step and went NaN at the third). The running
    statistics are restored afterwards.
    """
    was_training = gm.training
    norms = [m for m in gm.modules() if isinstance(m, (FoldedBatchNorm, nn.modules.batchnorm._BatchNorm))]
    trained_norms = [m for m in norms if m.training]  # a frozen one normalises with its running statistics
    gm.eval()
    cache: dict = {}
    for fq_node in inserter.weight_fq.values():
        fq = gm.get_submodule(fq_node.target)
        fq(constant_value(fq_node.args[0], gm, cache))
    if example_inputs is not None:
        saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for m in norms]
        for m in trained_norms:
            m.train()
        hooks = [gm.get_submodule(n.target).register_forward_pre_hook(_allocate_moments, with_kwargs=True)
                 for n in inserter.weight_fq.values()]  # fmt: skip
        try:
            gm(*example_inputs, **(example_kwargs or {}))
        finally:
            for hook in hooks:
                hook.remove()
            for m, buffers in zip(norms, saved, strict=True):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)
                m.eval()
    for m in gm.modules():  # the first training forward is statistics update 0 (step 0)
        if isinstance(m, NonFiniteTracking):
            m.restart_update_count()
    gm.train(was_training)
