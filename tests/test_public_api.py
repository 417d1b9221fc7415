"""The public API: the names users import, unchanged by the package's layout."""

import importlib
from pathlib import Path

import pytest
import tomllib

import statqat_ao as sq

# statqat_ao.__all__ as of 0.1.0 (before the layer subpackages): none may go missing.
PUBLIC = [
    "ConvertError", "exact_division", "NonFiniteError", "check_finite", "nonfinite", "StatQATQuantizer",
    "FakeQuantizer", "QuantSpec", "QuantizedParams", "StatQATQConfig", "TraceError", "convert",
    "get_statqat_qconfig", "prepare_qat_fx", "statqat_qconfig", "blocks", "distributed", "fsdp",
    "estimators", "Format", "LSQFakeQuantize", "c_opt", "estimate_qparams", "fake_quantize",
    "gaussian_snr_db", "get_format", "known_formats", "snr_db",
]  # fmt: skip


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_resolve(name):
    assert name in sq.__all__
    assert getattr(sq, name) is not None


def test_module_attributes_keep_their_api():
    assert callable(sq.distributed.set_process_group) and callable(sq.distributed.reduce_statistics)
    assert callable(sq.fsdp.shard_per_module) and callable(sq.nonfinite.set_policy)
    assert callable(sq.blocks.block_layout) and callable(sq.estimators.estimate_qparams)


@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("statqat_ao.passes", ["prepare_qat_fx", "convert", "trace", "TraceError", "ConvertError"]),
        ("statqat_ao.backends.torchao", ["lower", "weight_bytes"]),
        ("statqat_ao.backends.onnx", ["export"]),
        ("statqat_ao.backends.executorch", ["export"]),
        ("statqat_ao.backends.parity", ["ParityError", "UnsupportedModelError"]),
    ],
)
def test_passes_and_backends_keep_their_names(module, names):
    mod = importlib.import_module(module)
    for name in names:
        assert hasattr(mod, name), f"{module}.{name}"


def test_the_console_script_points_at_a_main():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["statqat"]
    module, _, func = target.partition(":")
    assert callable(getattr(importlib.import_module(module), func))
