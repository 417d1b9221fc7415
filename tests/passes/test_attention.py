"""nn.MultiheadAttention traced as linears and matmuls (passes/attention.py), against the module itself."""

import pytest
import torch
from statqat_ao.passes.attention import rewritable_call
from statqat_ao.passes.trace import symbolic_trace
from torch import nn
from torch.nn import functional as F

import statqat_ao as sq


class SelfAttention(nn.Module):
    def __init__(self, batch_first=True, need_weights=False, average=True, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, **kwargs)
        self.need_weights, self.average = need_weights, average

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, average_attn_weights=self.average)
        return out if weights is None else (out, weights)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("shape", [(3, 5, 16), (5, 16)], ids=["batched", "unbatched"])
def test_traced_attention_equals_the_module(batch_first, need_weights, average, shape):
    torch.manual_seed(0)
    model = SelfAttention(batch_first, need_weights, average).eval()
    x = torch.randn(shape)
    gm = symbolic_trace(model)
    assert sum(n.target is F.linear for n in gm.graph.nodes) == 2
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    with torch.no_grad():
        expected, got = model(x), gm(x)
    for e, g in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_calls_that_need_the_modules_branches_keep_it_whole():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x, y = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    assert rewritable_call(mha, (x, x, x), {})
    assert not rewritable_call(mha, (x, y, y), {})  # cross-attention
    assert not rewritable_call(mha, (x, x, x), {"attn_mask": torch.zeros(3, 3)})
    assert not rewritable_call(mha, (x, x, x), {"is_causal": True, "attn_mask": torch.zeros(3, 3)})
    assert not rewritable_call(nn.MultiheadAttention(16, 4, dropout=0.1), (x, x, x), {})  # would bake the mode
    assert not rewritable_call(nn.MultiheadAttention(16, 4, add_bias_kv=True), (x, x, x), {})
    assert not rewritable_call(nn.MultiheadAttention(16, 4, kdim=8, vdim=8), (x, x, x), {})


def test_projections_are_quantized_and_convert_is_exact():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16)
    qat = sq.prepare_qat_fx(SelfAttention().train(), sq.statqat_qconfig, (x,))
    paths = {n for n, m in qat.named_modules() if isinstance(m, sq.FakeQuantizer)}
    assert {"attn.in_proj_weight_fake_quant", "attn.out_proj.weight_fake_quant", "attn.input_fake_quant"} <= paths
    assert sum(p.startswith("matmul") for p in paths) == 4  # scores and context: both operands each
    qat(x).square().mean().backward()
    assert qat.attn.in_proj_weight.grad is not None and qat.attn.out_proj.weight.grad.abs().sum() > 0
    converted = sq.convert(qat)
    qat.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), qat(x))


def test_a_mask_keeps_the_module_whole_and_the_warning_names_it():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x, mask):
            return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]

    x = torch.randn(2, 3, 16)
    with pytest.warns(UserWarning, match=r"attn \(MultiheadAttention\)"):
        sq.prepare_qat_fx(Masked(), sq.statqat_qconfig, (x, torch.zeros(3, 3)))
