"""MkDocs hook: fills the API reference pages from the source tree at build time.

A page under ``docs/api/`` that holds the line ``<!-- api-modules: PACKAGE -->`` gets, in its
place, one mkdocstrings block per subpackage (its ``__init__`` docstring) and per module of
``src/PACKAGE`` and its subpackages, in the order of their dotted names, so a new module appears in
the reference without editing the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
MARKER = re.compile(r"^<!-- api-modules: (\w+) -->$", re.MULTILINE)


def dotted_names(package: str, src: Path = SRC) -> list[str]:
    """Every subpackage and module under ``src/package`` as dotted names, sorted (the package itself excluded)."""
    folder = src / package
    if not folder.is_dir():
        raise ValueError(f"docs/api: no package {package!r} under {src}")
    names = []
    for path in folder.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            names.append(".".join(parts))
    return sorted(names)


def module_blocks(package: str, src: Path = SRC) -> str:
    """The mkdocstrings blocks for every subpackage (its docstring only) and module of ``src/package``."""
    blocks = []
    for name in dotted_names(package, src):
        options = "    options:\n      show_root_heading: false\n"
        if (src / name.replace(".", "/")).is_dir():
            options += "      members: false\n"
        blocks.append(f"## `{name}`\n\n::: {name}\n{options}")
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace each ``<!-- api-modules: PACKAGE -->`` line with that package's module blocks."""
    return MARKER.sub(lambda m: module_blocks(m.group(1)), markdown)
