"""DICOM whole-slide images: one ``.dcm`` file, or a folder holding the instances of one series.

OpenSlide (4.0 and later) reads a DICOM WSI when its transfer syntax is one it decodes (JPEG,
JPEG 2000, uncompressed); anything else it refuses (RLE, JPEG-LS, lossless JPEG …) is read with
`wsidicom` when installed (``pip install 'gigassl[dicom]'``). µm/px of level 0 comes from the
pixel spacing (DICOM PixelSpacing, in mm: × 1000), under the same rules as every slide
(:func:`extract.slides.reader.resolve_mpp`). A file or folder that neither library reads is refused in
one line that says what was tried.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from extract.errors import UserError, one_line
from extract.slides.reader import (
    DICOM_SUFFIXES,
    SlideReader,
    SlideReadError,
    mean_downsamples,
    openslide_reader,
    read_in_bounds,
    resolve_mpp,
)

if TYPE_CHECKING:
    from wsidicom import WsiDicom  # no type hints of its own: Any to mypy

DICOM_EXTRA = "pip install 'gigassl[dicom]'"
_PREAMBLE_BYTES = 128  # a DICOM file (Part 10) is a 128-byte preamble, then "DICM"


class DicomReadError(SlideReadError, UserError):
    """A DICOM file or folder that no reader accepts; the message says what was tried."""


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (preamble, then ``DICM``)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_PREAMBLE_BYTES + 4)
    except OSError:
        return False
    return head[_PREAMBLE_BYTES:] == b"DICM"


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def is_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` is one DICOM slide: a ``.dcm`` file among its files, or a first file
    (by name) that is DICOM. Only its own files are looked at, and at most one is opened, so a
    MIRAX data folder or any other sub-folder costs a listing."""
    try:
        files = _visible_files(folder)
    except OSError:
        return False
    if any(p.suffix.lower() in DICOM_SUFFIXES for p in files):
        return True
    return bool(files) and is_dicom_file(files[0])


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of ``folder`` (by extension or content), sorted; DICOMDIR left out."""
    return [
        p
        for p in _visible_files(folder)
        if p.name.upper() != "DICOMDIR" and (p.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(p))
    ]


class WsiDicomReader(SlideReader):
    """A DICOM WSI read with wsidicom (the volume pyramid; label and overview left out)."""

    def __init__(self, path: Path, slide: WsiDicom, level0_mpp: float, mpp_source: str, magnification: float | None) -> None:
        self.path = path
        self._slide = slide
        self._levels = list(slide.levels)
        self.level0_mpp, self.mpp_source = level0_mpp, mpp_source
        self.magnification = magnification
        sizes = [(int(level.size.width), int(level.size.height)) for level in self._levels]
        self._sizes = sizes
        self.dimensions = sizes[0]
        self.level_downsamples = mean_downsamples(sizes)

    def _read_level_region(self, x0: int, y0: int, level: int, width: int, height: int) -> Image.Image:
        downsample = self.level_downsamples[level]
        x, y = math.floor(x0 / downsample), math.floor(y0 / downsample)
        scale = self._levels[level].level  # wsidicom names a level by log2 of its scale, not its index

        def crop(left: int, top: int, right: int, bottom: int) -> Image.Image:
            return self._slide.read_region((left, top), scale, (right - left, bottom - top))

        return read_in_bounds(crop, self._sizes[level], x, y, width, height)

    def close(self) -> None:
        self._slide.close()


def _pixel_spacing_mpp(slide: WsiDicom) -> float | None:
    """µm/px of the base level from its PixelSpacing (mm), or None when absent or not positive."""
    try:
        spacing = slide.levels[0].pixel_spacing
        value = float(spacing.width) * 1000.0
    except Exception:  # noqa: BLE001 - wsidicom raises several types for a missing spacing
        return None
    return value if value > 0 and math.isfinite(value) else None


def _objective_power(slide: WsiDicom) -> float | None:
    try:
        for optical_path in slide.metadata.optical_paths:
            power = optical_path.objective.objective_power
            if power:
                return float(power)
    except Exception:  # noqa: BLE001 - optional metadata: absent or malformed just means unknown
        return None
    return None


def _open_with_wsidicom(
    path: Path, files: list[Path], mpp_override: float | None, default_mpp: float | None, tried: str
) -> WsiDicomReader:
    try:
        from wsidicom import WsiDicom
    except ImportError:
        raise DicomReadError(f"{path}: {tried}; reading it needs wsidicom, which is not installed: {DICOM_EXTRA}") from None
    try:
        slide = WsiDicom.open(files if len(files) > 1 else files[0])
    except Exception as error:  # noqa: BLE001 - wsidicom and pydicom raise many types for "not a WSI"
        raise DicomReadError(
            f"{path}: not a DICOM whole-slide image that OpenSlide or wsidicom reads ({tried}; "
            f"wsidicom: {one_line(error)}); is it a complete VL Whole Slide Microscopy series?"
        ) from error
    try:
        mpp, origin = resolve_mpp(path, _pixel_spacing_mpp(slide), "the DICOM pixel spacing", mpp_override, default_mpp)
    except SlideReadError:
        slide.close()
        raise
    return WsiDicomReader(path, slide, mpp, origin, _objective_power(slide))


def open_dicom(path: Path, mpp_override: float | None = None, *, default_mpp: float | None = None) -> SlideReader:
    """Open a DICOM WSI (a ``.dcm`` file, or a folder of the instances of one series) with
    OpenSlide, else wsidicom. Raises :class:`DicomReadError` (one line: what was tried) or
    :class:`~extract.slides.reader.MissingMppError`."""
    if path.is_dir():
        try:
            files = dicom_files(path)
        except OSError as error:
            raise DicomReadError(f"{path}: the folder cannot be read ({one_line(error)}); make it readable") from error
        if not files:
            raise DicomReadError(f"{path}: a folder with no DICOM file; a folder is a slide only when it holds DICOM instances")
    else:
        files = [path]
    import openslide

    # OpenSlide opens a series from any one of its files and finds the others beside it.
    try:
        handle = openslide.OpenSlide(str(files[0]))
    except openslide.OpenSlideError as error:  # unsupported transfer syntax, or not a WSI at all
        tried = f"OpenSlide: {one_line(error)}"
    else:
        return openslide_reader(path, handle, mpp_override, default_mpp)
    return _open_with_wsidicom(path, files, mpp_override, default_mpp, tried)
