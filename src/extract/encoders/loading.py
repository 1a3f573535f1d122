"""Find the ResNet inside a checkpoint of any published layout, and say what it is.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)`` only.
A checkpoint is a dict of tensors, possibly inside a container, possibly under a prefix:

- containers: none (a plain state dict), ``{"state_dict": …}`` (Lightning, MoCo),
  ``{"model": …}`` / ``{"net": …}``, and this package's own ``{"format":
  "gigassl-tile-encoder", "arch": A, A: state dict}``;
- prefixes: any, found as the one in front of the stem's ``conv1.weight`` — ``""``, ``module.``
  (DataParallel), ``encoder_q.`` / ``module.encoder_q.`` (MoCo: the query encoder; the key
  encoder ``encoder_k.`` is passed over), ``model.``, ``resnet.``, ``backbone.``, ``encoder.``
  and their combinations such as ``model.resnet.`` (Ciga et al.'s SimCLR ResNet18).

The architecture comes from the keys: bottleneck blocks have a ``conv3``, and the number of
blocks of each stage tells ResNet18 (2-2-2-2) from ResNet34 (3-4-6-3). Heads (``fc``,
projection MLPs, anything outside conv1 … layer4) are ignored; every key the package uses
must be present with the right shape.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from extract.encoders.resnet import ARCHITECTURES, Bottleneck, ResNet, build_resnet
from extract.errors import UserError

ENCODER_CHECKPOINT_FORMAT = "gigassl-tile-encoder"
CONTAINER_KEYS = ("state_dict", "model", "net")  # where trainers put the weights, in this order
KEY_ENCODER_MARKERS = ("encoder_k.", "momentum_encoder.", "target_encoder.")  # copies that are not the model
SHOWN_KEYS = 6


@dataclass(frozen=True)
class FoundResNet:
    """The weights of one ResNet in torchvision's names, and where they were found."""

    state: dict[str, torch.Tensor]
    arch: str
    source: str  # "torchvision", "moco", "lightning" or "gigassl"
    layout: str  # container and prefix, e.g. "state_dict/model.resnet." or "plain"
    n_ignored: int  # tensors of the file that are not part of conv1 … layer4 (heads …)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_KEYS])
    return shown + (f" … ({len(items) - SHOWN_KEYS} more)" if len(items) > SHOWN_KEYS else "")


def read_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a refusal becomes one ValueError line.

    A file refused because it holds pickled Python objects (e.g. Lightning's hyper-parameters)
    gets the one-line conversion a user may run on a file they trust.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        if not reason:
            raise UserError(f"{path}: not a loadable weights-only torch checkpoint ({str(error).splitlines()[0]})") from error
        target = path.with_name(path.name.split(".")[0] + ".weights.pt")
        raise UserError(
            f"{path}: refused by torch.load(weights_only=True) because it holds pickled Python objects ({reason}), "
            "as Lightning checkpoints with hyper-parameters do. Only if you trust where this file comes from "
            "(unpickling can run code), keep just its weights once with: "
            f'python -c "import torch; c = torch.load({str(path)!r}, weights_only=False); '
            f"torch.save(c.get('state_dict', c), {str(target)!r})\"  and pass --encoder {target}"
        ) from error
    except Exception as error:  # noqa: BLE001 - any other failure means the same to a user
        raise UserError(f"{path}: not a loadable weights-only torch checkpoint ({error})") from error


def _container(raw: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """(the mapping holding the weights, its container's name)."""
    if raw.get("format") == ENCODER_CHECKPOINT_FORMAT:
        arch = str(raw.get("arch", "resnet18"))
        return raw.get(arch, {}), "gigassl"
    for key in CONTAINER_KEYS:
        inner = raw.get(key)
        if isinstance(inner, Mapping) and any(torch.is_tensor(v) for v in inner.values()):
            return inner, key
    return raw, "plain"


def _stem_prefixes(state: Mapping[str, Any]) -> list[str]:
    """Prefixes P with a 4-D ``P + "conv1.weight"`` of 3 input channels (a ResNet stem)."""
    prefixes = []
    for key, value in state.items():
        if key.endswith("conv1.weight") and torch.is_tensor(value) and value.ndim == 4 and value.shape[1] == 3:
            prefix = key[: -len("conv1.weight")]
            if prefix == "" or prefix.endswith("."):
                prefixes.append(prefix)
    preferred = [p for p in prefixes if not any(marker in p for marker in KEY_ENCODER_MARKERS)]
    return sorted(preferred or prefixes)


def _stage_blocks(state: Mapping[str, torch.Tensor]) -> tuple[int, int, int, int]:
    counts = [0, 0, 0, 0]
    for key in state:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)) - 1, int(match.group(2))
            counts[stage] = max(counts[stage], block + 1)
    return counts[0], counts[1], counts[2], counts[3]


def detect_arch(state: Mapping[str, torch.Tensor], label: str) -> str:
    """The architecture of torchvision-named weights, from their block type and counts per stage.

    Stage 4 is not needed to tell the three apart (a missing layer4 is reported as missing keys).
    """
    bottleneck = any(re.match(r"layer1\.\d+\.conv3\.weight$", key) for key in state)
    blocks = _stage_blocks(state)
    for name, spec in ARCHITECTURES.items():
        if (spec.block is Bottleneck) == bottleneck and spec.blocks_per_stage[:3] == blocks[:3]:
            return name
    kind = "bottleneck" if bottleneck else "basic"
    supported = "; ".join(spec.describe() for spec in ARCHITECTURES.values())
    raise UserError(
        f"{label}: a ResNet with {kind} blocks {'-'.join(map(str, blocks))} per stage is not supported; "
        f"supported: {supported} (other networks: export them with torch.export, see docs/encoders.md)"
    )


def _source_of(container: str, prefix: str, raw: Mapping[str, Any]) -> str:
    if container == "gigassl":
        return "gigassl"
    if "encoder_q." in prefix:
        return "moco"
    if container == "state_dict" and ("pytorch-lightning_version" in raw or prefix.startswith("model.")):
        return "lightning"
    return "torchvision"


def find_resnet(raw: Any, label: str) -> FoundResNet:
    """Locate and check the ResNet weights of a loaded checkpoint ``raw`` (``label`` names the file)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{label}: expected a dict of weights, found {type(raw).__name__}")
    state, container = _container(raw)
    prefixes = _stem_prefixes(state)
    if not prefixes:
        tensors = [k for k, v in state.items() if torch.is_tensor(v)]
        raise UserError(
            f"{label}: no ResNet stem (a 'conv1.weight' of shape (64, 3, 7, 7)) among its {len(tensors)} tensors "
            f"({_listing(tensors) or 'none'}); pass a ResNet18/34/50 checkpoint, or export other networks "
            "with torch.export (docs/encoders.md)"
        )
    if len(prefixes) > 1:
        raise UserError(
            f"{label}: holds several ResNets (key prefixes {', '.join(repr(p) for p in prefixes)}); "
            "save the one to use as a plain state dict and pass that file"
        )
    prefix = prefixes[0]
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
    arch = detect_arch(weights, label)
    declared = raw.get("arch") if container == "gigassl" else None
    if declared is not None and declared != arch:
        raise UserError(f"{label}: says arch {declared!r} but its weights are a {arch}; re-save it with save_encoder_checkpoint")
    with torch.device("meta"):  # shapes only: no memory, no random initialisation
        full = build_resnet(arch).state_dict()
    reference = {k: v for k, v in full.items() if not k.startswith("fc.")}
    _check_keys(weights, reference, arch, prefix, label)
    kept = {k: weights[k] for k in reference if k in weights}
    # A plain 1000-class fc (torchvision, this package) is kept as it is; other heads are not read.
    if all(k in weights and weights[k].shape == full[k].shape for k in ("fc.weight", "fc.bias")):
        kept.update({"fc.weight": weights["fc.weight"], "fc.bias": weights["fc.bias"]})
    layout = "/".join(part for part in (container if container != "plain" else "", prefix) if part) or "plain"
    return FoundResNet(
        kept, arch, _source_of(container, prefix, raw), layout, sum(torch.is_tensor(v) for v in state.values()) - len(kept)
    )


def _check_keys(
    weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], arch: str, prefix: str, label: str
) -> None:
    """Raise one line naming the keys the package uses that are absent or of the wrong shape."""
    used = list(reference)
    # BatchNorm's step counters are missing from older torchvision files and are never used here.
    missing = [k for k in used if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(
            f"{label}: {arch} weights under prefix {prefix!r} lack {len(missing)} of the {len(used)} tensors the "
            f"package uses (conv1 … layer4): {_listing([prefix + k for k in missing])}; pass the complete checkpoint"
        )
    wrong = [
        f"{prefix}{k} {tuple(weights[k].shape)} (expected {tuple(reference[k].shape)})"
        for k in used
        if k in weights and weights[k].shape != reference[k].shape
    ]
    if wrong:
        raise UserError(f"{label}: not a standard {arch}: {len(wrong)} tensors of another shape: {_listing(wrong)}")


def load_found(found: FoundResNet) -> ResNet:
    """A ResNet of ``found.arch`` holding ``found.state`` as float32 (eval mode).

    Built on the meta device and filled by assignment, so no random initialisation is spent on
    weights about to be replaced; only a missing ``fc`` (never used) is initialised, with seed 0.
    """
    with torch.device("meta"):
        model = build_resnet(found.arch)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in found.state.items()}
    for key in model.state_dict():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    if "fc.weight" not in state:
        assert isinstance(model.fc, torch.nn.Linear), "a freshly built ResNet has a Linear head"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fc = torch.nn.Linear(model.fc.in_features, model.fc.out_features)
        state["fc.weight"], state["fc.bias"] = fc.weight.detach(), fc.bias.detach()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
