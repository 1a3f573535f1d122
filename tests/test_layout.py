"""The layout rules of the house style, checked on the tree as formatted: no function in ``src/`` over
80 lines and no module over 450 (docstrings and comments count; they are part of what a reader reads),
and every module named in the README's architecture map.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450
MODULES = sorted(SRC.rglob("*.py"))


def function_lengths(source: str) -> dict[str, int]:
    """Lines per function or method (decorators excluded), keyed ``name@line``."""
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            lengths[f"{node.name}@{node.lineno}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_function_lengths_counts_lines() -> None:
    source = "def f():\n    x = 1\n\n    return x\n\n\nclass A:\n    def g(self):\n        pass\n"
    assert function_lengths(source) == {"f@1": 4, "g@8": 2}


def test_the_source_tree_is_found() -> None:
    assert len(MODULES) > 40, f"expected the package's modules under {SRC}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_module_and_function_sizes(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    n_lines = len(source.splitlines())
    assert n_lines <= MAX_MODULE_LINES, f"{path.relative_to(SRC)} has {n_lines} lines; split it by owner"
    too_long = {name: n for name, n in function_lengths(source).items() if n > MAX_FUNCTION_LINES}
    assert not too_long, f"{path.relative_to(SRC)}: functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def architecture_map(readme: str) -> str:
    """The README's "Architecture map" section (up to the next ``## `` heading)."""
    start = readme.index("## Architecture map")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end >= 0 else None]


def test_the_readme_map_names_every_module() -> None:
    section = architecture_map((ROOT / "README.md").read_text(encoding="utf-8"))
    stems = {p.stem for p in MODULES if p.stem != "__init__"}
    unnamed = sorted(s for s in stems if not re.search(rf"\b{re.escape(s)}\b", section))
    assert not unnamed, f"modules missing from the README's architecture map: {unnamed}"
    named = set(re.findall(r"\b(?:extract|gigassl)\.(\w+)", section))
    assert named <= stems, f"the map names modules that do not exist: {sorted(named - stems)}"
