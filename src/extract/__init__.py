"""Stage 1 of Giga-SSL: tile-level work on whole-slide images.

Slides are read at a resolution in µm/px, masked for tissue, cut into a tile grid and
embedded with a tile encoder: a ResNet18/34/50 trunk (conv1 … layer3 + spatial mean, 256-d
or 1024-d) or any network exported with torch.export (:mod:`extract.encoders.tile_encoder`). For each slide
one HDF5 file holds the plain tile features and a bank of shared tile augmentations.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gigassl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
