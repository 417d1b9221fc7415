"""``nn.MultiheadAttention`` as ops the pass can quantize.

torch.fx keeps ``nn.MultiheadAttention`` whole (it is an ``nn`` module, and its forward
branches on tensor properties fx cannot trace), so its input and output projections stay
float. :func:`traced_multihead_attention` is the same computation written with
``F.linear`` on the module's own parameters and explicit ``matmul`` / ``softmax``, which
the tracer calls instead of the module: the projections become linear nodes with
``get_attr`` weights (weight and input quantizers) and the attention products become
matmuls (operand quantizers), as in a transformer written with ``nn.Linear``.

Only calls whose result does not depend on run-time branches are rewritten: packed
Q/K/V weights, self-attention (``query is key is value``), no masks, no ``bias_k`` /
``bias_v`` / ``add_zero_attn`` and no attention dropout (which would bake the trace-time
training flag into the graph). Other calls keep the module whole; the pass names its
weights in the stay-float warning.

Example:
    >>> import torch
    >>> from statqat_ao.passes.trace import symbolic_trace
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ...     def forward(self, x):
    ...         return self.attn(x, x, x, need_weights=False)[0]
    >>> gm = symbolic_trace(Block())
    >>> sum(n.target is torch.nn.functional.linear for n in gm.graph.nodes)
    2
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch import nn

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def rewritable_call(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """True if this call of an ``nn.MultiheadAttention`` can be traced as :func:`traced_multihead_attention`."""
    if not isinstance(module, nn.MultiheadAttention):
        return False
    try:
        bound = _SIGNATURE.bind(module, *args, **kwargs).arguments
    except TypeError:
        return False
    return (
        module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and not module.add_zero_attn
        and module.dropout == 0.0
        and bound["query"] is bound["key"] is bound["value"]
        and bound.get("key_padding_mask") is None
        and bound.get("attn_mask") is None
        and not bound.get("is_causal", False)
    )


def traced_multihead_attention(module: nn.MultiheadAttention, query, key=None, value=None, key_padding_mask=None,
                               need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                               is_causal: bool = False):  # fmt: skip
    """``module(query, query, query, need_weights=...)`` for a call :func:`rewritable_call` accepts.

    Written with negative dimensions so batched and unbatched inputs take the same ops.
    Returns ``(attn_output, attn_weights or None)`` as the module does.
    """
    embed, heads = module.embed_dim, module.num_heads
    head_dim = embed // heads
    x = query if module.batch_first else query.movedim(0, -2)  # (..., L, E)
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)

    def split_heads(t):  # (..., L, E) -> (..., H, L, D)
        return t.unflatten(-1, (heads, head_dim)).transpose(-3, -2)

    q = split_heads(qkv[..., :embed])
    k = split_heads(qkv[..., embed : 2 * embed])
    v = split_heads(qkv[..., 2 * embed :])
    # The module scales q by 1/sqrt(head_dim) before the product, as here.
    scores = (q * head_dim**-0.5).matmul(k.transpose(-2, -1))
    weights = F.softmax(scores, dim=-1)
    out = weights.matmul(v).transpose(-3, -2).flatten(-2)  # (..., L, E)
    out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
    if not module.batch_first:
        out = out.movedim(-2, 0)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=-3) if average_attn_weights else weights
