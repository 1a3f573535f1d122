"""What the settings dataclasses of both stages share: field metadata, checks, plain data.

Each settings dataclass (:mod:`extract.config`, :mod:`gigassl.config`,
:mod:`gigassl.classifier.config`) describes its fields with :func:`flag_help`, whose ``help``
the command line shows (field ``foo_bar`` is the flag ``--foo-bar``, see :mod:`gigassl.cli`),
and checks itself when made: its ``__post_init__`` collects every problem as one line naming
the flag and hands the list to :func:`refuse`, so one :class:`~extract.errors.UserError` names
them all, for the Python API and the command line alike. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from extract.errors import UserError


def flag_help(text: str, **extra: Any) -> dict[str, Any]:
    """A settings field's metadata: its ``help`` (the flag's help text) and ``extra`` keys the
    command line reads (``required=True``, ``metavar``)."""
    return {"help": text, **extra}


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``n_tiles_per_view`` → ``--n-tiles-per-view``."""
    return "--" + name.replace("_", "-")


def settings_dict(config: Any, drop: Collection[str] = ()) -> dict[str, Any]:
    """A settings dataclass as plain data for checkpoints, file attributes and logs (paths as
    str), the fields in ``drop`` left out."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items() if k not in drop}


def too_small(config: Any, minimum: int, names: Iterable[str]) -> list[str]:
    """'--flag must be ≥ minimum (got value)' for each field of ``names`` below ``minimum``."""
    return [
        f"{flag(name)} must be ≥ {minimum} (got {getattr(config, name)})" for name in names if getattr(config, name) < minimum
    ]


def refuse(what: str, problems: Iterable[str]) -> None:
    """Raise one :class:`UserError` listing every problem of the ``what`` settings; nothing when there are none."""
    problems = list(problems)
    if problems:
        raise UserError(f"invalid {what} settings: " + "; ".join(problems))


def _tuple_item_type(annotation: Any) -> type | None:
    """The item type of a ``tuple[X, ...]`` annotation, possibly Optional (``object`` for a bare
    tuple); None for any other annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        items = [_tuple_item_type(a) for a in typing.get_args(annotation)]
        return next((item for item in items if item is not None), None)
    if annotation is tuple:
        return object
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return args[0] if args and isinstance(args[0], type) else object
    return None


@functools.cache
def _tuple_fields(config_class: type) -> tuple[tuple[str, type], ...]:
    """(name, item type) of each tuple-valued field of a settings dataclass."""
    hints = typing.get_type_hints(config_class)
    fields = ((spec.name, _tuple_item_type(hints[spec.name])) for spec in dataclasses.fields(config_class))
    return tuple((name, item) for name, item in fields if item is not None)


def comma_separated(value: str) -> tuple[str, ...]:
    """``"npz, csv"`` → ``("npz", "csv")``: a list-valued flag's value as the tuple its setting takes."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _as_items(text: str, item_type: type) -> tuple[Any, ...]:
    """``"a, b"`` as the tuple a list-valued setting takes (the example of the error message)."""
    parts = comma_separated(text)
    try:
        return tuple(item_type(part) for part in parts) if item_type in (int, float) else parts
    except ValueError:
        return parts


def as_tuples(config: Any, what: str) -> None:
    """Store each tuple-valued field of the frozen dataclass ``config`` as a tuple (a list or
    another iterable is taken; None stays None). A string there is refused at once — the command
    line splits its comma-separated values before the dataclass sees them — with the tuple to give."""
    problems = []
    config_class: type = type(config)
    for name, item_type in _tuple_fields(config_class):
        value = getattr(config, name)
        if value is None or isinstance(value, tuple):
            continue
        if isinstance(value, str):
            problems.append(f"{flag(name)} {value!r}: give a tuple such as {_as_items(value, item_type)!r}, not a string")
            continue
        try:
            object.__setattr__(config, name, tuple(value))
        except TypeError:
            problems.append(f"{flag(name)} {value!r}: give a tuple of values")
    refuse(what, problems)
