"""Any tile encoder, offline: a ``torch.export``-ed program in a ``.pt2`` file.

A foundation model (a ViT such as UNI, CONCH or Virchow) is exported once, on a machine that
has its code and weights (:func:`export_tile_encoder`, recipe in docs/encoders.md), into a
program mapping normalised (B, 3, S, S) images to (B, D) features, with a dynamic batch
dimension. Here it runs without its code, without timm or Hugging Face, without a network.

Its preprocessing comes from a JSON sidecar beside it (``uni.pt2`` → ``uni.json``:
``{"input_size_px": 224, "mean": [..3], "std": [..3], "name": "uni"}``), overridden by the
``--encoder-input-size-px`` / ``--encoder-mean`` / ``--encoder-std`` flags; the input size can
also be read from the program itself when its spatial sizes are static.

Safety: ``torch.export.load`` falls back to unpickling for tensor subclasses, custom objects
and sample inputs. A ``.pt2`` file is untrusted input like a checkpoint, so its archive is
checked first (:func:`check_pt2_archive`) and refused when any of these would be unpickled.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from extract.config import parse_channel_stats
from extract.encoders.tile_encoder import EncoderInfo, TileEncoder, file_sha256
from extract.errors import UserError

SIDECAR_SUFFIX = ".json"
PROBE_SIZE_PX = 224  # side used to probe a program whose spatial sizes are dynamic
TENSOR_CONSTANT_PREFIX = "tensor_"  # constants stored as raw tensors (not pickled objects)


def sidecar_path(path: Path) -> Path:
    """Where a program's preprocessing is stored: ``PATH.pt2`` → ``PATH.json``."""
    return path.with_suffix(SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> dict[str, Any]:
    """The sidecar of ``path`` as {input_size_px?, mean?, std?, name?}; {} when there is none."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{side}: not a readable JSON object ({error}); fix it or delete it and pass the flags") from error
    if not isinstance(data, dict):
        raise UserError(f"{side}: expected a JSON object with input_size_px, mean, std")
    unknown = sorted(set(data) - {"input_size_px", "mean", "std", "name"})
    if unknown:
        raise UserError(f"{side}: unknown keys {unknown}; expected input_size_px, mean, std, name")
    return data


def _archive_problem(archive: zipfile.ZipFile) -> str | None:
    """Why loading this .pt2 archive would unpickle something, or None."""
    names = ["/" + name for name in archive.namelist()]  # "/" so that a top folder is optional
    if any("/data/aotinductor/" in name for name in names):
        return "it holds AOTInductor binaries (compiled code)"
    if not any("/models/" in name and name.endswith(".json") for name in names):
        return "it holds no exported program (models/*.json)"
    for name in names:
        if name.endswith("_weights_config.json") or name.endswith("_constants_config.json"):
            config = json.loads(archive.read(name[1:])).get("config", {})
            for fqn, meta in config.items():
                if meta.get("use_pickle") or (
                    name.endswith("_constants_config.json")
                    and not str(meta.get("path_name", "")).startswith(TENSOR_CONSTANT_PREFIX)
                ):
                    return f"its tensor {fqn!r} is stored pickled (a tensor subclass or a custom object)"
        elif ("/data/weights/" in name or "/data/constants/" in name) and name.endswith(".pt"):
            return f"it stores weights in the legacy pickled format ({name[1:]})"
        elif "/data/sample_inputs/" in name:
            try:
                torch.load(io.BytesIO(archive.read(name[1:])), weights_only=True)
            except Exception:  # noqa: BLE001 - anything but plain tensors is refused
                return f"its sample inputs ({name[1:]}) are not plain tensors"
    return None


def check_pt2_archive(path: Path) -> None:
    """Refuse (ValueError, one line) a ``.pt2`` file that ``torch.export.load`` would unpickle from."""
    try:
        with zipfile.ZipFile(path) as archive:
            problem = _archive_problem(archive)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as error:
        raise UserError(f"{path}: not a torch.export archive ({error}); write it with torch.export.save") from error
    if problem:
        raise UserError(
            f"{path}: refused because {problem}; re-export the model with torch.export.export + torch.export.save "
            "from plain tensors (see docs/encoders.md)"
        )


def _static_input_size(program: torch.export.ExportedProgram) -> int | None:
    """The (static, square) side of the program's image input, or None when dynamic."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(placeholders) != 1:
        return None
    value = placeholders[0].meta.get("val")
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) == 4 and all(isinstance(s, int) for s in shape[2:]) and shape[2] == shape[3]:
        return int(shape[2])
    return None


class ExportedTrunk(TileEncoder):
    """An exported program as a :class:`TileEncoder` (it stays in the mode it was exported in)."""

    def __init__(
        self, program: nn.Module, feature_dim: int, mean: Sequence[float], std: Sequence[float], input_size_px: int | None
    ) -> None:
        super().__init__(feature_dim, mean, std, input_size_px)
        self.program = program

    def train(self, mode: bool = True) -> "ExportedTrunk":
        # An exported program's graph is fixed (and refuses .train/.eval): only this flag changes.
        self.training = mode
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.program(images)


def _probe(program: nn.Module, size: int, path: Path) -> int:
    """Run batches of 2 and 1 through ``program``; return D, or raise one line saying what is wrong."""
    widths = set()
    for batch in (2, 1):
        try:
            with torch.inference_mode():
                out = program(torch.zeros(batch, 3, size, size))
        except Exception as error:  # noqa: BLE001 - a guard or shape failure of the program
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"{path}: the program fails on a ({batch}, 3, {size}, {size}) batch ({first}); export it with a dynamic "
                "batch dimension (dynamic_shapes=({0: torch.export.Dim('batch')},)) and give its input size "
                "(--encoder-input-size-px or the sidecar's input_size_px)"
            ) from error
        if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != batch:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise UserError(f"{path}: the program maps ({batch}, 3, {size}, {size}) to {shape}; it must return (B, D) features")
        widths.add(int(out.shape[1]))
    return widths.pop()


def load_exported(
    path: Path,
    *,
    input_size_px: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[ExportedTrunk, EncoderInfo]:
    """An exported program and its provenance; preprocessing from the flags, else the sidecar."""
    if not path.is_file():
        raise FileNotFoundError(f"exported tile encoder {path} does not exist; export one as docs/encoders.md shows")
    side = read_sidecar(path)
    check_pt2_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as error:  # noqa: BLE001 - version skew, damaged file …
        raise UserError(
            f"{path}: torch.export.load failed ({error}); re-export it with this torch version ({torch.__version__})"
        ) from error
    size = input_size_px or side.get("input_size_px") or _static_input_size(program)
    if size is not None and (not isinstance(size, int) or size < 16):
        raise UserError(f"{path}: input size {size!r} must be an integer ≥ 16 px (--encoder-input-size-px or the sidecar)")
    if (mean or side.get("mean")) is None or (std or side.get("std")) is None:
        raise UserError(
            f"{path}: no normalisation given; write {sidecar_path(path)} with mean and std, or pass --encoder-mean "
            "and --encoder-std (e.g. ImageNet's 0.485,0.456,0.406 and 0.229,0.224,0.225)"
        )
    mean = parse_channel_stats(mean or side["mean"], f"{path}: mean")
    std = parse_channel_stats(std or side["std"], f"{path}: std", positive=True)
    if mean is None or std is None:
        raise UserError(f"{path}: no normalisation given (mean and std)")
    module = program.module()
    width = _probe(module, size or PROBE_SIZE_PX, path)
    trunk = ExportedTrunk(module, width, mean, std, size)
    info = EncoderInfo(
        path.name, file_sha256(path), "export", str(side.get("name") or path.stem), width, "torch.export", size or 0, mean, std
    )
    return trunk, info


def export_tile_encoder(
    model: nn.Module,
    path: str | Path,
    input_size_px: int,
    mean: Sequence[float],
    std: Sequence[float],
    name: str = "",
) -> Path:
    """Export ``model`` (normalised (B, 3, S, S) → (B, D)) to ``path`` (.pt2) with its sidecar JSON.

    Run where the model's code and weights are; the batch dimension is dynamic. Returns the path.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise UserError(f"{path}: an exported program's file name must end in .pt2")
    model = model.eval()
    example = torch.randn(2, 3, input_size_px, input_size_px)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    sidecar = {
        "input_size_px": int(input_size_px),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "name": name or path.stem,
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=1) + "\n")
    return path
