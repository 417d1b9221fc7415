"""Qconfigs: validation, resolution of overrides and skips, the torch.ao mapping."""

import pytest
import torch
from torch import nn

import statqat_ao as sq
from statqat_ao.frontends.torch_ao import StatQATFakeQuantize


def test_default_recipe_is_int4_channel_auto_output_aware_weights_int8_tensor_iterative_activations():
    w, a = sq.statqat_qconfig.weight, sq.statqat_qconfig.activation
    assert (w.fmt, w.granularity, w.method, w.error) == ("int4", "channel", "auto", "auto")
    assert (a.fmt, a.granularity, a.method) == ("int8", "tensor", "iterative")


def test_unknown_format_fails_when_the_qconfig_is_built():
    with pytest.raises(ValueError, match="unknown format 'int5'"):
        sq.get_statqat_qconfig(weight="int5")
    with pytest.raises(ValueError, match="unknown format"):
        sq.statqat_qconfig.override("fc", weight="fp3")


def test_block_formats_take_their_block_size_and_are_refused_for_activations():
    assert sq.get_statqat_qconfig("mxfp4").weight.granularity == 32
    with pytest.raises(ValueError, match="activations are quantized per tensor"):
        sq.get_statqat_qconfig("int4", activation="nvfp4")


def test_resolution_order_skip_then_names_then_types_then_global():
    qc = (
        sq.get_statqat_qconfig("int4", "int8", skip=["stem"])
        .override_type(nn.Conv2d, weight="int8")
        .override("head.*", weight="fp4_e2m1", activation=None)
    )
    assert qc.for_module("stem", nn.Conv2d(1, 1, 1)) is None
    head = qc.for_module("head.fc", nn.Linear(2, 2))
    assert head.weight.fmt == "fp4_e2m1" and head.weight.granularity == "channel" and head.activation is None
    assert qc.for_module("body.conv", nn.Conv2d) .weight.fmt == "int8"
    assert qc.for_module("body.fc", nn.Linear(2, 2)).weight.fmt == "int4"
    assert sq.statqat_qconfig.for_module("stem", None) is not None  # overrides return copies


def test_the_qconfig_is_a_torch_ao_mapping_with_statqat_fake_quants():
    qc = sq.get_statqat_qconfig("int4", "int8", skip=["fc2"])
    fq = qc.global_qconfig.weight()
    assert isinstance(fq, StatQATFakeQuantize)
    assert (fq.fmt.name, fq.dtype, fq.quant_min, fq.quant_max) == ("int4", torch.qint8, -8, 7)
    act = qc.global_qconfig.activation()
    assert (act.dtype, act.quant_min, act.quant_max) == (torch.quint8, 0, 255)
    assert list(qc.module_name_regex_qconfigs.values()) == [None]
