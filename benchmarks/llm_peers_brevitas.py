"""Brevitas weight-only QAT for a Hugging Face causal LM, as a benchmark peer.

``brevitas_quantize_(model, fmt, group_size)`` swaps, in place, every ``nn.Linear`` of a
model (``transformers.LlamaForCausalLM`` and the like) whose qualified name is not in
``skip`` for a Brevitas ``QuantLinear`` that fake-quantizes its weight on every forward and
leaves activations, bias and output in float. The Linear's own ``weight`` / ``bias``
Parameter objects move into the new layer (no copy; ties and optimizer references
survive), so the result trains and evaluates like any torch model: ``model(input_ids=...,
labels=...)``, ``loss.backward()``, an optimizer step, ``generate()``.

Formats (Brevitas 0.13.4, CPU):

* ``"fp4_e2m1"`` with ``group_size=32`` (any divisor of the input features; ``None`` is
  per output channel): OCP FP4 E2M1 codes {0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6}
  times one float32 scale per group along the input dimension;
* ``"int4"`` with ``group_size=None``: symmetric INT4 in [-8, 7] (Brevitas' LLM recipe,
  ``narrow_range=False``), one float32 scale per output channel (an int ``group_size``
  gives groups along the input dimension instead);
* ``"mxfp4"`` (group 32): E2M1 codes, power-of-two (E8M0) scale per 32, the OCP MX rule
  ``2**(floor(log2(amax)) - 2)``;
* ``"nvfp4"`` (group 16): E2M1 codes, scale per 16 fake-quantized to FP8 E4M3 against one
  per-tensor float32 scale (the E4M3 scales' abs-max / 448, recomputed every forward).

Quantizers. Brevitas ships the pieces, not a ready FP4 weight quantizer; each one here is
composed from its classes the way its LLM entrypoint (``brevitas_examples.llm``) composes
``--weight-quant-format float_ocp_e2m1``, then prefixed with ``MSESymmetricScale`` as
Brevitas' own ``*MSE`` quantizers are (``Int8WeightPerChannelFloatMSE`` =
``MSESymmetricScale`` + ``Int8WeightPerChannelFloat``, likewise ``MXFloat8e4m3WeightMSE``):

* fp4_e2m1: ``Fp8e4m3OCPWeightPerChannelFloat`` re-targeted to E2M1 (``bit_width=4,
  exponent_bit_width=2, mantissa_bit_width=1``; OCP max 6, no inf / NaN), group-wise
  through ``GroupwiseWeightFloatQuantProxyFromInjector`` + ``ScalingPerOutputType.GROUP``
  (as ``brevitas_examples``' ``Fp8e4m3OCPWeightSymmetricGroupQuant``);
* int4: ``Int8WeightPerChannelFloat`` at ``bit_width=4`` (that is,
  ``Int8WeightPerChannelFloatMSE`` at 4 bits; group-wise through
  ``GroupwiseWeightQuantProxyFromInjector``, as ``IntWeightSymmetricGroupQuantMSE``);
* mxfp4: ``MXFloat8e4m3Weight`` re-targeted to E2M1 (that is, ``MXFloat8e4m3WeightMSE``
  with E2M1 elements);
* nvfp4: the fp4_e2m1 quantizer at group 16 with ``restrict_scale_threshold_impl =
  QuantRestrictValue`` driven by a nested ``Fp8e4m3OCPWeightPerTensorFloat``: Brevitas'
  nested "quantized scale" mechanism (the one its GGUF Q4_K quantizers use), applied to
  the scale itself (amax / 6), so the E4M3 step is taken on the scale as NVFP4 does.

Scale. By default (``scale_init="mse"``, ``learned_scale=True``) each scale is a learned
``nn.Parameter`` (``ParameterFromStatsFromParameterScaling``,
``weight_quant.tensor_quant.scaling_impl.value``), initialised on the layer's first forward
by Brevitas' MSE grid search (``MSESymmetricScale``, 20 shrink steps of the abs-max) and
trained by STE afterwards: the MSE + ``parameter_from_stats`` combination of
``brevitas_ptq_llm --weight-param-method mse``. ``scale_init="absmax"`` starts from the
abs-max instead; ``learned_scale=False`` recomputes the scale from the current weight on
every forward (``scaling_impl_type="stats"``, nothing learned). The learned scale tensors
are new parameters: build the optimizer after quantizing.

The module imports without Brevitas; ``brevitas_available()`` says why it cannot run.
Run it as a script for a self-check on a tiny random Llama.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import nn

BREVITAS_VERSION = "0.13.4"
FORMATS: tuple[str, ...] = ("fp4_e2m1", "int4", "mxfp4", "nvfp4")
FIXED_GROUP: dict[str, int] = {"mxfp4": 32, "nvfp4": 16}
FP4_E2M1_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def brevitas_available() -> str | None:
    """None when Brevitas imports, else the reason it does not."""
    try:
        import brevitas
        import brevitas.nn  # noqa: F401
        import brevitas.quant.mx_quant_ocp  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return (
            f"brevitas is not importable ({type(error).__name__}: {error}); "
            f"install it with: pip install -c constraints.txt 'brevitas=={BREVITAS_VERSION}'"
        )
    version = getattr(brevitas, "__version__", "unknown")
    if version != BREVITAS_VERSION:
        return (
            f"brevitas {version} is installed; these quantizers are written for {BREVITAS_VERSION}"
        )
    return None


@functools.cache
def _base_injectors() -> dict[tuple[str, bool, bool], Any]:
    """Brevitas weight-quant injectors by (format, group-wise?, MSE-initialised?)."""
    from brevitas.core.restrict_val import QuantRestrictValue
    from brevitas.inject import this, value
    from brevitas.inject.enum import ScalingPerOutputType
    from brevitas.proxy.groupwise_float_parameter_quant import (
        GroupwiseWeightFloatQuantProxyFromInjector,
    )
    from brevitas.proxy.groupwise_int_parameter_quant import GroupwiseWeightQuantProxyFromInjector
    from brevitas.quant.base import MSESymmetricScale
    from brevitas.quant.float_quant_ocp import (
        Fp8e4m3OCPWeightPerChannelFloat,
        Fp8e4m3OCPWeightPerTensorFloat,
    )
    from brevitas.quant.mx_quant_ocp import MXFloat8e4m3Weight
    from brevitas.quant.scaled_int import Int8WeightPerChannelFloat

    class Fp4e2m1WeightPerChannelFloat(Fp8e4m3OCPWeightPerChannelFloat):
        """OCP FP4 E2M1 weights, float32 scale (abs-max / 6) per output channel."""

        bit_width = 4
        exponent_bit_width = 2
        mantissa_bit_width = 1

    class Fp4e2m1WeightGroupFloat(Fp4e2m1WeightPerChannelFloat):
        """OCP FP4 E2M1 weights, float32 scale per group along the input dimension."""

        proxy_class = GroupwiseWeightFloatQuantProxyFromInjector
        scaling_per_output_type = ScalingPerOutputType.GROUP
        group_size = 32

    class E4m3ScaleQuant(Fp8e4m3OCPWeightPerTensorFloat):
        """Fake-quantizes the parent's group scales to FP8 E4M3 with one abs-max/448 scale."""

        module = (this << 1).module
        upstream_shape = (this << 1).scaling_shape

        @value
        def tracked_parameter_list(upstream_shape):
            return [torch.empty(upstream_shape)]

    class NVFp4Weight(Fp4e2m1WeightGroupFloat):
        """NVFP4: E2M1 weights, E4M3 scale per 16 (of amax / 6), float32 scale per tensor."""

        group_size = 16
        scale_quant = E4m3ScaleQuant
        restrict_scale_threshold_impl = QuantRestrictValue

        @value
        def restrict_value_float_to_int_impl():
            return this.scale_quant.tensor_quant

        @value
        def scale_dequantized_shape(scaling_shape):
            return scaling_shape

    class MXFp4Weight(MXFloat8e4m3Weight):
        """OCP MXFP4: E2M1 weights, power-of-two (E8M0) scale per 32."""

        bit_width = 4
        exponent_bit_width = 2
        mantissa_bit_width = 1

    class Int4WeightPerChannelFloat(Int8WeightPerChannelFloat):
        """Symmetric INT4 in [-8, 7], float32 scale (abs-max / 7) per output channel."""

        bit_width = 4
        narrow_range = False

    class Int4WeightGroupFloat(Int4WeightPerChannelFloat):
        """Symmetric INT4 in [-8, 7], float32 scale per group along the input dimension."""

        proxy_class = GroupwiseWeightQuantProxyFromInjector
        scaling_per_output_type = ScalingPerOutputType.GROUP
        group_size = 32

    bases = {
        ("fp4_e2m1", False): Fp4e2m1WeightPerChannelFloat,
        ("fp4_e2m1", True): Fp4e2m1WeightGroupFloat,
        ("int4", False): Int4WeightPerChannelFloat,
        ("int4", True): Int4WeightGroupFloat,
        ("mxfp4", True): MXFp4Weight,
        ("nvfp4", True): NVFp4Weight,
    }
    out: dict[tuple[str, bool, bool], Any] = {}
    for (fmt, grouped), base in bases.items():
        out[(fmt, grouped, False)] = base
        # MSESymmetricScale first, as in Brevitas' own *MSE quantizers (e.g. MXFloat8e4m3WeightMSE)
        out[(fmt, grouped, True)] = type(base.__name__ + "MSE", (MSESymmetricScale, base), {})
    return out


def weight_quantizer(
    fmt: str, group_size: int | None, *, scale_init: str = "mse", learned_scale: bool = True
) -> Any:
    """The Brevitas weight-quant injector for ``fmt`` / ``group_size`` (see the module doc)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    if fmt in FIXED_GROUP:
        if group_size not in (None, FIXED_GROUP[fmt]):
            raise ValueError(f"{fmt} has a fixed group of {FIXED_GROUP[fmt]}, not {group_size}")
        group_size = FIXED_GROUP[fmt]
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None, not {group_size!r}")
    if scale_init not in ("mse", "absmax"):
        raise ValueError(f"scale_init must be 'mse' or 'absmax', not {scale_init!r}")
    quant = _base_injectors()[(fmt, group_size is not None, scale_init == "mse")]
    if group_size is not None:
        quant = quant.let(group_size=group_size)
    return quant.let(scaling_impl_type="parameter_from_stats" if learned_scale else "stats")


def _is_plain_linear(module: nn.Module) -> bool:
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    return isinstance(module, nn.Linear) and not isinstance(module, QuantWeightBiasInputOutputLayer)


def brevitas_quantize_(
    model: nn.Module,
    fmt: str,
    group_size: int | None,
    skip: tuple[str, ...] = ("lm_head",),
    *,
    scale_init: str = "mse",
    learned_scale: bool = True,
) -> nn.Module:
    """Swap, in place, each ``nn.Linear`` not named in ``skip`` for a weight-only Brevitas
    ``QuantLinear`` (activations float) and return ``model``.

    ``fmt``: ``"fp4_e2m1"``, ``"int4"``, ``"mxfp4"`` or ``"nvfp4"``; ``group_size``: inputs
    per scale (``None``: one scale per output channel; fixed at 32 / 16 for mxfp4 / nvfp4).
    ``skip`` holds qualified module names (``model.named_modules()``). The layer keeps the
    Linear's weight and bias Parameters (same objects, same values). Scales are learned
    Parameters initialised by MSE on the first forward unless told otherwise (module doc).
    """
    reason = brevitas_available()
    if reason is not None:
        raise RuntimeError(reason)
    import brevitas.nn as qnn

    quant = weight_quantizer(fmt, group_size, scale_init=scale_init, learned_scale=learned_scale)
    group = FIXED_GROUP.get(fmt, group_size)
    targets = [
        (name, m) for name, m in model.named_modules() if name not in skip and _is_plain_linear(m)
    ]
    for name, linear in targets:
        if group is not None and linear.in_features % group:
            raise ValueError(
                f"{name}: in_features {linear.in_features} is not a multiple of group {group}"
            )
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = qnn.QuantLinear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_quant=quant,
            input_quant=None,
            output_quant=None,
            bias_quant=None,
            return_quant_tensor=False,
            device="meta",
            dtype=linear.weight.dtype,
        )
        # Brevitas re-initialises the weight quantizer on the new Parameter (its
        # register_parameter hook), so the scale is built on the weight's device and dtype.
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        layer.train(linear.training)
        setattr(parent, attr, layer)
    return model


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Brevitas QuantLinear layers of ``model``, by qualified name."""
    import brevitas.nn as qnn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, qnn.QuantLinear)]


def _on_grid(codes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Distance of each ``|code|`` to the nearest grid point."""
    return (codes.abs().unsqueeze(-1) - grid).abs().amin(dim=-1)


def _e4m3_grid() -> torch.Tensor:
    """Every finite non-negative FP8 E4M3 (OCP, max 448) value."""
    sub = [m / 8 * 2.0**-6 for m in range(8)]
    normal = [(1 + m / 8) * 2.0**e for e in range(-6, 9) for m in range(8)]
    return torch.tensor(sorted(v for v in sub + normal if v <= 448.0))


def check_weight_numerics(layer: nn.Module, fmt: str) -> dict[str, Any]:
    """Check the fake-quantized weight Brevitas computes for ``layer`` against ``fmt``'s grid.

    FP4 formats: per group, value / Brevitas' scale must be an E2M1 code, and (scale-free)
    some scale ``amax / t`` (t in the E2M1 grid) must put every value of the group on the
    grid, with at most 15 distinct values; mxfp4 scales must be powers of two, nvfp4 scales
    E4M3 values times one per-tensor factor. int4: value / per-row scale is an integer
    in [-8, 7].
    """
    with torch.no_grad():
        qw = layer.quant_weight()
    report: dict[str, Any] = {}
    if fmt == "int4":
        scale = qw.scale.reshape(qw.value.shape[0], -1)
        codes = qw.value / scale
        report["scale_shape"] = tuple(qw.scale.shape)
        report["max_dist_to_integer"] = float((codes - codes.round()).abs().max())
        report["code_range"] = (int(codes.round().min()), int(codes.round().max()))
        report["ok"] = (
            report["max_dist_to_integer"] < 1e-4
            and -8 <= report["code_range"][0]
            and report["code_range"][1] <= 7
        )
        return report
    grid = torch.tensor(FP4_E2M1_GRID)
    if hasattr(qw, "value_"):  # group-wise: (out, groups, group) values, (out, groups, 1) scales
        value, scale = qw.value_, qw.scale_
    else:  # per output channel: one group per row
        value, scale = qw.value.unsqueeze(1), qw.scale.reshape(-1, 1, 1)
    report["group_shape"] = tuple(value.shape)
    report["max_dist_code_to_e2m1"] = float(_on_grid(value / scale, grid).max())
    groups = value.reshape(-1, value.shape[-1])
    scale_free = 0
    for row in groups:
        amax = row.abs().max()
        if amax == 0:
            scale_free += 1
            continue
        scale_free += any(
            bool(_on_grid(row / (amax / t), grid).max() < 1e-4) for t in FP4_E2M1_GRID[1:]
        )
    report["groups_on_grid_scale_free"] = f"{scale_free}/{groups.shape[0]}"
    report["max_distinct_per_group"] = max(int(torch.unique(row).numel()) for row in groups)
    ok = report["max_dist_code_to_e2m1"] < 1e-4 and scale_free == groups.shape[0]
    ok = ok and report["max_distinct_per_group"] <= 15
    if fmt == "mxfp4":
        exp = torch.log2(scale)
        report["max_dist_log2_scale_to_integer"] = float((exp - exp.round()).abs().max())
        ok = ok and report["max_dist_log2_scale_to_integer"] < 1e-6
    if fmt == "nvfp4":
        per_tensor = scale.max() / 448.0
        report["per_tensor_scale"] = float(per_tensor)
        rel = _on_grid(scale / per_tensor, _e4m3_grid()) / (scale / per_tensor)
        report["max_rel_dist_scale_to_e4m3"] = float(rel.max())
        ok = ok and report["max_rel_dist_scale_to_e4m3"] < 1e-5
    report["ok"] = bool(ok)
    return report


def _self_check() -> None:  # pragma: no cover - manual check, run as a script
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    reason = brevitas_available()
    if reason is not None:
        print("brevitas unavailable:", reason)
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 256, (2, 16))
    for fmt, group in (("fp4_e2m1", 32), ("int4", None), ("mxfp4", 32), ("nvfp4", 16)):
        model = copy.deepcopy(base)
        before = model.model.layers[0].self_attn.q_proj.weight
        brevitas_quantize_(model, fmt, group)
        layers = quant_layers(model)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.weight is before and type(model.lm_head) is nn.Linear
        model.train()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        first = time.perf_counter() - t0
        model.zero_grad()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        step = time.perf_counter() - t0
        grads = all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for _, m in layers)
        scales = [p for n, p in model.named_parameters() if n.endswith("scaling_impl.value")]
        scale_grads = all(p.grad is not None for p in scales)
        model.eval()
        with torch.no_grad():
            out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
        numerics = check_weight_numerics(layer, fmt)
        print(
            f"{fmt:9s} layers={len(layers)} loss={loss.item():.3f} weight_grads={grads} "
            f"learned_scales={len(scales)} scale_grads={scale_grads} generate={tuple(out.shape)} "
            f"fwd+bwd first={first * 1e3:.0f}ms next={step * 1e3:.0f}ms numerics={numerics}"
        )


if __name__ == "__main__":  # pragma: no cover
    _self_check()
