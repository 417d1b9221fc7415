"""The README's Python examples run as written (what a new user copies first)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _runnable(block: str) -> bool:
    # Fragments that need a user's own model and inputs are shown, not run.
    return "model.train()" not in block and "export(model" not in block


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if _runnable(b)])
def test_readme_example_runs(index, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples may write files (qat.pt)
    try:
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
    finally:
        os.chdir(cwd)
