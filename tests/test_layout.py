"""The layout rules of the house style, checked on the tree as formatted: no function in ``src/`` over
80 lines and no module over 450 (docstrings and comments count; they are part of what a reader reads),
every package and module in the README's architecture map and the reverse, a docstring on every
package, no import loop (local imports included); a short README, docs pages in the site's nav, and
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


def map_table(section: str) -> dict[str, set[str]]:
    """The map's table rows: ``| `package` | what it owns | `module`, `module` |`` → {package: modules}."""
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[\w.]+`", cells[0]):
            rows[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[2]))
    return rows


def tree_packages(src: Path = SRC) -> dict[str, set[str]]:
    """The packages under ``src`` (folders with ``__init__.py``) → the stems of their modules."""
    return {
        ".".join(init.parent.relative_to(src).parts): {p.stem for p in init.parent.glob("*.py") if p.stem != "__init__"}
        for init in src.rglob("__init__.py")
    }


def test_map_table_parses_rows() -> None:
    section = "| Package | What | Modules |\n|---|---|---|\n| `a.b` | owns x | `c`, `d` |\n| `a` | y | `e` |\n"
    assert map_table(section) == {"a.b": {"c", "d"}, "a": {"e"}}


def test_the_readme_map_matches_the_tree() -> None:
    section = architecture_map((ROOT / "README.md").read_text(encoding="utf-8"))
    in_map, in_tree = map_table(section), tree_packages()
    assert set(in_map) == set(in_tree), (
        f"packages in the map but not the tree, or the reverse: {sorted(set(in_map) ^ set(in_tree))}"
    )
    for package, modules in in_tree.items():
        assert in_map[package] == modules, (
            f"README map row `{package}`: differs from the tree by {sorted(in_map[package] ^ modules)}"
        )
    flow = section[section.index("```") : section.rindex("```")]
    subpackages = [p for p in in_tree if "." in p]
    unflowing = [p for p in subpackages if not re.search(rf"\b{re.escape(p)}\b", flow)]
    assert not unflowing, f"subpackages missing from the map's data-flow diagram: {unflowing}"


@pytest.mark.parametrize("package", sorted(tree_packages()), ids=str)
def test_every_package_says_what_it_owns(package: str) -> None:
    init = SRC / package.replace(".", "/") / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert docstring and len(docstring.split()) >= 20, (
        f"{init.relative_to(ROOT)}: needs a one-paragraph docstring saying what it owns"
    )


def module_imports(path: Path, src: Path = SRC) -> set[str]:
    """The package modules ``path`` imports anywhere in its body (local and type-checking imports included)."""
    known = {".".join(p.relative_to(src).with_suffix("").parts) for p in src.rglob("*.py")}
    known = {k.removesuffix(".__init__") for k in known}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name in known}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of a directed graph (one per strongly connected set of more than one node, or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_import_cycles_finds_a_loop() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops() -> None:
    graph = {}
    for path in MODULES:
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = module_imports(path) - {name}
    # a package's own __init__ is imported by every module inside it; that edge is not a loop
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    cycles = import_cycles(graph)
    assert not cycles, f"import loops (local and TYPE_CHECKING imports count): {cycles}"


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
        documented = set(re.findall(rf"^::: ({package}\.[\w.]+)$", rendered, flags=re.MULTILINE))
        modules = {n for n in tree_packages() if n.startswith(package + ".")}
        modules |= {f"{p}.{m}" for p, ms in tree_packages().items() if p.split(".")[0] == package for m in ms}
        assert documented == modules, f"docs/api/{package}.md: {sorted(modules ^ documented)}"
