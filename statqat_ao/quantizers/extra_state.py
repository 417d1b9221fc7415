"""A module's extra state (estimator state, formats) as a tensor, so checkpoints stay tensors.

``nn.Module.get_extra_state`` may return any object, but safetensors (Hugging Face's
``save_pretrained``) stores tensors only. The quantizers therefore return their small
state as the UTF-8 bytes of its JSON in a ``uint8`` tensor, which ``torch.save``
(``weights_only=True`` included) and safetensors both keep; loading accepts that or a
plain dict (checkpoints written before).

Example:
    >>> packed = pack_state({"scale_shape": [4, 1], "updates": 3})
    >>> packed.dtype, unpack_state(packed)
    (torch.uint8, {'scale_shape': [4, 1], 'updates': 3})
"""

from __future__ import annotations

import json
from typing import Any

import torch


def pack_state(state: dict[str, Any]) -> torch.Tensor:
    """``state`` (JSON-serialisable) as a ``uint8`` tensor of its JSON bytes."""
    return torch.tensor(list(json.dumps(state, sort_keys=True).encode()), dtype=torch.uint8)


def unpack_state(state: torch.Tensor | dict[str, Any]) -> dict[str, Any]:
    """The dict :func:`pack_state` packed (a dict passes through)."""
    if isinstance(state, torch.Tensor):
        return json.loads(bytes(state.cpu().tolist()).decode())
    return dict(state)
