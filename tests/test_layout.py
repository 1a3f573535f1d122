"""The layout rules of the house style, checked on the tree as formatted: no function in ``src/`` over
80 lines and no module over 450 (docstrings and comments count; they are part of what a reader reads),
and every module named in the README's architecture map; a short README, docs pages in the site's nav, and
references from the source that stay inside the repository.
"""

from __future__ import annotations

import ast
import importlib.util
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


# The documentation: a short README, docs pages that are all in the site's nav, and docstrings that
# point only inside the repository (mkdocs itself checks links and anchors in `mkdocs build --strict`).
README_MAX_LINES = 300
DOCS = ROOT / "docs"


def test_the_readme_stays_short() -> None:
    n_lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines (at most {README_MAX_LINES}); move detail to docs/"


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert any(t.startswith("docs/") for t in local), "the README links no docs page"
    missing = sorted(t for t in local if not (ROOT / t).exists())
    assert not missing, f"README.md links files that do not exist: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_source_points_only_inside_the_repository(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    for outside in ("DESIGN.md", "../shared", "STYLE.md"):
        assert outside not in source, f"{path.relative_to(SRC)} mentions {outside!r}, which is not in the repository"
    pages = set(re.findall(r"\bdocs/[\w./-]+\.md\b", source))
    missing = sorted(p for p in pages if not (ROOT / p).is_file())
    assert not missing, f"{path.relative_to(SRC)} points to docs pages that do not exist: {missing}"


def nav_pages(mkdocs_yml: str) -> set[str]:
    """The ``.md`` paths named in mkdocs.yml's ``nav:`` block (relative to docs/)."""
    nav = mkdocs_yml[mkdocs_yml.index("\nnav:") :]
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE))


def test_nav_pages_parses_entries() -> None:
    text = 'site_name: x\nnav:\n  - Home: index.md\n  - Guides:\n      - "Stage 1: extract": extract.md\n      - api/gigassl.md\n'
    assert nav_pages(text) == {"index.md", "extract.md", "api/gigassl.md"}


def test_every_docs_page_is_in_the_nav() -> None:
    listed = nav_pages((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not pages - listed, f"docs pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert not listed - pages, f"mkdocs.yml's nav names pages that do not exist: {sorted(listed - pages)}"


def test_api_pages_cover_every_module() -> None:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    for package in ("extract", "gigassl"):
        page = (DOCS / "api" / f"{package}.md").read_text(encoding="utf-8")
        rendered = hooks.on_page_markdown(page, page=None)
        documented = set(re.findall(rf"^::: {package}\.(\w+)$", rendered, flags=re.MULTILINE))
        modules = {p.stem for p in (SRC / package).glob("*.py") if p.stem != "__init__"}
        assert documented == modules, f"docs/api/{package}.md: {sorted(modules ^ documented)}"
