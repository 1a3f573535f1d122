"""A kept classifier: the settings of ``fit``, ``predict`` and ``explain``, the model file they
share (arrays, provenance, checksum), the inputs a fit reads, the survival variant of the fit, and the exact per-tile
attributions with the files that show them.
"""
