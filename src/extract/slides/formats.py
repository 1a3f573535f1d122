"""Which reader opens a slide file: :func:`open_slide`, the one entry point to every format.

A DICOM file or a folder of DICOM instances goes to :mod:`extract.slides.dicom` (OpenSlide, then
wsidicom), an OME-TIFF to :mod:`extract.slides.ome` (tifffile, its pyramid and OME-XML pixel size),
any other file to OpenSlide, then Pillow (:mod:`extract.slides.reader`, which also holds the
:class:`~extract.slides.reader.SlideReader` interface every format implements).
"""

from __future__ import annotations

from pathlib import Path

from extract.slides.dicom import is_dicom_file, open_dicom
from extract.slides.ome import is_ome_tiff, open_ome_tiff
from extract.slides.reader import DICOM_SUFFIXES, SlideReader, SlideReadError, check_readable, open_openslide_or_image


def open_slide(path: str | Path, mpp_override: float | None = None, *, default_mpp: float | None = None) -> SlideReader:
    """Open a slide: a DICOM file or folder (:mod:`extract.slides.dicom`), an OME-TIFF
    (:mod:`extract.slides.ome`), else OpenSlide formats first, then Pillow for plain images.

    ``mpp_override`` wins over the metadata; ``default_mpp`` is used only when the metadata
    has none. Raises :class:`~extract.slides.reader.SlideReadError` (or
    :class:`~extract.slides.reader.MissingMppError`) naming the file.
    """
    path = Path(path)
    if path.is_dir():
        return open_dicom(path, mpp_override, default_mpp=default_mpp)
    if not path.is_file():
        raise SlideReadError(f"{path}: no such file")
    check_readable(path)
    if path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path):
        return open_dicom(path, mpp_override, default_mpp=default_mpp)
    if path.suffix.lower() in (".tif", ".tiff") and is_ome_tiff(path):
        return open_ome_tiff(path, mpp_override, default_mpp=default_mpp)
    return open_openslide_or_image(path, mpp_override, default_mpp)
