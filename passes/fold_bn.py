"""Fold BatchNorm into the preceding conv for QAT, as deployment will see it.

The conv weight is scaled by ``gamma / sqrt(running_var + eps)`` *before* its fake
quant, so training quantizes the weight that deployment stores. In training the conv
output is scaled back and batch norm runs on batch statistics (updating the running
ones); in eval the output is ``conv(x, fq(w_fold)) + bias_fold``, which is exactly the
folded deployed conv. State dict names do not change (``bn.weight``, ``bn.running_var``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from statqat_ao.passes.functionalize import functionalize_weighted_modules
    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> gm = torch.fx.symbolic_trace(m); functionalize_weighted_modules(gm)
    >>> fold_batchnorm(gm)
    ['0']
    >>> x = torch.randn(2, 1, 8, 8)
    >>> torch.allclose(gm(x), m(x), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .bias_quant import quantize_bias


def fold_scale(weight: torch.Tensor, running_var: torch.Tensor, gamma: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``weight * gamma / sqrt(running_var + eps)`` per output channel, with a zero ``gamma`` taken as 1.

    A channel whose ``gamma`` is 0 (timm's ``zero_init_last``, torchvision's
    ``zero_init_residual``) outputs ``beta`` whatever its weight, but training must still
    see its conv to normalise it and give ``gamma`` a gradient: its weight is folded with
    ``1 / sqrt(running_var + eps)``, and :class:`FoldedBatchNorm` masks it out in eval.
    The deployed weight (:func:`deployed_fold`) is exactly zero there.
    """
    return weight * _bn_factor(running_var, _live_gamma(gamma), eps).reshape(-1, *([1] * (weight.dim() - 1)))


fold_scale.statqat_weight_transform = True  # its output is a weight the pass quantizes (patterns.py)


def deployed_fold(weight: torch.Tensor, running_var: torch.Tensor, gamma: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The folded weight deployment stores: :func:`fold_scale` with the zero-``gamma`` channels zeroed."""
    folded = fold_scale(weight, running_var, gamma, eps)
    if gamma is None:
        return folded
    return folded * (gamma != 0).to(folded.dtype).reshape(-1, *([1] * (weight.dim() - 1)))


def _live_gamma(gamma: torch.Tensor | None) -> torch.Tensor | None:
    return None if gamma is None else torch.where(gamma == 0, torch.ones_like(gamma), gamma)


def _bn_factor(running_var, gamma, eps):
    factor = torch.rsqrt(running_var + eps)
    return factor if gamma is None else gamma * factor


class FoldedBatchNorm(nn.Module):
    """Batch norm after a conv whose weight was scaled by :func:`fold_scale`.

    Holds the original batch norm's parameters and buffers under the same names.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps, self.momentum = bn.eps, bn.momentum
        self.ndim = 3 if isinstance(bn, nn.BatchNorm1d) else 4  # of the conv output it follows
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        for name, child in bn.named_children():  # a norm-act module's children, called by the graph
            self.add_module(name, child)

    def factor(self) -> torch.Tensor:
        """What the conv weight was folded with (:func:`fold_scale`: a zero gamma taken as 1)."""
        return _bn_factor(self.running_var, _live_gamma(self.weight), self.eps)

    def folded_bias(self, conv_bias: torch.Tensor | None) -> torch.Tensor:
        """``beta + (b - running_mean) * gamma / sqrt(running_var + eps)``: the deployed conv bias."""
        b = -self.running_mean if conv_bias is None else conv_bias - self.running_mean
        folded = b * _bn_factor(self.running_var, self.weight, self.eps)
        return folded if self.bias is None else folded + self.bias

    def folded_bias_broadcast(self, conv_bias: torch.Tensor | None) -> torch.Tensor:
        """:meth:`folded_bias` shaped to add to the conv output (``[1, C, 1, ...]``)."""
        return self.folded_bias(conv_bias).reshape((1, -1) + (1,) * (self.ndim - 2))

    def deployed_bias(self, conv_bias: torch.Tensor | None, bias_scale: torch.Tensor | None) -> torch.Tensor:
        """:meth:`folded_bias_broadcast`, on the int32 grid ``bias_scale`` where one is given."""
        return quantize_bias(self.folded_bias_broadcast(conv_bias), bias_scale)

    def forward(self, y: torch.Tensor, conv_bias: torch.Tensor | None = None,
                bias_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``bias_scale``: the int32 bias grid ``s_x s_w`` of an integer layer (bias_quant.py),
        which the eval-mode folded bias is rounded to."""
        shape = (1, -1) + (1,) * (y.dim() - 2)
        if not self.training:
            if self.weight is not None:  # zero-gamma channels: their deployed weight is 0 (deployed_fold)
                y = y * (self.weight != 0).to(y.dtype).reshape(shape)
            return y + self.deployed_bias(conv_bias, bias_scale)
        y = y / self.factor().reshape(shape)
        if conv_bias is not None:
            y = y + conv_bias.reshape(shape)
        momentum = self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        # The conv weight is folded with the running variance, so one NaN batch there
        # would poison every later step: the running statistics take a non-finite
        # batch's update only if it is finite (branch-free, so compiled graphs keep it;
        # plain nn.BatchNorm would take the NaN). batch_norm updates copies in place.
        mean, var = self.running_mean.clone(), self.running_var.clone()
        out = F.batch_norm(y, mean, var, self.weight, self.bias, True, momentum, self.eps)
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        self.running_mean.copy_(torch.where(finite, mean, self.running_mean))
        self.running_var.copy_(torch.where(finite, var, self.running_var))
        return out


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """In place: fold every ``conv -> BatchNorm`` pair (conv with one user); return the convs' names.

    Expects functional convs on ``get_attr`` weights (:mod:`.functionalize`). The
    BatchNorm module is replaced by a :class:`FoldedBatchNorm` at the same path.
    """
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        conv = node.args[0]
        if not (
            isinstance(conv, fx.Node)
            and conv.op == "call_function"
            and conv.target in (F.conv1d, F.conv2d)
            and len(conv.users) == 1
            and isinstance(conv.args[1], fx.Node)
            and conv.args[1].op == "get_attr"
        ):
            continue
        bn = gm.get_submodule(node.target)
        if not bn.track_running_stats or bn.running_var is None:
            continue
        weight, bias = conv.args[1], conv.args[2]
        with gm.graph.inserting_before(conv):
            var = gm.graph.get_attr(f"{node.target}.running_var")
            gamma = gm.graph.get_attr(f"{node.target}.weight") if bn.affine else None
            scaled = gm.graph.call_function(fold_scale, (weight, var, gamma, bn.eps))
            scaled.meta["is_wrapped"] = True  # a leaf when fx re-traces the code (unpickling)
        conv.args = (conv.args[0], scaled, None, *conv.args[3:])
        parent, _, leaf = node.target.rpartition(".")
        folded_bn = FoldedBatchNorm(bn)
        folded_bn.train(bn.training)
        setattr(gm.get_submodule(parent) if parent else gm, leaf, folded_bn)
        node.args = (conv, bias) if bias is not None else (conv,)
        folded.append(conv.meta.get("statqat_module", (conv.name,))[0])
    gm.recompile()
    return folded
