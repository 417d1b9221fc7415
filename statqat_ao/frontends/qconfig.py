"""StatQAT qconfigs: which format and estimator quantizes which weight and activation.

A :class:`QuantSpec` describes one quantizer (format, estimator, granularity). A
:class:`StatQATQConfig` holds the weight and activation specs of a model, with
per-module overrides by name pattern and by module type and a skip list. It is also a
torch.ao ``QConfigMapping``, so torch's own ``prepare_qat_fx`` takes it directly.

Example:
    >>> import statqat_ao as sq
    >>> qconfig = sq.get_statqat_qconfig(weight="fp4_e2m1", weight_granularity=32)
    >>> qconfig = qconfig.skip("conv1").override("head.*", weight="int8")
    >>> qconfig.for_module("head.fc", None).weight.fmt
    'int8'
    >>> qconfig.for_module("conv1", None) is None
    True
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, replace

from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.qconfig import default_reuse_input_qconfig

from statqat_ao.estimators import ESTIMATORS, error_weighted_methods, online_methods
from statqat_ao.numerics.blocks import Granularity
from statqat_ao.numerics.formats import get_format
from statqat_ao.quantizers.input_moments import ERRORS

LEARNED_METHODS = ("lsq",)  # a learned scale: its own module, no per-step estimate

_KEEP = object()  # "not given" for override arguments, where None means "do not quantize"


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer: format, estimator, granularity, symmetry, channel axis, error.

    ``error`` (weights): what the scale minimises: ``"weight"`` (the weight's squared
    error), ``"output"`` (weighted by the layer input's second moments
    ``E[x_j^2]``: the error that reaches the layer's output) or ``"auto"`` (output-aware
    wherever the front end passes the layer input: ``sq.prepare_qat_fx`` and
    ``sq.quantize_``; the weight's error in torch.ao's and PT2E's flows).

    Example:
        >>> QuantSpec("int4", granularity="channel").make()
        StatQATFakeQuantize(fmt=int4, method=analytic, granularity=channel, axis=0, symmetric=True)
    """

    fmt: str
    method: str = "analytic"
    granularity: Granularity = "tensor"
    symmetric: bool = True
    axis: int = 0
    error: str = "weight"

    def __post_init__(self):
        fmt = get_format(self.fmt)  # raises for an unknown format, naming the known ones
        object.__setattr__(self, "fmt", fmt.name)
        if fmt.is_block_format and self.granularity == "channel":  # MX / NV blocks fix the group
            object.__setattr__(self, "granularity", fmt.block_size)
        if self.granularity == "token":  # dynamic: any offline estimator, run on every input
            if self.method not in ESTIMATORS:
                raise ValueError(f"unknown method {self.method!r} for per-token quantization; use one of {', '.join(ESTIMATORS)}")
        elif self.method not in (*online_methods(), *LEARNED_METHODS):
            known = ", ".join((*online_methods(), *LEARNED_METHODS))
            hint = " (offline-only estimators cannot run per training step)" if self.method in ESTIMATORS else ""
            raise ValueError(f"unknown QAT method {self.method!r}{hint}; use one of {known}")
        if not self.symmetric and fmt.family != "int":
            raise ValueError(f"asymmetric quantization needs an INT format, got {fmt.name}")
        if self.error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {self.error!r}")
        if self.error == "output" and self.method not in error_weighted_methods():
            raise ValueError(
                f"error='output' needs a method that minimises an error ({', '.join(error_weighted_methods())}); "
                f"{self.method!r} does not (LSQ's gradient already sees the output)"
            )
        g = self.granularity
        if not (g in ("tensor", "channel", "token") or (isinstance(g, int) and not isinstance(g, bool) and g > 0)):
            raise ValueError(f"granularity must be 'tensor', 'channel', 'token' or a positive int, got {g!r}")

    def make(self, is_activation: bool = False):
        """A fresh fake-quant module for this spec.

        A :class:`~statqat_ao.frontends.torch_ao.StatQATFakeQuantize` (a FakeQuantizer that is also
        a torch.ao ``FakeQuantizeBase``, so ``model.apply(torch.ao.quantization.disable_observer)``
        works), or an LSQ module.
        """
        if self.granularity == "token":
            if not is_activation:
                raise ValueError("per-token quantization is for activations (a Linear's input); weights take 'channel' or a group size")
            from statqat_ao.quantizers.dynamic import DynamicQuantizer

            return DynamicQuantizer(self.fmt, self.method, self.symmetric)
        if self.method == "lsq":
            from statqat_ao.quantizers.lsq import LSQFakeQuantize

            if not self.symmetric:
                raise ValueError("LSQ here is symmetric; use symmetric=True or another method")
            return LSQFakeQuantize(self.fmt, self.granularity, self.axis, is_activation=is_activation)
        from .torch_ao import StatQATFakeQuantize

        error = "weight" if is_activation else self.error
        return StatQATFakeQuantize(
            self.fmt, self.method, self.granularity, self.axis, self.symmetric, is_activation, error=error
        )


@dataclass(frozen=True)
class ModuleQConfig:
    """The resolved specs of one module: ``None`` means float for that tensor."""

    weight: QuantSpec | None
    activation: QuantSpec | None


def _spec(value, base: QuantSpec | None, kind: str) -> QuantSpec | None:
    spec = _make_spec(value, base, kind)
    if kind == "activation" and spec is not None:
        check_activation_spec(spec)
    return spec


def check_activation_spec(spec: QuantSpec) -> None:
    """Activations are quantized per tensor (or per token, dynamically) with a per-tensor format (no MX/NV blocks)."""
    if spec.error != "weight":
        raise ValueError(f"error={spec.error!r} is for weight quantizers (it weights a weight's error by its layer's input)")
    if spec.granularity not in ("tensor", "token") or get_format(spec.fmt).is_block_format:
        raise ValueError(
            f"activations are quantized per tensor (or per token: activation_granularity='token'); got "
            f"{spec.fmt} with granularity {spec.granularity!r}. Use a per-tensor format such as int8, "
            "fp8_e4m3 or fp4_e2m1."
        )


def _make_spec(value, base: QuantSpec | None, kind: str) -> QuantSpec | None:
    if value is _KEEP:
        return base
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        if base is None:
            return QuantSpec(value, **_DEFAULTS[kind])
        return replace(base, fmt=value)
    if isinstance(value, dict):
        return QuantSpec(**{**_DEFAULTS[kind], **({} if base is None else base.__dict__), **value})
    raise TypeError(f"{kind} must be a format name, a QuantSpec, a dict of QuantSpec fields or None")


_DEFAULTS = {
    "weight": {"method": "auto", "granularity": "channel", "error": "auto"},
    "activation": {"method": "iterative", "granularity": "tensor"},
}


class StatQATQConfig(QConfigMapping):
    """Weight and activation specs for a model, with overrides and a skip list.

    Resolution order for a module: skip list, then name-pattern overrides (``fnmatch``
    globs on the qualified name; the last matching one wins), then type overrides, then
    the global specs. Use :func:`get_statqat_qconfig` to build one.

    As a torch.ao ``QConfigMapping`` it plugs into
    ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` with torch's default
    BackendConfig (see :func:`statqat_ao.frontends.torch_ao.carrier`).
    """

    def __init__(self, weight: QuantSpec | None, activation: QuantSpec | None):
        super().__init__()
        self.weight, self.activation = weight, activation
        self.name_overrides: list[tuple[str, ModuleQConfig]] = []
        self.type_overrides: list[tuple[type, ModuleQConfig]] = []
        self.skipped: list[str] = []
        self._sync_torch_ao()

    def override(self, pattern: str, weight=_KEEP, activation=_KEEP) -> StatQATQConfig:
        """A copy where modules whose name matches ``pattern`` use other specs.

        ``weight`` / ``activation``: a format name (other fields from the global spec), a
        dict of :class:`QuantSpec` fields, a QuantSpec, or None (keep that tensor float).
        """
        new = copy.deepcopy(self)
        new.name_overrides.append((pattern, new._resolve_overrides(weight, activation)))
        new._sync_torch_ao()
        return new

    def override_type(self, module_type: type, weight=_KEEP, activation=_KEEP) -> StatQATQConfig:
        """A copy where modules of ``module_type`` (e.g. ``nn.Conv2d``) use other specs."""
        new = copy.deepcopy(self)
        new.type_overrides.append((module_type, new._resolve_overrides(weight, activation)))
        new._sync_torch_ao()
        return new

    def skip(self, *patterns: str) -> StatQATQConfig:
        """A copy that keeps the modules matching ``patterns`` (fnmatch globs) in float."""
        new = copy.deepcopy(self)
        new.skipped.extend(patterns)
        new._sync_torch_ao()
        return new

    def _resolve_overrides(self, weight, activation) -> ModuleQConfig:
        return ModuleQConfig(_spec(weight, self.weight, "weight"), _spec(activation, self.activation, "activation"))

    def for_module(self, name: str, module: nn.Module | type | str | None) -> ModuleQConfig | None:
        """The specs for the module called ``name`` (None: keep it float).

        ``module``: the module, its type, or its qualified type name as torch.export
        records it (``"torch.nn.modules.linear.Linear"``: matches that exact type), or None.
        """
        if any(fnmatch.fnmatchcase(name, p) for p in self.skipped):
            return None
        for pattern, cfg in reversed(self.name_overrides):
            if fnmatch.fnmatchcase(name, pattern):
                return cfg
        if module is not None:
            for module_type, cfg in reversed(self.type_overrides):
                if _is_of_type(module, module_type):
                    return cfg
        return ModuleQConfig(self.weight, self.activation)

    def _sync_torch_ao(self) -> None:
        from .torch_ao import torch_ao_qconfig

        self.global_qconfig = torch_ao_qconfig(self.weight, self.activation)
        self.object_type_qconfigs.clear()
        # As torch's default mapping: Tensor.reshape's output shares its input's quantizer. With
        # the global qconfig, torch.ao would also quantize its shape argument when the shape is
        # computed (x.shape[:-1] + (-1,) in timm's maxvit), and fail at the first step.
        self.object_type_qconfigs["reshape"] = default_reuse_input_qconfig
        for module_type, cfg in self.type_overrides:
            self.object_type_qconfigs[module_type] = torch_ao_qconfig(cfg.weight, cfg.activation)
        self.module_name_regex_qconfigs.clear()
        for pattern, cfg in self.name_overrides:
            self.module_name_regex_qconfigs[fnmatch.translate(pattern)] = torch_ao_qconfig(
                cfg.weight, cfg.activation
            )
        for pattern in self.skipped:
            self.module_name_regex_qconfigs[fnmatch.translate(pattern)] = None
        # torch.ao gives exact names priority over regexes; we only use regexes.
        self.module_name_qconfigs.clear()

    def __repr__(self) -> str:
        return (
            f"StatQATQConfig(weight={self.weight}, activation={self.activation}, "
            f"overrides={len(self.name_overrides) + len(self.type_overrides)}, skip={self.skipped})"
        )


def _is_of_type(module: nn.Module | type | str, module_type: type) -> bool:
    if isinstance(module, str):
        return module == f"{module_type.__module__}.{module_type.__qualname__}"
    return issubclass(module if isinstance(module, type) else type(module), module_type)


def get_statqat_qconfig(
    weight: str | None = "int4",
    activation: str | None = "int8",
    weight_granularity: Granularity = "channel",
    activation_granularity: Granularity = "tensor",
    weight_method: str = "auto",
    activation_method: str = "iterative",
    weight_symmetric: bool = True,
    activation_symmetric: bool = True,
    overrides: dict[str, dict] | None = None,
    skip: list[str] | tuple[str, ...] = (),
    weight_error: str = "auto",
) -> StatQATQConfig:
    """Build a :class:`StatQATQConfig`.

    Args:
        weight, activation: format names (see ``statqat formats``); None keeps that
            tensor float (``activation=None``: weight-only QAT).
        weight_granularity: ``"channel"`` (per output channel) or an int group size.
        activation_granularity: ``"tensor"`` (a scale estimated once per training step, frozen
            in eval) or ``"token"`` (dynamic: every row of every input gets its own scale, in
            training and deployment alike, as 8da4w runtimes do; eager :func:`statqat_ao.quantize_` only).
        weight_method, activation_method: ``auto`` (weights' default: ``search`` for groups of
            up to 256 and MX / NV blocks, ``analytic`` above), ``analytic``, ``iterative``,
            ``search``, ``minmax`` or ``lsq`` (per-token activations: any estimator;
            ``minmax`` is what runtimes compute).
        overrides: ``{name_pattern: {"weight": ..., "activation": ...}}``.
        skip: name patterns of modules kept in float (e.g. the first conv, the last linear).
        weight_error: ``"auto"`` (default: output-aware wherever the front end passes the
            layer input, i.e. ``sq.prepare_qat_fx`` and ``sq.quantize_``), ``"output"`` or
            ``"weight"`` (see :class:`QuantSpec`). Output-aware scales need the inputs:
            run ``sq.calibrate`` before evaluating without training.

    Example:
        >>> import statqat_ao as sq
        >>> qc = sq.get_statqat_qconfig("nvfp4", activation=None, skip=["classifier"])
        >>> qc.weight.fmt, qc.activation
        ('nvfp4', None)
    """
    w = None if weight is None else QuantSpec(weight, weight_method, weight_granularity, weight_symmetric, 0, weight_error)
    a = (
        None
        if activation is None
        else QuantSpec(activation, activation_method, activation_granularity, activation_symmetric, 0)
    )
    if a is not None:
        check_activation_spec(a)
    qconfig = StatQATQConfig(w, a)
    for pattern, specs in (overrides or {}).items():
        unknown = set(specs) - {"weight", "activation"}
        if unknown:
            raise ValueError(f"override {pattern!r}: unknown keys {sorted(unknown)}; use 'weight' and 'activation'")
        qconfig = qconfig.override(pattern, **specs)
    return qconfig.skip(*skip) if skip else qconfig


statqat_qconfig: StatQATQConfig = get_statqat_qconfig()
"""The default recipe: INT4 per-channel weights (``auto``, output-aware), INT8 per-tensor iterative activations."""

__all__ = ["ModuleQConfig", "QConfig", "QuantSpec", "StatQATQConfig", "get_statqat_qconfig", "statqat_qconfig"]
