"""The Python examples of README.md and docs/*.md run as written (what a new user copies first)."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ALL_BLOCKS = [
    (page, i, block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]
# A docs page may repeat the README's example word for word: run each distinct block once.
BLOCKS = [b for n, b in enumerate(ALL_BLOCKS) if b[2] not in {a[2] for a in ALL_BLOCKS[:n]}]


def _runnable(block: str) -> bool:
    # Fragments that need a user's own model and inputs, or a torchrun launch, are shown, not run.
    if "torchrun" in block:
        return False
    defines_model = re.search(r"^\s*model\s*(,[^=\n]*)?=", block, re.M)
    return bool(defines_model) or ("model.train()" not in block and "export(model" not in block)


@pytest.mark.parametrize(
    ("page", "index", "block"),
    [b for b in BLOCKS if _runnable(b[2])],
    ids=[f"{p.relative_to(REPO)}:{i}" for p, i, b in BLOCKS if _runnable(b)],
)
def test_doc_example_runs(page, index, block, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples may write files (qat.pt)
    try:
        exec(compile(block, f"{page.name} block {index}", "exec"), {})
    finally:
        os.chdir(cwd)


def test_every_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"
