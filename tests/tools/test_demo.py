"""`statqat demo digits`: the quick path end to end (with a tiny recipe), and results.json's schema.

The digits demo is the secondary one since the SmolLM2 demo became the main job; its runs
are in `make test-slow`.
"""

import json

import pytest

from statqat_ao.tools import cli, demo

TINY = demo.DemoSettings(seeds=1, float_epochs=2, qat_epochs=1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setattr(demo.DemoSettings, "for_run", classmethod(lambda cls, quick, seeds: TINY))
    try:
        code = cli.main(["demo", "digits", "--quick", "--out", str(out), "--no-progress"])
    finally:
        mp.undo()
    return code, out


@pytest.mark.slow
def test_demo_quick_writes_the_results_figures_and_export_report(demo_run, capsys):
    code, out = demo_run
    assert code == 0
    for name in ("training_curves.png", "layer_snr.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    info = json.loads((out / "run_info.json").read_text())
    export = info["export"]
    assert export["model"]["label"].startswith("int4/")
    assert export["torchao"]["linear_weight_bytes"][1] < export["torchao"]["linear_weight_bytes"][0]
    assert export["onnx"]["max_error"] < 4e-3 and (out / "best.onnx").stat().st_size == export["onnx"]["file_bytes"]
    assert "activation" in export["executorch"]["error"]  # W4A4: XNNPACK runs INT8 activations only


@pytest.mark.slow
def test_results_json_schema(demo_run):
    _, out = demo_run
    results = json.loads((out / "results.json").read_text())
    expected = {"float"} | {f"{f}/{m}" for f in ("int4", "fp4_e2m1") for m in ("minmax", "lsq", "octav", "analytic", "iterative")}
    assert set(results) == expected
    for key, r in results.items():
        assert set(r) == {"mean", "std", "runs"}, key
        assert len(r["runs"]) == TINY.seeds and all(0.0 <= v <= 100.0 for v in r["runs"])
        assert r["mean"] == pytest.approx(sum(r["runs"]) / len(r["runs"]))
    assert results["float"]["mean"] > 50  # even two epochs learn digits


def test_quick_and_full_recipes():
    quick, full = demo.DemoSettings.for_run(True, None), demo.DemoSettings.for_run(False, None)
    assert (quick.seeds, full.seeds) == (1, 3)
    assert demo.DemoSettings.for_run(False, 5).seeds == 5
    assert quick.qat_epochs < full.qat_epochs
