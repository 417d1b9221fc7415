"""`statqat export`: loads a saved converted model (or a module:function), lowers it, checks it."""

import pytest
import torch

import statqat_ao as sq
from statqat_ao.tools import cli
from statqat_ao.tools.saved_model import load_model, save_converted


def _saved(tmp_path, qconfig, trained=True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    x = torch.randn(8, 64)
    prepared = sq.prepare_qat_fx(model, qconfig, (x,))
    target = sq.convert(prepared) if trained else prepared
    path = tmp_path / "model.pt"
    save_converted(target, (x,), path)
    return path, target, x


def test_export_to_torchao_writes_a_model_that_computes_the_converted_output(tmp_path, capsys):
    path, q, x = _saved(tmp_path, sq.get_statqat_qconfig("int4", "int8", weight_granularity=32))
    out = tmp_path / "lowered.pt"
    assert cli.main(["export", str(path), "--to", "torchao", "--out", str(out)]) == 0
    lowered = torch.load(out, weights_only=False)
    assert type(lowered.get_parameter("0.weight")).__name__ == "Int4OpaqueTensor"
    assert torch.allclose(lowered(x), q(x), rtol=0, atol=1e-5 * float(q(x).abs().max()))
    assert "Linear weights 24.0 KiB -> " in capsys.readouterr().out


def test_a_prepared_model_is_converted_first(tmp_path, capsys):
    path, prepared, x = _saved(tmp_path, sq.statqat_qconfig, trained=False)
    assert cli.main(["export", str(path), "--to", "torchao", "--out", str(tmp_path / "l.pt")]) == 0
    assert "converting it first" in capsys.readouterr().out
    lowered = torch.load(tmp_path / "l.pt", weights_only=False)
    assert torch.allclose(lowered(x), prepared.eval()(x), rtol=0, atol=1e-5 * float(prepared(x).abs().max()))


def test_an_unsupported_format_exits_2_with_the_reason_and_writes_nothing(tmp_path, capsys):
    path, _, _ = _saved(tmp_path, sq.get_statqat_qconfig("nf4", None, weight_granularity=32))
    out = tmp_path / "never.pt"
    assert cli.main(["export", str(path), "--to", "torchao", "--out", str(out)]) == 2
    assert "cannot lower 0.weight_quant (nf4, group 32)" in capsys.readouterr().err
    assert not out.exists()


def test_load_model_rejects_foreign_files_and_bad_specs(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a model saved by"):
        load_model(str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="neither a file nor"):
        load_model("no_such_file.pt")
    with pytest.raises(ValueError, match="must return \\(model, example_inputs\\)"):
        load_model("statqat_ao.models:load_digits_split")


def test_export_traced_models_cannot_be_saved_and_say_what_to_do(tmp_path):
    from statqat_ao.models import TransformerBlock

    x = torch.randn(2, 5, 32)
    q = sq.convert(sq.prepare_qat_fx(TransformerBlock(32, 2), sq.statqat_qconfig, (x,), trace_method="export"))
    with pytest.raises(ValueError, match="package.module:function"):
        save_converted(q, (x,), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_export_to_onnx_and_executorch_writes_files_that_run_like_the_converted_model(tmp_path, capsys):
    from statqat_ao.backends import executorch as et
    from statqat_ao.backends import onnx as onnx_backend

    path, q, x = _saved(tmp_path, sq.get_statqat_qconfig("int8", "int8"))
    assert cli.main(["export", str(path), "--to", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert cli.main(["export", str(path), "--to", "executorch", "--out", str(tmp_path / "m.pte")]) == 0
    out = capsys.readouterr().out
    assert "onnx: wrote" in out and "executorch: wrote" in out
    ref = q(x)
    assert onnx_backend.verify(tmp_path / "m.onnx", q, (x,)) < 1e-3
    assert (et.run(tmp_path / "m.pte", (x,))[0] - ref).abs().max() <= et.STATIC_TOLERANCE * ref.abs().max()


def test_executorch_int4_weight_only_needs_dynamic_activations(tmp_path, capsys):
    path, _, _ = _saved(tmp_path, sq.get_statqat_qconfig("int4", None, weight_granularity=32))
    out = tmp_path / "w4.pte"
    assert cli.main(["export", str(path), "--to", "executorch", "--out", str(out)]) == 2
    assert "dynamic_int8" in capsys.readouterr().err and not out.exists()
    args = ["export", str(path), "--to", "executorch", "--activations", "dynamic_int8", "--out", str(out)]
    assert cli.main(args) == 0 and out.exists()
