"""timm's training utilities around a prepared model, as its train script uses them."""

import copy

import pytest
import torch
from test_zoo import SKIP_REASON, timm

import statqat_ao as sq
from statqat_ao.models.vision import build_classifier

pytestmark = pytest.mark.skipif(timm is None, reason=SKIP_REASON)


def test_model_ema_made_right_after_prepare_updates_and_converts_exactly():
    # timm's train.py builds ModelEmaV3 from the model before the first step; the EMA's
    # state must line up with the trained model's (foreach lerp over matching tensors).
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    qat = sq.prepare_qat_fx(build_classifier("timm:resnet18").train(), sq.statqat_qconfig, (x,))
    ema = ModelEmaV3(qat, decay=0.5)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(qat(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(qat)
    averaged = ema.module.eval()
    assert not torch.equal(averaged.fc.weight, qat.fc.weight)  # an average, not a copy
    assert torch.isfinite(averaged.get_submodule("fc.weight_fake_quant").scale).all()
    with torch.no_grad():
        reference = averaged(x)
        assert torch.equal(sq.convert(averaged)(x), reference)


def test_prepared_state_keeps_its_shapes_through_training():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    qat = sq.prepare_qat_fx(build_classifier("timm:resnet18").train(), sq.statqat_qconfig, (x,))
    fresh = copy.deepcopy(qat)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(qat(x), torch.arange(4))
    loss.backward()
    optimizer.step()
    shapes = {k: v.shape for k, v in qat.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    fresh.load_state_dict(qat.state_dict())  # a checkpoint loads into a freshly prepared model


def _optimizer_groups(model, **kwargs):
    """``{weight decay: parameter names}`` of timm's optimizer factory for ``model``."""
    from timm.optim import create_optimizer_v2

    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict = {}
    for group in create_optimizer_v2(model, "adamw", weight_decay=0.05, **kwargs).param_groups:
        key = (group["weight_decay"], group.get("lr_scale", 1.0))
        groups.setdefault(key, set()).update(names[id(p)] for p in group["params"])
    return groups


def test_timm_recipes_read_the_prepared_model_as_the_float_one():
    # timm's train script: data config from pretrained_cfg, no weight decay on position
    # embeddings and tokens (no_weight_decay), layer-wise lr decay (group_matcher).
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_384", pretrained=False, num_classes=10, img_size=64).train()
    qat = sq.prepare_qat_fx(model, sq.statqat_qconfig, (torch.randn(2, 3, 64, 64),))
    ema_copy = copy.deepcopy(qat)  # what timm's ModelEmaV3 holds
    for prepared in (qat, ema_copy):
        assert resolve_data_config({}, model=prepared) == resolve_data_config({}, model=model)
        assert _optimizer_groups(prepared) == _optimizer_groups(model)
        assert _optimizer_groups(prepared, layer_decay=0.75) == _optimizer_groups(model, layer_decay=0.75)
    assert resolve_data_config({}, model=qat)["input_size"] == (3, 384, 384)  # not timm's 224 default
