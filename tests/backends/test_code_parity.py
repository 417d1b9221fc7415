"""The per-layer code comparison (backends/code_parity.py) on hand-made codes."""

import torch
from statqat_ao.backends.code_parity import TIE_WINDOW, CodeRecorder, compare_codes
from torch import nn

import statqat_ao as sq


def test_one_step_at_a_tie_passes_and_anything_else_fails():
    reference = torch.tensor([0, 5, -3, 7])
    steps = torch.tensor([0.2, 5.4999, -3.0, 6.5001])  # the reference's values before rounding
    tie = compare_codes("q", reference, torch.tensor([0, 6, -3, 6]), steps)
    assert (tie.differing, tie.max_steps, tie.within_ties) == (2, 1, True)
    assert abs(tie.max_tie_distance - 1e-4) < 1e-6
    off_tie = compare_codes("q", reference, torch.tensor([1, 5, -3, 7]), steps)  # 0.2 is 0.3 from 0.5
    assert off_tie.max_steps == 1 and not off_tie.within_ties and off_tie.max_tie_distance > TIE_WINDOW
    two_steps = compare_codes("q", reference, torch.tensor([0, 7, -3, 7]), steps)
    assert two_steps.max_steps == 2 and not two_steps.within_ties
    assert compare_codes("q", reference, reference, steps).differing == 0


def test_substituted_codes_reach_the_next_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(16, 8)
    q = sq.convert(sq.prepare_qat_fx(model, sq.get_statqat_qconfig("int8", "int8"), (x,)))
    plain = CodeRecorder(q)
    with torch.no_grad():
        expected = plain.run(x)
    own = [values for values, _, _ in plain.records]
    with torch.no_grad():
        assert torch.equal(CodeRecorder(q, own).run(x), expected)  # its own codes: the same outputs
        step = (own[1] < 127).long()  # the second layer's input one step up (below the top code)
        moved = CodeRecorder(q, [own[0], own[1] + step]).run(x)
    scale = float(q.get_submodule("2").input_quant.scale)
    w = q.get_submodule("2").weight_quant.dequantize()
    torch.testing.assert_close(moved - expected, scale * step.float() @ w.T, rtol=1e-4, atol=1e-5)
