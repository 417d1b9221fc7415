"""The LSQ module's gradient-scaling trick."""

import torch

from statqat_ao.quantizers.lsq import _scale_gradient


def test_lsq_scale_gradient_keeps_the_value_bit_for_bit_and_scales_the_gradient():
    t = (torch.rand(10_000) * 3).requires_grad_()
    for factor in (0.1, 1 / 3, 0.0123):
        out = _scale_gradient(t, factor)
        assert torch.equal(out.detach(), t.detach())
        (g,) = torch.autograd.grad(out.sum(), t)
        assert torch.allclose(g, torch.full_like(g, factor))
