"""Which weights the sparse head of Giga-SSL training starts from (the ``--init`` policy).

Features of a ResNet tile encoder (R18/R34/R50): that network's own layer4 — ``--init`` when
given (a checkpoint path, ``random`` or ``random:ARCH``), else the encoder recorded in the
feature files, which can be re-created only when it was random (``load_resnet`` with the
extraction's seed, recorded in the files' settings). Features of any other encoder (an exported program):
the generic head of :class:`~gigassl.model.HeadSpec`, randomly initialised, unless ``--init``
names a ResNet whose layer4 takes features of their width.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from extract.encoders.tile_encoder import ARCHITECTURES, EncoderInfo, ResNet, load_resnet
from extract.errors import UserError
from gigassl.model import HeadSpec

log = logging.getLogger(__name__)


def resnet_of(encoder: EncoderInfo) -> Optional[str]:
    """The ResNet architecture of a tile encoder whose features are that ResNet's trunk, else None."""
    spec = ARCHITECTURES.get(encoder.arch)
    if spec is None or encoder.source == "export" or encoder.width != spec.trunk_width:
        return None
    return encoder.arch


def initial_head(
    init: Optional[str], encoder: EncoderInfo, features: Path | str, extraction_seed: int = 0
) -> tuple[Optional[ResNet], HeadSpec, Optional[EncoderInfo]]:
    """(the ResNet whose dense layer4 initialises the sparse head or None, the head, its provenance).

    ``init``: the ``--init`` setting; ``encoder``: the tile encoder recorded in the feature
    files of the folder ``features`` (named in the errors); ``extraction_seed``: the seed
    `gigassl extract` drew a random tile encoder with. See the module docstring.
    """
    width = encoder.width
    arch = resnet_of(encoder)
    if init is not None and not (arch is None and init == "random"):
        source = f"random:{arch}" if init == "random" and arch is not None else init
        resnet, info = load_resnet(source)
        if resnet.trunk_width != width:
            raise UserError(
                f"--init {init}: its {info.arch} layer4 takes {resnet.trunk_width}-d tile features, but the "
                f"features in {features} are {width}-d ({encoder.name}); pass the checkpoint of the "
                "encoder that embedded them" + (", or --init random for a randomly initialised head" if arch is None else "")
            )
        if info.sha256 != encoder.sha256:
            log.warning(
                "layer4 initialised from %s (sha256 %.12s) while the features were embedded by %s (sha256 %.12s)",
                info.name,
                info.sha256,
                encoder.name,
                encoder.sha256,
            )
        return resnet, HeadSpec.of_layer4(resnet.layer4), info
    if arch is None:
        log.info(
            "features of %s (%s, %d-d) are not a ResNet trunk's: training a randomly initialised %d-channel sparse head",
            encoder.name,
            encoder.arch,
            width,
            width,
        )
        return None, HeadSpec.generic(width), None
    if encoder.name != "random" and not encoder.name.startswith("random:"):
        raise UserError(
            f"the features in {features} were embedded by the tile encoder {encoder.name!r} "
            f"(sha256 {encoder.sha256[:12]}…); pass --init PATH to that checkpoint so that its "
            "layer4 initialises the sparse layer4 (or --init random)"
        )
    for seed in dict.fromkeys((extraction_seed, 0)):  # the extraction's seed, then the default seed 0
        resnet, info = load_resnet(encoder.name, seed=seed)
        if info.sha256 == encoder.sha256:
            return resnet, HeadSpec.of_layer4(resnet.layer4), info
    raise UserError(
        f"the features in {features} say encoder {encoder.name!r} with sha256 {encoder.sha256[:12]}…, "
        f"but load_resnet({encoder.name!r}) with seed {extraction_seed} or 0 gives another network; they were embedded "
        "with another seed or torch version. Pass --init random to accept a different random layer4, or --init PATH"
    )
