"""Tile encoders: the ResNet18/34/50 definitions with torchvision's parameter names, the trunk
cut before layer4 that stage 1 runs on every tile, the loading of published checkpoints of any
layout, and ``torch.export``-ed foundation models. A slide's provenance records which encoder
was used (:class:`~extract.encoders.tile_encoder.EncoderInfo`).
"""
