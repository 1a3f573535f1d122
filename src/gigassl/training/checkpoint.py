"""Giga-SSL training checkpoints: plain data written atomically, loaded weights-only.

A checkpoint is a dict of tensors and plain data (``torch.load(..., weights_only=True)``):
``format``, ``format_version``, ``package_version``, ``epoch``, ``global_step``, ``config``,
``slide_ids``, ``encoder`` (tile encoder of the features), ``init`` (weights layer4 started
from; None for a randomly initialised generic head), ``architecture`` (the sparse head,
:meth:`gigassl.model.HeadSpec.to_dict`: feature_dim, block, n_blocks, width, source,
input_projection_dim), ``model`` (``GigaSSLModel`` state dict), ``optimizer``, ``scheduler``, ``scaler``,
``rng``, ``history`` (the monitor rows), ``world_size``, ``content_sha256`` (the hash of all
the rest, :mod:`extract.checkpoints.sealed`). :func:`load_checkpoint` refuses a checkpoint of
another format version (written by an older gigassl: train again), one without the hash, and one
whose content does not match it or whose tensors hold NaN or inf, naming the tensor.

The run folder: :func:`claim_output_folder` refuses an ``out`` that holds another run (unless
``--overwrite`` or ``--resume`` from inside it); :func:`check_resume` refuses a resume whose
settings or slides differ from the checkpoint's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from extract.checkpoints.sealed import load_sealed, write_epoch_snapshot
from extract.errors import UserError
from extract.monitors import MONITORS_CSV, MONITORS_JSON
from extract.partial_files import remove_stale_partials
from extract.settings import settings_dict
from gigassl.config import TrainConfig
from gigassl.model import GigaSSLModel, HeadSpec
from gigassl.sparse.conv import BACKENDS

CHECKPOINT_FORMAT = "gigassl-slide-encoder"
CHECKPOINT_VERSION = 2  # 2: always sealed, with ``architecture`` and ``config["sparse_backend"]``
LATEST_CHECKPOINT = "checkpoint.pt"
# Settings that may change on --resume: where and how outputs are written and how the arithmetic
# runs, not what is learned (views depend only on the seed, so workers, devices, the sparse backend
# and the precision do not change them: a run started on a CPU may go on on a GPU).
RESUME_FREE_KEYS = frozenset(
    {
        "out",
        "resume",
        "features",
        "num_workers",
        "device",
        "checkpoint_every",
        "keep_checkpoints",
        "monitor_slides",
        "skip_bad_files",
        "check_finite",
        "recheck_finite",
        "sparse_backend",
        "mixed_precision",
    }
)
# Settings a resume may change beyond RESUME_FREE_KEYS: permissions that do not change what is
# learned (the slides are checked by id), and ``epochs`` (the schedule is re-planned).
RESUME_EXTRA_FREE_KEYS = frozenset({"epochs", "overwrite", "allow_mixed_grids"})
# Run files in ``out``; a folder holding any of them holds a run (see claim_output_folder).
RUN_FILES = (LATEST_CHECKPOINT, MONITORS_CSV, MONITORS_JSON, "curves.png")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`run_training` (weights-only load, format checked)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = load_sealed(
        path,
        str(path),
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        "a Giga-SSL checkpoint written by `gigassl train`",
        "train the slide encoder again with `gigassl train`",
    )
    return payload


def load_model(
    path: str | Path, device: torch.device | str = "cpu", sparse_backend: str = "auto"
) -> tuple[GigaSSLModel, dict[str, Any]]:
    """The trained :class:`GigaSSLModel` of a checkpoint (eval mode) and the checkpoint dict;
    the network is rebuilt from the checkpoint's ``architecture``.

    ``sparse_backend`` may differ from the one the checkpoint was trained with: the weights are
    the same for both backends.
    """
    payload = load_checkpoint(path)
    saved_backend = payload["config"]["sparse_backend"]
    if saved_backend not in BACKENDS:
        raise UserError(
            f"{path}: the checkpoint names an unknown sparse backend {saved_backend!r} "
            f"(this package knows {', '.join(BACKENDS)}); was it written by a newer gigassl?"
        )
    head = HeadSpec.from_dict(payload["architecture"], str(path))
    model = GigaSSLModel(None, int(payload["config"]["projector_dim"]), device, sparse_backend, head)
    model.load_state_dict(payload["model"])
    return model.eval(), payload


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys (outside :data:`RESUME_FREE_KEYS`) whose values differ, as 'key: saved → current'."""
    keys = sorted((set(saved) | set(current)) - RESUME_FREE_KEYS)
    return [f"{key}: {saved.get(key)!r} → {current.get(key)!r}" for key in keys if saved.get(key) != current.get(key)]


def write_checkpoint(out: Path, epoch: int, payload: dict[str, Any], keep: int) -> Path:
    """``checkpoints/epoch_NNNN.pt``, ``checkpoint.pt`` pointing at it, older ones pruned."""
    return write_epoch_snapshot(out / "checkpoints", epoch, payload, out / LATEST_CHECKPOINT, keep)


def rng_state() -> dict[str, Any]:
    """torch's CPU generator state, for an exact resume. Training draws no CUDA random numbers
    (views are drawn from seeded NumPy generators), so no GPU state is saved: a checkpoint resumes
    on a node with any number of GPUs."""
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])


def existing_run(out: Path) -> list[Path]:
    """The files of a training run already in ``out`` (empty when there is none)."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if (out / "checkpoints").is_dir():
        found += sorted((out / "checkpoints").glob("epoch_*.pt"))
    return found


def claim_output_folder(out: Path, config: TrainConfig) -> list[Path]:
    """The files ``--overwrite`` will delete; refuses a folder that holds another run unless
    ``--overwrite``, or ``--resume`` from a checkpoint inside it."""
    found = existing_run(out)
    if not found:
        return []
    if config.resume is not None and Path(config.resume).resolve().is_relative_to(out.resolve()):
        return []
    if config.overwrite:
        return found
    resumable, what = resumable_checkpoint(out)
    if resumable is None:
        raise UserError(f"{out} already holds a training run ({what}); pass --overwrite to start it again, or another --out")
    raise UserError(
        f"{out} already holds a training run ({what}); pass --resume {resumable} to continue "
        "it (with a larger --epochs to train it longer), --overwrite to replace it, or another --out"
    )


def resumable_checkpoint(out: Path) -> tuple[Path | None, str]:
    """(the newest checkpoint of the run in ``out`` that loads and verifies, or None; what the run holds)."""
    candidates = [out / LATEST_CHECKPOINT]
    if (out / "checkpoints").is_dir():
        snapshots = sorted((out / "checkpoints").glob("epoch_*.pt"), key=lambda p: p.stem)
        candidates += snapshots[::-1]
    problems: list[str] = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            payload = load_checkpoint(path)
            return path, f"epoch {payload['epoch']} of {payload['config']['epochs']}" + (f"; {problems[0]}" if problems else "")
        except (OSError, ValueError, KeyError) as error:
            problems.append(f"{path.name} is unusable: {str(error).removeprefix(f'{path}: ')}")
    if problems:
        return None, "; ".join(problems[:2])
    return None, "stopped before its first checkpoint, nothing to resume"


def remove_stale_run_partials(out: Path) -> None:
    """Delete the partial checkpoints and monitors left in ``out`` by runs that have ended."""
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            remove_stale_partials(folder)


def check_resume(resume: Mapping[str, Any], config: TrainConfig, slide_ids: list[str]) -> None:
    """Refuse a resume whose settings (but ``epochs``) or slides differ from the checkpoint's,
    or whose ``epochs`` is fewer than the epochs already trained."""
    saved = {k: v for k, v in resume["config"].items() if k not in RESUME_EXTRA_FREE_KEYS}
    current = {k: v for k, v in settings_dict(config).items() if k not in RESUME_EXTRA_FREE_KEYS}
    differences = config_differences(saved, current)
    if differences:
        raise UserError(
            f"cannot resume from {config.resume}: its settings differ from these ("
            + "; ".join(differences)
            + "); resume with the same settings (only --epochs may change) "
            "or start a new run"
        )
    if list(resume["slide_ids"]) != slide_ids:
        raise UserError(
            f"cannot resume from {config.resume}: it was trained on other slides "
            f"({len(resume['slide_ids'])} slides, now {len(slide_ids)})"
        )
    done = int(resume["epoch"])
    if config.epochs < done:
        raise UserError(
            f"cannot resume from {config.resume}: it has trained {done} epochs, more than --epochs "
            f"{config.epochs}; --epochs is the total, pass --epochs ≥ {done}"
        )
