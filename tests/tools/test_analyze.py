"""`statqat analyze`: per-tensor SNR of each estimator against the optimum, and the SNR curves."""

import argparse
import csv

import numpy as np
import pytest
import torch

import statqat_ao as sq
from statqat_ao.tools.analyze import (
    CSV_COLUMNS,
    METHODS,
    add_analyze_parser,
    analyze_tensor,
    analyze_weights,
    load_weights,
    subsample_rows,
)
from statqat_ao.tools.analyze_plots import monte_carlo_snr_db

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="statqat")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 2),  # weight 16x16x2x2: rows of 64
        torch.nn.Flatten(),
        torch.nn.Linear(128, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),  # shapes need not chain: nothing runs the model
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)  # Gaussian weights
    return model


@pytest.fixture
def saved(tmp_path):
    model = _tiny_model()
    torch.save(model, tmp_path / "module.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    return tmp_path, model


def _read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


@pytest.mark.parametrize("kind", ["module.pt", "state.pt"])
def test_analyze_writes_one_row_per_weight_tensor_and_a_png(saved, kind, capsys):
    tmp, model = saved
    out = tmp / "out"
    assert _main(["analyze", str(tmp / kind), "--format", "int4", "--out", str(out)]) == 0
    header, rows = _read_csv(out / "layer_snr.csv")
    assert tuple(header) == CSV_COLUMNS
    assert [r["tensor"] for r in rows] == ["0.weight", "2.weight", "4.weight"]
    assert [r["shape"] for r in rows] == ["16x16x2x2", "32x128", "10x64"]
    for r in rows:
        snr = {m: float(r[m]) for m in METHODS}
        assert all(snr["optimum"] >= snr[m] - 0.01 for m in METHODS), r
        assert snr["optimum"] - snr["iterative"] < 0.1, r  # Gaussian weights
        assert snr["minmax"] < snr["optimum"] - 0.3, r
    assert (out / "layer_snr.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "3 weight tensors, int4 per channel" in printed and "mean gap to optimum" in printed


@pytest.mark.parametrize("fmt, granularity", [("fp4_e2m1", 32), ("nf4", 32), ("mxfp4", None), ("nvfp4", None)])
def test_the_optimum_bounds_every_method_for_groups_and_block_formats(fmt, granularity):
    torch.manual_seed(1)
    weights = {"a": torch.randn(16, 128), "b": torch.randn(8, 64) * 0.02}
    g = granularity or sq.get_format(fmt).block_size
    rows, skipped = analyze_weights(weights, fmt, g, progress=False)
    assert skipped == [] and len(rows) == 2
    for r in rows:
        assert all(r["optimum"] >= r[m] - 0.01 for m in METHODS), r


def test_a_group_that_does_not_fit_a_tensor_skips_it_with_the_reason(saved, capsys):
    tmp, _ = saved
    out = tmp / "out"
    assert _main(["analyze", str(tmp / "state.pt"), "--format", "int4", "--granularity", "128", "--out", str(out), "--no-plot"]) == 0
    _, rows = _read_csv(out / "layer_snr.csv")
    assert [r["tensor"] for r in rows] == ["2.weight"]
    err = capsys.readouterr().err
    assert "skipped 0.weight" in err and "skipped 4.weight" in err and "does not divide the row length 64" in err


def test_max_rows_subsamples_rows_and_reports_the_whole_tensor(saved):
    tmp, model = saved
    weights = load_weights(str(tmp / "state.pt"))
    assert list(weights) == ["0.weight", "2.weight", "4.weight"]
    w = weights["2.weight"]
    rows, _ = analyze_weights({"w": w}, "int4", "channel", max_rows=4, progress=False)
    assert rows[0]["numel"] == w.numel()  # the tensor's, not the sample's
    assert subsample_rows(w, 4).shape == (4, 128)
    assert rows[0]["optimum"] == pytest.approx(analyze_tensor(subsample_rows(w, 4), "int4")["optimum"])


def test_curves_peak_at_c_opt_and_match_monte_carlo(tmp_path):
    assert _main(["analyze", "--curves", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "snr_curves.png").read_bytes()[:8] == PNG_MAGIC
    with open(tmp_path / "snr_curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["format"] for r in rows} == set(sq.known_formats())
    for fmt in ("int4", "fp4_e2m1", "nf4", "uint4"):
        curve = [r for r in rows if r["format"] == fmt]
        best = max(curve, key=lambda r: float(r["model_snr_db"]))
        assert best["is_c_opt"] == "1" and float(best["c_sigma"]) == pytest.approx(sq.c_opt(fmt), rel=1e-4)
        for r in curve:
            if r["mc_snr_db"]:
                assert float(r["mc_snr_db"]) == pytest.approx(float(r["model_snr_db"]), abs=0.05), (fmt, r)


@pytest.mark.parametrize("fmt", ["int4", "fp4_e2m1", "nf4", "int8"])
def test_plain_monte_carlo_agrees_with_the_error_model(fmt):
    # Plain sampling (not the stratified estimate of the curves): the check owes nothing to either.
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(3))
    for c in np.array([0.6, 1.0, 1.7]) * sq.c_opt(fmt):
        scale = torch.tensor(float(c) / sq.get_format(fmt).qmax)
        mc = sq.snr_db(x, sq.fake_quantize(x, scale, None, fmt))
        assert mc == pytest.approx(sq.gaussian_snr_db(fmt, float(c)), abs=0.2), (fmt, c)
    assert monte_carlo_snr_db(fmt, float(c)) == pytest.approx(sq.gaussian_snr_db(fmt, float(c)), abs=0.02)


def test_bad_input_exits_2_with_the_reason(saved, tmp_path, capsys):
    tmp, _ = saved
    cases = [
        (["analyze", str(tmp / "state.pt"), "--format", "int5"], "unknown format 'int5'; known formats: fp4_e2m1"),
        (["analyze", str(tmp / "nope.pt"), "--format", "int4"], "not found"),
        (["analyze", str(tmp / "state.pt")], "--format is required"),
        (["analyze"], "give a MODEL to analyse, or --curves"),
        (["analyze", str(tmp / "state.pt"), "--format", "nvfp4", "--granularity", "channel"], "fixed block size of 16"),
        (["analyze", str(tmp / "state.pt"), "--format", "int4", "--granularity", "rows"], "granularity must be"),
    ]
    torch.save({"bias": torch.ones(3)}, tmp_path / "no_weights.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    cases += [
        (["analyze", str(tmp_path / "no_weights.pt"), "--format", "int4"], "no weight tensors"),
        (["analyze", str(tmp_path / "junk.pt"), "--format", "int4"], "not readable by torch.load"),
        (["analyze", str(tmp_path), "--format", "int4"], "needs *.safetensors or pytorch_model.bin"),
    ]
    for argv, message in cases:
        assert _main([*argv, "--out", str(tmp_path / "o"), "--no-plot"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_hugging_face_folder_is_read_from_its_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"enc.weight": torch.randn(8, 32), "enc.bias": torch.randn(8)}, str(tmp_path / "model.safetensors"))
    assert list(load_weights(str(tmp_path))) == ["enc.weight"]


def test_output_aware_columns_bound_by_their_optimum():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 128, generator=g)
    h = torch.logspace(-2, 1, 128)[torch.randperm(128, generator=g)]
    snr = analyze_tensor(w, "fp4_e2m1", 32, moments=h)
    assert snr["out_optimum"] >= snr["out_auto"] - 1e-3 and snr["out_auto"] > snr["out_minmax"]
    # The output-aware estimate buys output SNR at the price of weight SNR: not the same scale.
    assert snr["out_auto"] > snr["out_minmax"] + 0.3


@pytest.mark.slow  # suite budget: the output-aware columns are checked on a tensor above in the fast suite
def test_smollm2_with_calibration_adds_output_aware_columns(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "smollm2", "--format", "fp4_e2m1", "--granularity", "32", "--max-rows", "2",
            "--calibration-tokens", "256", "--out", str(out), "--no-plot"]  # fmt: skip
    assert _main(args) == 0
    header, rows = _read_csv(out / "layer_snr.csv")
    assert tuple(header[-3:]) == ("out_minmax", "out_auto", "out_optimum")
    assert len(rows) == 211  # 210 Linear weights and the (tied) embedding
    linear = [r for r in rows if r["out_auto"]]
    assert len(linear) == 210
    assert all(float(r["out_optimum"]) >= float(r["out_auto"]) - 0.01 for r in linear)
    assert sum(float(r["out_auto"]) > float(r["out_minmax"]) for r in linear) > 0.9 * len(linear)
    assert "out_auto" in capsys.readouterr().out
    assert _main(["analyze", "minilm", "--format", "int4", "--calibration-tokens", "512"]) == 2
