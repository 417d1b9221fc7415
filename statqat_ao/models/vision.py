"""torchvision and timm classifiers as users build them, and digits as RGB images, offline.

torchvision 0.28.0 on PyPI is a CUDA build: next to the CPU torch its import fails while it
registers fake kernels for its C ops ("operator torchvision::nms does not exist"), and
transformers imports torchvision wherever it finds it. The classification models are plain
Python and never call those ops, so ``make install`` puts torchvision and timm in
``<venv>/vision-site`` (outside site-packages) and :func:`import_vision` imports them from
there behind a stub for that one registration module. The folder is on ``sys.path`` only
while importing, so other processes never find torchvision.

Example:
    >>> torchvision, timm = import_vision()
    >>> x, y = digits_images(size=32)[:2]
    >>> tuple(x.shape[1:]), int(y.max())
    ((3, 32, 32), 9)
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

from torch import nn

VISION_SITE = Path(sys.prefix) / "vision-site"
NOT_INSTALLED = f"torchvision / timm are not installed (make install puts them in {VISION_SITE})"


def import_vision() -> tuple[types.ModuleType | None, types.ModuleType | None]:
    """``(torchvision, timm)`` from the venv's vision folder, or ``(None, None)`` if missing."""
    if "torchvision" in sys.modules and "timm" in sys.modules:
        return sys.modules["torchvision"], sys.modules["timm"]
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    sys.path.append(str(VISION_SITE))
    try:
        return importlib.import_module("torchvision"), importlib.import_module("timm")
    except ImportError:
        return None, None
    finally:
        sys.path.remove(str(VISION_SITE))


def build_classifier(name: str, num_classes: int = 1000) -> nn.Module:
    """A random-init classifier: ``"torchvision:resnet18"``, ``"timm:efficientnet_b0"``, or
    ``"torchvision:vit"`` (torchvision's VisionTransformer, 64x64 images, 2 layers, hidden 64).

    Raises:
        ModuleNotFoundError: torchvision / timm are not installed (with the way to install them).
    """
    torchvision, timm = import_vision()
    if torchvision is None:
        raise ModuleNotFoundError(NOT_INSTALLED)
    library, arch = name.split(":")
    if arch == "vit":
        return torchvision.models.VisionTransformer(64, 16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                                                    num_classes=num_classes)  # fmt: skip
    if library == "torchvision":
        return getattr(torchvision.models, arch)(num_classes=num_classes)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def digits_images(size: int = 32, test_fraction: float = 0.25, seed: int = 0):
    """sklearn's real 8x8 digits as 3-channel ``size x size`` images (bilinear), normalised
    to zero mean and unit variance: ``(x_train, y_train, x_test, y_test)``."""
    from .reference import load_digits_split

    split = load_digits_split(test_fraction, seed)
    out = []
    for i, t in enumerate(split):
        if i % 2 == 0:
            t = nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
            t = ((t - 0.3) / 0.35).expand(-1, 3, -1, -1).contiguous()
        out.append(t)
    return tuple(out)


__all__ = ["NOT_INSTALLED", "build_classifier", "digits_images", "import_vision"]
