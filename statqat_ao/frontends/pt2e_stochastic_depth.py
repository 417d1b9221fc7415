"""Stochastic depth / drop path in an exported graph: a mask drawn in training only.

``torch.export`` in training mode bakes torchvision's ``stochastic_depth`` and timm's
``drop_path`` into the graph as ``bernoulli_(empty, keep)`` then ``div_(mask, keep)``: the
exported model stays random in eval, and torchao's ``move_exported_model_to_eval`` (which
knows dropout and batch norm) leaves them. :func:`train_only_masks` replaces each such
``bernoulli_`` with a :class:`TrainOnlyBernoulli` module that draws the mask in training
and in eval returns the value that makes the mask 1: ``keep`` where the mask is then
divided by ``keep`` (``keep / keep`` is exactly 1 in IEEE arithmetic), else 1.

Example:
    >>> import torch
    >>> from torchao.quantization.pt2e import move_exported_model_to_eval
    >>> def drop_path(x):
    ...     return x * torch.empty(x.shape[0], 1).bernoulli_(0.8).div_(0.8)
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x + drop_path(x)
    >>> gm = torch.export.export(Net(), (torch.ones(4, 3),)).module()
    >>> train_only_masks(gm)
    1
    >>> _ = move_exported_model_to_eval(gm)
    >>> gm(torch.ones(4, 3)).unique().tolist()
    [2.0]
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .exported_mode import FollowsExportedMode

_BERNOULLI = (torch.ops.aten.bernoulli_.float, torch.ops.aten.bernoulli.p)
_DIVIDE = (torch.ops.aten.div_.Tensor, torch.ops.aten.div.Tensor, torch.ops.aten.div_.Scalar, torch.ops.aten.div.Scalar)


class TrainOnlyBernoulli(FollowsExportedMode, nn.Module):
    """``shape_like.bernoulli_(p)`` in training; a tensor of ``eval_value`` in eval.

    Example:
        >>> mask = TrainOnlyBernoulli(0.8, eval_value=0.8).eval()
        >>> mask(torch.empty(2, 1)).tolist()
        [[0.800000011920929], [0.800000011920929]]
    """

    def __init__(self, p: float, eval_value: float):
        super().__init__()
        self.p, self.eval_value = float(p), float(eval_value)

    def forward(self, shape_like: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.bernoulli(torch.full_like(shape_like, self.p))
        return torch.full_like(shape_like, self.eval_value)

    def extra_repr(self) -> str:
        return f"p={self.p}, eval_value={self.eval_value}"


def train_only_masks(gm: fx.GraphModule) -> int:
    """Replace ``gm``'s Bernoulli masks as the module docstring says, link them to its
    graph; return how many. Other ``bernoulli`` uses (a tensor of probabilities) are left."""
    count = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BERNOULLI]:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        if not isinstance(p, float | int):
            continue
        users = list(node.users)
        divided = len(users) == 1 and users[0].target in _DIVIDE and users[0].args[:2] == (node, p)
        name = f"train_only_bernoulli_{count}"
        module = TrainOnlyBernoulli(p, eval_value=p if divided and p > 0 else 1.0)
        module.link_to_graph(gm.graph)
        gm.add_module(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count
