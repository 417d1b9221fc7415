"""Functions the trace keeps whole whose weight arguments are GEMM weights the pass may quantize.

A library can mark a function with ``torch.fx.wrap`` so fx records one call instead of
tracing its body (torchvision's Swin does so for ``shifted_window_attention``, whose
padding depends on the input's size). The pass cannot quantize the activations inside such
a call, but a weight passed in as an argument and used there as an ``F.linear`` weight
(``[out_features, in_features]``) can get a weight quantizer on the way in: the function
then computes with the fake-quantized weight in training and the dequantized codes after
``convert``, as a Linear module would.

The registry names the function by module and qualified name, so the library need not be
imported, and lists the parameters that are such weights. A weight read by a function
that is not listed stays float and is named in the pass's warning.

Example:
    >>> from statqat_ao.passes.opaque_functions import linear_weight_arguments
    >>> def shifted_window_attention(input, qkv_weight, proj_weight, *rest): ...
    >>> shifted_window_attention.__module__ = "torchvision.models.swin_transformer"
    >>> linear_weight_arguments(shifted_window_attention)
    ('qkv_weight', 'proj_weight')
"""

from __future__ import annotations

import inspect

from torch import fx

# (module, qualified name) -> names of the parameters used as F.linear weights inside.
LINEAR_WEIGHT_ARGUMENTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("torchvision.models.swin_transformer", "shifted_window_attention"): ("qkv_weight", "proj_weight"),
}

# Functions whose 2-D parameter arguments are tables, not GEMM weights (they stay float by design).
FLOAT_BY_DESIGN: set[tuple[str, str]] = {
    ("torchvision.models.swin_transformer", "_get_relative_position_bias"),  # a bias-table lookup
}


def _key(fn) -> tuple[str | None, str | None]:
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def is_float_by_design(fn) -> bool:
    """True for a registered function whose parameter arguments need no quantizer."""
    return _key(fn) in FLOAT_BY_DESIGN


def linear_weight_arguments(fn) -> tuple[str, ...]:
    """The parameter names of ``fn`` that are Linear weights (empty if ``fn`` is not registered)."""
    return LINEAR_WEIGHT_ARGUMENTS.get(_key(fn), ())


def linear_weight_nodes(node: fx.Node) -> list[tuple[int | str, fx.Node]]:
    """For a ``call_function`` node of a registered function: ``(position or keyword, weight node)`` pairs."""
    names = linear_weight_arguments(node.target) if node.op == "call_function" else ()
    if not names:
        return []
    params = list(inspect.signature(node.target).parameters)
    found = []
    for name in names:
        position = params.index(name)
        if position < len(node.args):
            found.append((position, node.args[position]))
        elif name in node.kwargs:
            found.append((name, node.kwargs[name]))
    return [(where, w) for where, w in found if isinstance(w, fx.Node)]
