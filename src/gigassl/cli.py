"""The ``gigassl`` command: one subcommand per job, each mapped onto its settings dataclass.

Flags are generated from the dataclass fields (``n_tiles_per_view`` → ``--n-tiles-per-view``,
booleans as ``--x/--no-x``, tuples as comma-separated values split into a tuple here), so the
CLI and the Python API cannot drift apart. The dataclasses validate themselves
(:mod:`extract.settings`), so the API and the CLI give the same messages. Heavy modules are
imported only when their subcommand runs.

Errors: a user error is printed as one line and exits with status 2; anything else is a bug,
printed with its traceback, status 1; ``-v`` shows the traceback of user errors too. User
errors are told by their type alone: :class:`extract.errors.UserError` (every check of the
input or the settings raises it or a subclass), a path that is missing or not writable
(``FileNotFoundError``, ``PermissionError`` …), and an ``OSError`` of the environment (read-only
or full filesystem, quota, name too long, link loop, I/O error; a full disk anywhere becomes
:class:`extract.disk_errors.DiskFullError`, naming the free space). Any other exception — a plain
``ValueError`` included, whether numpy's or an internal check of ours — is a bug. Ctrl-C ends with
one line and status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import logging
import sys
import types
import typing
from typing import Any, Sequence

from extract.config import ExtractConfig, MocoConfig
from extract.disk_errors import disk_full_error, is_disk_full
from extract.errors import UserError, one_line
from extract.settings import comma_separated, flag
from gigassl.classifier.config import ExplainConfig, FitConfig, PredictConfig
from gigassl.config import DemoConfig, EmbedConfig, EvaluateConfig, TrainConfig

# subcommand → (settings dataclass, "module:function" taking that dataclass, one-line help).
# The function returns an exit status, or an object whose ``exit_code`` is one.
COMMANDS: dict[str, tuple[type, str, str]] = {
    "extract": (ExtractConfig, "extract.run:run_extraction", "slides → plain tile features and augmented bank (HDF5 per slide)"),
    "pretrain-tiles": (
        MocoConfig,
        "extract.moco.pretrain:run_pretraining",
        "MoCo v2 pre-training of a ResNet18/34/50 tile encoder (--arch) from slides",
    ),
    "train": (TrainConfig, "gigassl.train:run_training", "Giga-SSL training of the sparse slide encoder"),
    "embed": (EmbedConfig, "gigassl.embed:run_embedding", "slide embeddings from a trained checkpoint"),
    "evaluate": (EvaluateConfig, "gigassl.evaluate:run_evaluation", "few-label evaluation against MIL baselines"),
    "fit": (FitConfig, "gigassl.fit:run_fit", "fit the evaluation's classifier on every labelled slide → a model file"),
    "predict": (PredictConfig, "gigassl.predict:run_predict", "score slides with a model file → predictions CSV"),
    "explain": (
        ExplainConfig,
        "gigassl.explain:run_explain",
        "each tile's contribution to a slide's call: HDF5, heatmap, GeoJSON",
    ),
    "demo": (DemoConfig, "gigassl.demo:run_demo", "the whole pipeline on an embedded synthetic cohort"),
}


def _field_type(tp: Any) -> Any:
    """The concrete type of a (possibly Optional) annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of ``config_class``, typed, with its ``help`` metadata and default."""
    hints = typing.get_type_hints(config_class)
    for spec in dataclasses.fields(config_class):
        name = flag(spec.name)
        kind = _field_type(hints[spec.name])
        required = spec.metadata.get("required", False)
        default = None if spec.default is dataclasses.MISSING else spec.default
        help_text = spec.metadata.get("help", "")
        if kind is bool:
            shown = name if default else "--no-" + name[2:]
            parser.add_argument(
                name,
                dest=spec.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=(help_text + f" (default: {shown})").replace("%", "%%"),
            )
            continue
        if typing.get_origin(kind) is tuple:
            kind, shown_default = comma_separated, default if default is None else (",".join(map(str, default)) or "none")
        else:
            shown_default = default
        parser.add_argument(
            name,
            dest=spec.name,
            type=kind,
            default=default,
            required=required,
            metavar=spec.metadata.get("metavar"),
            help=(help_text + ("" if required or default is None else f" (default: {shown_default})")).replace("%", "%%"),
        )


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    """Build the settings dataclass from parsed flags."""
    return config_class(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(config_class)})


def build_parser() -> argparse.ArgumentParser:
    """The ``gigassl`` argument parser with all subcommands."""
    from extract import __version__

    parser = argparse.ArgumentParser(prog="gigassl", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"gigassl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_class, _, help_text) in COMMANDS.items():
        # no abbreviated flags: a removed flag such as --mpp must be refused, not read as --mpp-csv
        command = sub.add_parser(name, help=help_text, description=config_class.__doc__, allow_abbrev=False)
        add_dataclass_arguments(command, config_class)
    return parser


PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# An OSError with one of these errnos is the environment's fault (a read-only or full filesystem,
# a name too long, a link loop …), never the package's: one line naming the path and the cause.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO}
)
EXIT_USER_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130


def is_user_error(error: BaseException) -> bool:
    """True for bad input or settings (one line), False for a bug (traceback); see the module docstring."""
    if isinstance(error, (UserError,) + PATH_ERRORS):
        return True
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


def run_command(command: str, function: Any, config: Any, verbose: bool) -> Any:
    """Call the subcommand's function; user errors, bugs and Ctrl-C become an exit status."""
    log = logging.getLogger("gigassl")
    try:
        return function(config)
    except KeyboardInterrupt:
        log.error("gigassl %s: interrupted (Ctrl-C); files being written were discarded, finished ones are kept", command)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 — classified below: one line, or the traceback of a bug
        if is_disk_full(error) and not isinstance(error, UserError):  # wherever it happened: one line, the path, the space
            error = disk_full_error(getattr(error, "filename", None) or "the output folder", error)
        if is_user_error(error):
            log.error("%s", one_line(error), exc_info=error if verbose else None)
            return EXIT_USER_ERROR
        log.critical(
            "gigassl %s failed on an internal error (a bug; please report it with this traceback): %s: %s",
            command,
            type(error).__name__,
            error,
            exc_info=error,
        )
        return EXIT_BUG


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gigassl`` console command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    config_class, target, _ = COMMANDS[args.command]
    try:
        config = config_from_args(config_class, args)
    except UserError as error:
        parser.error(str(error))
    module_name, function_name = target.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except KeyboardInterrupt:
        logging.getLogger("gigassl").error("gigassl %s: interrupted (Ctrl-C)", args.command)
        return EXIT_INTERRUPTED
    result = run_command(args.command, function, config, args.verbose)
    if isinstance(result, int):
        return result
    if callable(getattr(result, "format", None)):
        print(result.format(), flush=True)  # the end-of-run report; the API only returns it
    return int(getattr(result, "exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
