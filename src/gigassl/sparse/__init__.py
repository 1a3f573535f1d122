"""Sparse maps of tiles and the networks over them: the map of a slide's tiles on its grid with
slide-level augmentation and batching, the sparse 3×3 convolutions (spconv or pure PyTorch,
one module owns the choice), and a ResNet's layer4 rebuilt over those convolutions.
"""
