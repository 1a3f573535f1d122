"""Which loader a tile encoder goes to: :func:`load_encoder`, the one entry point to both kinds.

``"random[:ARCH]"`` and ResNet checkpoints of any published layout are read by
:mod:`extract.encoders.tile_encoder` (:func:`~extract.encoders.tile_encoder.load_resnet`), a ``.pt2``
program by :mod:`extract.encoders.exported`; both come back as a
:class:`~extract.encoders.tile_encoder.LoadedEncoder` (trunk, provenance, and the ResNet when there is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from extract.encoders.tile_encoder import IMAGE_MEAN, IMAGE_STD, EncoderInfo, LoadedEncoder, TileTrunk, load_resnet
from extract.errors import UserError


def load_encoder(
    source: str | Path,
    seed: int = 0,
    *,
    input_size_px: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedEncoder:
    """Any tile encoder: ``"random[:ARCH]"``, a ResNet checkpoint, or a ``.pt2`` exported program.

    ``input_size_px``, ``mean``, ``std`` override the encoder's preprocessing (a ``.pt2``
    program's sidecar JSON, else ImageNet statistics and any size for the ResNets).
    """
    if input_size_px is not None and input_size_px < 16:
        raise UserError(f"--encoder-input-size-px {input_size_px}: must be at least 16 px")
    if str(source).endswith(".pt2"):
        from extract.encoders.exported import load_exported  # torch.export is imported only when used

        return LoadedEncoder(*load_exported(Path(source), input_size_px=input_size_px, mean=mean, std=std))
    model, info = load_resnet(source, seed)
    mean, std = tuple(mean or IMAGE_MEAN), tuple(std or IMAGE_STD)
    trunk = TileTrunk(model, mean, std, input_size_px).eval()
    info = EncoderInfo(info.name, info.sha256, info.source, info.arch, info.width, info.layout, input_size_px or 0, mean, std)
    return LoadedEncoder(trunk, info, model)
