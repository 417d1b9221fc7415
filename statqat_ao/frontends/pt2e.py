"""StatQAT for torchao's PT2E flow: a fake-quantize module and a ``Quantizer``.

``StatQATQuantizer`` annotates a ``torch.export`` graph for torchao's
``prepare_qat_pt2e`` / ``convert_pt2e``; the fake-quantize modules it asks for are
:class:`StatQATPT2EFakeQuantize` (a torchao ``FakeQuantizeBase`` running a
:class:`~statqat_ao.FakeQuantizer`: statistics once per training forward, Python-bool
flags, so ``torch.compile(fullgraph=True)`` traces it whole).

What it quantizes (inputs only; op outputs stay float until the next quantized op):

* ``linear``, ``conv1d``, ``conv2d``: the input activation with the activation spec and
  the weight with the weight spec (per output channel, or per group along the row).
  Conv + BatchNorm (+ ReLU) needs nothing extra: torchao fuses every conv-bn pair for
  QAT after annotation and folds it in ``convert_pt2e``.
* ``matmul``, ``bmm``, ``mm``: both inputs with the activation spec.
* ``add`` of two activations (a residual) and ``cat``: the inputs share one scale
  (``SharedQuantizationSpec``), as an integer graph needs. The shared module estimates
  it jointly from all of them.

Deployment: ``convert_pt2e`` reads the trained scales (no re-estimation) and can express
INT formats per tensor or per channel; per-group and FP4/NF4/MX/NV formats need
:func:`statqat_ao.convert`. Observers keep estimating until they are frozen: switch
modes with :func:`set_qat_mode` (``model.eval()`` is not available on exported models).

Example:
    >>> import torch
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> example = (torch.randn(3, 8),)
    >>> m = torch.export.export(model, example).module()
    >>> prepared = prepare_qat_pt2e(m, StatQATQuantizer())
    >>> fqs = [mod for mod in prepared.modules() if isinstance(mod, StatQATPT2EFakeQuantize)]
    >>> len(fqs), prepared(*example).shape   # 2 weights + 2 input activations
    (4, torch.Size([3, 2]))
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import move_exported_model_to_eval as _to_eval
from torchao.quantization.pt2e import move_exported_model_to_train as _to_train
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpecBase,
    Quantizer,
    SharedQuantizationSpec,
)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from statqat_ao.numerics.blocks import block_layout
from statqat_ao.numerics.formats import get_format
from statqat_ao.quantizers.fake_quantizer import FakeQuantizer

from .pt2e_fake_quantize import StatQATPT2EFakeQuantize, StatQATPT2EObserver, quantization_spec
from .pt2e_stochastic_depth import TrainOnlyBernoulli, train_only_masks
from .qconfig import ModuleQConfig, QuantSpec, StatQATQConfig

aten = torch.ops.aten

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


# ---------------------------------------------------------------------------------------
# Which qconfig applies to a node


def _type_name(t: type | str) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _module_stack(node: Node) -> list[tuple[str, str]]:
    """``(qualified name, type name)`` of the modules a node was traced in, innermost first."""
    stack = []
    for path, tp in (node.meta.get("nn_module_stack") or {}).values():
        stack.append((path.removeprefix("L['self']."), _type_name(tp)))
    return stack[::-1]


def _layer_name(node: Node) -> str:
    stack = _module_stack(node)
    return stack[0][0] if stack and stack[0][0] else "<root>"


def _resolve(qconfig: StatQATQConfig, stack: list[tuple[str, str]]) -> ModuleQConfig | None:
    """A StatQATQConfig's own skip list and overrides, applied to a module stack."""
    paths = [p for p, _ in stack]
    if any(fnmatch.fnmatchcase(p, pat) for p in paths for pat in getattr(qconfig, "skipped", ())):
        return None
    for path in paths:
        for pattern, cfg in reversed(getattr(qconfig, "name_overrides", [])):
            if fnmatch.fnmatchcase(path, pattern):
                return cfg
    for _, type_name in stack:
        for module_type, cfg in reversed(getattr(qconfig, "type_overrides", [])):
            if _type_name(module_type) == type_name:
                return cfg
    return ModuleQConfig(qconfig.weight, qconfig.activation)


def _op_matches(target: Any, op: Any) -> bool:
    return target == op or getattr(target, "overloadpacket", None) == op


# ---------------------------------------------------------------------------------------
# The quantizer

_WEIGHTED = {
    aten.linear.default,
    aten.conv1d.default,
    aten.conv1d.padding,
    aten.conv2d.default,
    aten.conv2d.padding,
}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
_ADD = {aten.add.Tensor}
_CAT = {aten.cat.default}


def _is_float_tensor(arg: Any) -> bool:
    val = arg.meta.get("val") if isinstance(arg, Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _is_activation(arg: Any) -> bool:
    return _is_float_tensor(arg) and arg.op != "get_attr"


class StatQATQuantizer(Quantizer):
    """A torchao PT2E ``Quantizer`` that inserts StatQAT fake quantization.

    Configure it like ExecuTorch's ``XNNPACKQuantizer``; every setter returns ``self``.
    For a node, the first that applies wins: its module's name (:meth:`set_module_name`;
    the innermost named module first), its module's type (:meth:`set_module_type`), its
    operator (:meth:`set_operator_type`), the global qconfig (:meth:`set_global`; default
    :data:`statqat_ao.frontends.qconfig.statqat_qconfig`). ``None`` keeps the matched ops float.
    Inside the chosen :class:`~statqat_ao.frontends.qconfig.StatQATQConfig`, its own skip list and
    name / type overrides apply to the node's module names (module types match by exact
    class, as torch.export records them).

    Args:
        qconfig: the global qconfig.

    Example:
        >>> import torch, statqat_ao.frontends.qconfig as qc
        >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> m = torch.export.export(model, (torch.randn(2, 8),)).module()
        >>> quantizer = StatQATQuantizer().set_module_name("2", None)   # last layer float
        >>> prepared = prepare_qat_pt2e(m, quantizer)
        >>> sum(isinstance(mod, StatQATPT2EFakeQuantize) for mod in prepared.modules())
        2
    """

    def __init__(self, qconfig: StatQATQConfig | None = None, is_qat: bool = True):
        super().__init__()
        self.is_qat = is_qat  # False: observers for post-training calibration (prepare_pt2e)
        if qconfig is None:
            from .qconfig import statqat_qconfig as qconfig
        self.global_config: StatQATQConfig | None = qconfig
        self.module_name_config: dict[str, StatQATQConfig | None] = {}
        self.module_type_config: dict[type, StatQATQConfig | None] = {}
        self.operator_type_config: dict[Any, StatQATQConfig | None] = {}
        self._first_edge: dict[tuple[Node, QuantSpec], tuple[Node, Node]] = {}

    def set_global(self, qconfig: StatQATQConfig | None) -> StatQATQuantizer:
        """Use ``qconfig`` wherever nothing more specific applies (None: quantize nothing).

        Example:
            >>> import statqat_ao.frontends.qconfig as qc
            >>> q = StatQATQuantizer().set_global(qc.get_statqat_qconfig("int8", "int8"))
            >>> q.global_config.weight.fmt
            'int8'
        """
        self.global_config = qconfig
        return self

    def set_module_name(self, module_name: str, qconfig: StatQATQConfig | None) -> StatQATQuantizer:
        """Use ``qconfig`` for the ops inside the submodule ``module_name`` (e.g. ``"blocks.0"``).

        Example:
            >>> StatQATQuantizer().set_module_name("head", None).module_name_config
            {'head': None}
        """
        self.module_name_config[module_name] = qconfig
        return self

    def set_module_type(
        self, module_type: type, qconfig: StatQATQConfig | None
    ) -> StatQATQuantizer:
        """Use ``qconfig`` for the ops inside submodules of exactly ``module_type``.

        Example:
            >>> import torch
            >>> q = StatQATQuantizer().set_module_type(torch.nn.Conv2d, None)
            >>> list(q.module_type_config)
            [<class 'torch.nn.modules.conv.Conv2d'>]
        """
        self.module_type_config[module_type] = qconfig
        return self

    def set_operator_type(
        self, operator_type: Any, qconfig: StatQATQConfig | None
    ) -> StatQATQuantizer:
        """Use ``qconfig`` for one aten operator (``torch.ops.aten.add`` or an overload).

        Example:
            >>> import torch
            >>> q = StatQATQuantizer().set_operator_type(torch.ops.aten.add, None)
            >>> len(q.operator_type_config)
            1
        """
        self.operator_type_config[operator_type] = qconfig
        return self

    def _qconfig_for(self, node: Node, stack: list[tuple[str, str]]) -> StatQATQConfig | None:
        for path, _ in stack:
            if path in self.module_name_config:
                return self.module_name_config[path]
        for _, type_name in stack:
            for module_type, cfg in self.module_type_config.items():
                if _type_name(module_type) == type_name:
                    return cfg
        for op, cfg in self.operator_type_config.items():
            if _op_matches(node.target, op):
                return cfg
        return self.global_config

    def specs_for(self, node: Node) -> ModuleQConfig | None:
        """The weight / activation specs that apply to ``node`` (None: it stays float).

        Example:
            >>> import torch
            >>> m = torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).module()
            >>> node = next(n for n in m.graph.nodes if n.target == torch.ops.aten.linear.default)
            >>> StatQATQuantizer().specs_for(node).weight.fmt
            'int4'
        """
        stack = _module_stack(node)
        qconfig = self._qconfig_for(node, stack)
        return None if qconfig is None else _resolve(qconfig, stack)

    def annotate(self, model: GraphModule) -> GraphModule:
        """Annotate the supported ops of ``model`` (see the module docstring).

        Raises:
            ValueError: a spec that cannot quantize a tensor of the graph (e.g. a group
                size that does not divide a weight's row length), naming the layer.
        """
        self._first_edge = {}
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            annotator = _ANNOTATORS.get(node.target)
            existing = node.meta.get(Q_ANNOTATION_KEY)
            if annotator is None or (existing is not None and existing._annotated):
                continue
            specs = self.specs_for(node)
            if specs is None or (specs.weight is None and specs.activation is None):
                continue
            input_qspec_map = annotator(self, node, specs)
            if any(q is not None for q in input_qspec_map.values()):
                node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                    input_qspec_map=input_qspec_map, allow_implicit_sharing=False, _annotated=True
                )
        return model

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Stochastic depth / drop path masks exported in training mode become
        :class:`~statqat_ao.frontends.pt2e_stochastic_depth.TrainOnlyBernoulli` modules,
        drawn in training only (torchao's eval switch leaves them random otherwise)."""
        train_only_masks(model)
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to check beyond :meth:`annotate`."""

    def prepare_obs_or_fq_callback(
        self, model: GraphModule, edge_or_node_to_obs_or_fq: dict
    ) -> None:
        """Tell each shared fake-quantize module how many tensors it quantizes per forward,
        link each (and the stochastic-depth masks) to the graph, whose owner torchao's
        ``move_exported_model_to_eval`` switches, and keep torchao's conv-bn fusion finite
        where a batch-norm weight is 0 (:func:`exact_zero_batch_norm_weights`; it runs after
        the fusion, before torchao inserts the fake quantizes)."""
        exact_zero_batch_norm_weights(model)
        for module in model.modules():
            if isinstance(module, TrainOnlyBernoulli):
                module.link_to_graph(model.graph)
        tensors: dict[int, tuple[StatQATPT2EFakeQuantize, set[Node]]] = {}
        for edge_or_node, fq in edge_or_node_to_obs_or_fq.items():
            if isinstance(fq, StatQATPT2EFakeQuantize):
                fq.link_to_graph(model.graph)
                tensor = edge_or_node[0] if isinstance(edge_or_node, tuple) else edge_or_node
                tensors.setdefault(id(fq), (fq, set()))[1].add(tensor)
        for fq, nodes in tensors.values():
            fq.uses = len(nodes)

    # -- per-op annotators: {input node: qspec}, in argument order --------------------

    def _edge_spec(
        self, arg: Node, node: Node, spec: QuantSpec, is_activation: bool
    ) -> QuantizationSpecBase:
        """One fake quantize per (tensor, spec) among the ops torchao leaves in place: later
        consumers share the first one's. A conv or linear input gets its own: torchao's
        conv-bn QAT fusion replaces those nodes after annotation and may reorder them, and a
        shared spec must point at an edge prepare has already visited."""
        _check_shape(spec, arg, node, "weight" if not is_activation else "input activation")
        if not is_activation or node.target in _WEIGHTED:
            return quantization_spec(spec, is_activation, observer=not self.is_qat)
        key = (arg, spec)
        if key in self._first_edge:
            return SharedQuantizationSpec(self._first_edge[key])
        self._first_edge[key] = (arg, node)
        return quantization_spec(spec, is_activation, observer=not self.is_qat)

    def _annotate_weighted(self, node: Node, specs: ModuleQConfig) -> dict:
        # torchao's conv-bn QAT fusion rebuilds this map positionally (input, weight),
        # so both entries are always present, None where a tensor stays float.
        act, weight = node.args[0], node.args[1]
        act_q = (
            self._edge_spec(act, node, specs.activation, True)
            if specs.activation and _is_activation(act)
            else None
        )
        weight_q = (
            self._edge_spec(weight, node, specs.weight, False)
            if specs.weight and _is_float_tensor(weight)
            else None
        )
        return {act: act_q, weight: weight_q}

    def _annotate_matmul(self, node: Node, specs: ModuleQConfig) -> dict:
        if specs.activation is None:
            return {}
        return {
            a: self._edge_spec(a, node, specs.activation, True)
            for a in node.args[:2]
            if _is_float_tensor(a)
        }

    def _annotate_shared(self, node: Node, specs: ModuleQConfig, inputs: list) -> dict:
        spec = specs.activation
        if spec is None or len(inputs) < 2 or not all(_is_activation(a) for a in inputs):
            return {}
        if spec.granularity != "tensor":  # one scale per tensor cannot be shared: quantize each
            return {a: self._edge_spec(a, node, spec, True) for a in inputs}
        first = inputs[0]
        qspec_map = {first: self._edge_spec(first, node, spec, True)}
        for a in inputs[1:]:
            if a not in qspec_map:
                _check_shape(spec, a, node, "input activation")
                qspec_map[a] = SharedQuantizationSpec((first, node))
        return qspec_map

    def _annotate_add(self, node: Node, specs: ModuleQConfig) -> dict:
        return self._annotate_shared(node, specs, list(node.args[:2]))

    def _annotate_cat(self, node: Node, specs: ModuleQConfig) -> dict:
        return self._annotate_shared(node, specs, list(node.args[0]))


_ANNOTATORS: dict[Any, Callable[[StatQATQuantizer, Node, ModuleQConfig], dict]] = {
    **dict.fromkeys(_WEIGHTED, StatQATQuantizer._annotate_weighted),
    **dict.fromkeys(_MATMUL, StatQATQuantizer._annotate_matmul),
    **dict.fromkeys(_ADD, StatQATQuantizer._annotate_add),
    **dict.fromkeys(_CAT, StatQATQuantizer._annotate_cat),
}


def exact_zero_batch_norm_weights(model: GraphModule) -> list[str]:
    """In place: torchao's conv-bn QAT fusion computes ``conv(x, fq(w * s)) / s`` with
    ``s = g / std``, 0 / 0 = NaN from the first step for a batch-norm weight ``g`` of 0
    (timm's ``zero_init_last``, torchvision's ``zero_init_residual``). Where ``g`` holds a 0
    at prepare, ``s`` reads ``where(g == 0, 1, g) / std`` instead; returns those weights' names.

    The batch norm after it still applies the true ``g``, so a zero channel outputs exactly
    ``beta``, in training and in eval, as the float model does, and ``g``'s gradient reads
    batch statistics of ``conv(x, fq(w / std)) * std``, the un-scaled conv output the fusion
    approximates everywhere else (a second, float conv as torch.ao's exact fold runs is not
    needed). Deployed, such a channel's codes meet a ``g`` of 0: its output is ``beta`` bit
    for bit. torchao's ``convert_pt2e`` does not fold these (its pattern no longer matches);
    ``sq.convert`` takes them."""
    changed = []
    for node in list(model.graph.nodes):
        if node.target != aten.div.Tensor or len(node.args) < 2:
            continue
        gamma, std = node.args[:2]
        if not (isinstance(gamma, Node) and gamma.op == "get_attr" and isinstance(std, Node) and std.target == aten.sqrt.default):
            continue
        try:
            weight = model.get_parameter(gamma.target)
        except AttributeError:  # a buffer: not a trained batch-norm weight
            continue
        if not bool((weight == 0).any()):
            continue
        with model.graph.inserting_before(node):
            is_zero = model.graph.call_function(aten.eq.Scalar, (gamma, 0))
            nonzero = model.graph.call_function(aten.where.ScalarSelf, (is_zero, 1.0, gamma))
        node.replace_input_with(gamma, nonzero)
        changed.append(gamma.target)
    if changed:
        model.recompile()
    return changed


def _check_shape(spec: QuantSpec, arg: Node, node: Node, what: str) -> None:
    """Raise at annotate time if ``spec`` cannot quantize ``arg`` (shape from export)."""
    val = arg.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
        return  # dynamic dims: checked at run time
    try:
        block_layout(tuple(val.shape), spec.granularity, spec.axis, get_format(spec.fmt), name=what)
    except ValueError as err:
        raise ValueError(
            f"StatQATQuantizer: layer '{_layer_name(node)}' (node '{node.name}', {what} "
            f"'{arg.name}'): {err}. Change the spec for this layer with set_module_name / "
            "set_module_type, or keep it float with None."
        ) from err


def set_qat_mode(model: GraphModule, training: bool) -> GraphModule:
    """Switch a prepared exported model between training and frozen evaluation.

    torchao's ``move_exported_model_to_train`` / ``_eval`` switch dropout and batch norm;
    this also sets the StatQAT fake-quantize modules' ``training`` flag, so that their
    scales update only in training (exported models refuse ``model.eval()``).

    Example:
        >>> import torch
        >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        >>> m = torch.export.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),)).module()
        >>> prepared = set_qat_mode(prepare_qat_pt2e(m, StatQATQuantizer()), training=False)
        >>> {mod.training for mod in prepared.modules() if isinstance(mod, StatQATPT2EFakeQuantize)}
        {False}
    """
    (_to_train if training else _to_eval)(model)
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            module.train(training)
    return model


__all__ = [
    "StatQATPT2EFakeQuantize",
    "StatQATPT2EObserver",
    "StatQATQuantizer",
    "quantization_spec",
    "set_qat_mode",
]
