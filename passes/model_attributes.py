"""What a prepared model keeps of the model's own attributes and recipe methods.

A traced GraphModule is a new class: the model's plain attributes (timm's
``pretrained_cfg``, which ``timm.data.resolve_data_config`` reads for the input size and
normalisation; ``num_classes``) and its methods are gone. :func:`carry_model_attributes`
copies the public plain attributes, and records the answers of the methods training
recipes ask a model (:data:`RECIPE_METHODS`: timm's optimizer factory puts no weight
decay on ``no_weight_decay()``'s parameters, its layer decay groups parameters by
``group_matcher()``). The answers are parameter names and patterns, which the prepared
model keeps, so they hold for it; they are recorded once, at prepare, for the arguments
listed, and any other call raises.

Example:
    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.pos = torch.nn.Linear(4, 2), torch.nn.Parameter(torch.zeros(4))
    ...         self.num_classes = 2
    ...     def no_weight_decay(self):
    ...         return {"pos"}
    ...     def forward(self, x):
    ...         return self.fc(x + self.pos)
    >>> gm = torch.fx.symbolic_trace(Net())
    >>> carry_model_attributes(Net(), gm)
    >>> gm.num_classes, gm.no_weight_decay()
    (2, {'pos'})
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import fx, nn

# torch.fx's own list of attributes a GraphModule's deepcopy sets again (torch.ao's
# preserved_attributes use it): deepcopy rebuilds a GraphModule from its graph alone.
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

# method name -> the argument sets recorded (each a kwargs dict), as recipes call them
RECIPE_METHODS: dict[str, tuple[dict[str, Any], ...]] = {
    "no_weight_decay": ({},),
    "no_weight_decay_keywords": ({},),
    "group_matcher": ({"coarse": False}, {"coarse": True}),
}


class RecordedMethod:
    """A model method's answers, recorded at prepare for the argument sets of :data:`RECIPE_METHODS`."""

    def __init__(self, owner: str, name: str, signature: inspect.Signature, answers: list[tuple[dict, Any]]):
        self.owner, self.name, self.signature, self.answers = owner, name, signature, answers

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            called = _arguments(self.signature, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.owner}.{self.name}: {exc}") from exc
        for arguments, answer in self.answers:
            if arguments == called:
                return copy.deepcopy(answer)
        raise NotImplementedError(
            f"the prepared model answers {self.owner}.{self.name} for {[a for a, _ in self.answers]} (recorded at "
            f"prepare), not {called}: call it on the float model (parameter names are the same)"
        )

    def __repr__(self) -> str:
        return f"RecordedMethod({self.owner}.{self.name})"


def _plain(value: Any) -> bool:
    return not isinstance(value, (nn.Module, torch.Tensor)) and not callable(value)


def carry_model_attributes(model: nn.Module, prepared: nn.Module) -> None:
    """Copy ``model``'s public plain attributes and record its recipe methods onto ``prepared``.

    Nothing the prepared model already has is replaced (its modules, parameters, fx's own
    attributes); copies are deep, so the two models stay independent. A GraphModule keeps
    them through ``copy.deepcopy`` (timm's model EMA) and pickling.
    """
    carried: dict[str, Any] = {}
    for name, value in vars(model).items():
        if not name.startswith("_") and name != "training" and _plain(value) and not hasattr(prepared, name):
            carried[name] = copy.deepcopy(value)
    for name, argument_sets in RECIPE_METHODS.items():
        method = getattr(model, name, None)
        if not callable(method) or hasattr(prepared, name):
            continue
        signature = inspect.signature(getattr(type(model), name))
        answers = []
        for arguments in argument_sets:
            try:
                called = _arguments(signature, **arguments)
            except TypeError:
                continue  # the model's method takes other arguments: not recorded for these
            answers.append((called, method(**arguments)))
        if answers:
            carried[name] = RecordedMethod(type(model).__name__, name, signature, answers)
    for name, value in carried.items():
        setattr(prepared, name, value)
    if isinstance(prepared, fx.GraphModule):
        prepared.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(carried)


def _arguments(signature: inspect.Signature, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every argument of a call, defaults filled in, ``self`` left out (TypeError if it does not bind)."""
    bound = signature.bind(None, *args, **kwargs)  # None stands for self
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[1:])
