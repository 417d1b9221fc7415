"""Train / eval for modules inside a torch.export graph: follow torchao's flag on the graph's owner.

torchao's ``move_exported_model_to_eval`` / ``_train`` switch an exported model by rewriting
its dropout and batch-norm nodes and setting the root's ``_exported_training``; they never
call ``.train()`` on submodules (an exported module refuses ``.eval()``). A module that
inherits :class:`FollowsExportedMode` and is linked to the graph (:meth:`link_to_graph`) is
in training only while both its own flag and the owner's are.

Example:
    >>> import torch
    >>> class Probe(FollowsExportedMode, torch.nn.Module):
    ...     pass
    >>> gm = torch.fx.symbolic_trace(torch.nn.Identity())
    >>> probe = Probe()
    >>> probe.link_to_graph(gm.graph)
    >>> gm._exported_training = False
    >>> probe.training
    False
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e.export_utils import (
    _EXPORTED_TRAINING_ATTR,  # what torchao's switches set
)


class FollowsExportedMode:
    """Mixin for ``nn.Module`` subclasses: ``training`` also reads the linked graph owner's flag."""

    @property
    def training(self) -> bool:  # type: ignore[override]
        own = self.__dict__.get("_own_training", True)
        graph = self.__dict__.get("_exported_graph")
        owner = None if graph is None else graph._owning_module  # the attribute: dynamo skips fx's properties
        if not own or owner is None:
            return own
        return bool(getattr(owner, _EXPORTED_TRAINING_ATTR, True))

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_own_training"] = mode

    def link_to_graph(self, graph: torch.fx.Graph) -> None:
        """Follow ``graph``'s owning module's exported train / eval flag (see :attr:`training`)."""
        self.__dict__["_exported_graph"] = graph
