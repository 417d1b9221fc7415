"""The package's layers import downwards only, and the root of statqat_ao/ stays empty.

Every import in statqat_ao/, passes/ and backends/ is read from the source (function-level
imports included, relative ones resolved) and checked against the layer order in
README's "Architecture" section.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first: a module may import its own layer and the ones before it.
LAYERS = ("numerics", "parallel", "estimators", "quantizers", "frontends", "passes", "backends", "models", "tools")
RANK = {name: i for i, name in enumerate(LAYERS)}
ROOT_RANK = len(LAYERS)  # statqat_ao/__init__.py re-exports everything
SOURCE_DIRS = {"statqat_ao": REPO / "statqat_ao", "statqat_ao.passes": REPO / "passes", "statqat_ao.backends": REPO / "backends"}


def module_name(path: Path) -> str:
    for package, folder in SOURCE_DIRS.items():
        if path.is_relative_to(folder):
            return ".".join([package, *path.relative_to(folder).with_suffix("").parts])
    raise ValueError(path)


def layer_rank(module: str) -> int | None:
    """The rank of a statqat_ao module (``None``: not ours)."""
    parts = module.split(".")
    if parts[0] != "statqat_ao":
        return None
    if len(parts) == 1 or parts[1] == "__init__":
        return ROOT_RANK
    if parts[1] not in RANK:
        raise AssertionError(f"{module} is in no layer: statqat_ao/ holds only the layer packages")
    return RANK[parts[1]]


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``source``, relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import name`: name may be a submodule (a layer, under the root)
            for alias in node.names:
                target = f"{base}.{alias.name}" if base == "statqat_ao" and alias.name in RANK else base
                found.append((node.lineno, target))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_rank(module)
    bad = []
    for line, target in imported_modules(source, module, is_package):
        rank = layer_rank(target)
        if rank is not None and rank > own:
            bad.append(f"{module}:{line} imports {target} (a higher layer)")
    return bad


def source_files() -> list[Path]:
    return sorted(p for folder in SOURCE_DIRS.values() for p in folder.rglob("*.py"))


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    module = module_name(path)
    is_package = path.name == "__init__.py"
    if is_package:
        module = module.removesuffix(".__init__")
    assert violations(path.read_text(), module, is_package) == []


def test_the_checker_catches_an_upward_import():
    upward = "import torch\n\ndef f():\n    from statqat_ao.quantizers.fake_quant import fake_quantize\n"
    assert violations(upward, "statqat_ao.numerics.codes") == [
        "statqat_ao.numerics.codes:4 imports statqat_ao.quantizers.fake_quant (a higher layer)"
    ]
    relative = "from ..frontends.qconfig import QuantSpec\nfrom .common import usable_scale\n"
    assert violations(relative, "statqat_ao.estimators.lsq") == [
        "statqat_ao.estimators.lsq:1 imports statqat_ao.frontends.qconfig (a higher layer)"
    ]
    assert violations("import statqat_ao\n", "statqat_ao.passes.trace") == [
        "statqat_ao.passes.trace:1 imports statqat_ao (a higher layer)"
    ]
    assert violations("from statqat_ao import tools\n", "statqat_ao.backends.onnx") == [
        "statqat_ao.backends.onnx:1 imports statqat_ao.tools (a higher layer)"
    ]


def test_root_holds_only_the_layers():
    root = REPO / "statqat_ao"
    files = {p.name for p in root.iterdir() if p.is_file()}
    folders = {p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert files == {"__init__.py", "py.typed"}
    assert folders == set(LAYERS) - {"passes", "backends"}


def test_every_layer_is_an_installed_package():
    import tomllib

    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert packages == {"statqat_ao", *(f"statqat_ao.{layer}" for layer in LAYERS)}
