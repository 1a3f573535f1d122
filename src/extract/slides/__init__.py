"""Reading slides: a whole-slide image (OpenSlide formats, DICOM WSI, OME-TIFF, plain images) read
at a resolution in µm/px, its tissue mask at thumbnail scale, and the grid of tiles kept on tissue.
Everything a job needs to go from a slide file to tile coordinates lives here; nothing here
embeds a tile.
"""
