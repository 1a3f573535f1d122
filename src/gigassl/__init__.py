"""Stage 2 of Giga-SSL: slide-level self-supervised learning on sparse maps of tiles.

Reads the per-slide HDF5 files written by :mod:`extract`, trains the tile encoder's own
layer4 (ResNet18/34/50; a randomly initialised head of the features' width for other encoders)
as a submanifold sparse convolutional network with NT-Xent, and turns slides into compact
embeddings for few-label classification.
"""

from extract import __version__
from gigassl.quiet_warnings import silence_third_party_warnings

silence_third_party_warnings()  # before anything imports spconv

__all__ = ["__version__"]
