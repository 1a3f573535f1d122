"""Feature files of every layout: the per-slide HDF5 file stage 1 writes (plain features and the
augmented bank), random access to its bank chunks for training, the manifest of a features
folder, and the reading of plain tile features from gigassl, TRIDENT or CLAM files. Both stages
read features only through this package.
"""
