"""MkDocs hook: fills the API reference pages from the source tree at build time.

A page under ``docs/api/`` that holds the line ``<!-- api-modules: PACKAGE -->`` gets, in its
place, one mkdocstrings block (``::: PACKAGE.module``) per module of ``src/PACKAGE``, in
alphabetical order, so a new module appears in the reference without editing the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
MARKER = re.compile(r"^<!-- api-modules: (\w+) -->$", re.MULTILINE)


def module_blocks(package: str, src: Path = SRC) -> str:
    """The mkdocstrings blocks for every module of ``src/package`` (``__init__`` as the package)."""
    folder = src / package
    if not folder.is_dir():
        raise ValueError(f"docs/api: no package {package!r} under {src}")
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    blocks = [f"## `{package}.{name}`\n\n::: {package}.{name}\n    options:\n      show_root_heading: false\n" for name in names]
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace each ``<!-- api-modules: PACKAGE -->`` line with that package's module blocks."""
    return MARKER.sub(lambda m: module_blocks(m.group(1)), markdown)
