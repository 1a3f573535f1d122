"""OME-TIFF slides (``.ome.tif``, ``.ome.tiff``, or any TIFF whose description is OME-XML).

Read with tifffile: the pyramid levels stored as SubIFDs (QuPath, bfconvert) or as further pages,
and µm/px of level 0 from the OME-XML ``PhysicalSizeX`` in its ``PhysicalSizeXUnit`` (µm when
absent), under the same rules as every slide (:func:`extract.slides.reader.resolve_mpp`): without a
physical size the slide needs ``--mpp-csv`` or ``--default-mpp``. Only the tiles (or strips) a
read touches are decoded; a few decoded ones are kept for the neighbouring reads. Brightfield
slides only: 8-bit RGB(A) or grey images; a fluorescence image (many channels, 16 bits) is refused.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from extract.errors import UserError
from extract.slides.reader import SlideReader, SlideReadError, mean_downsamples, read_in_bounds, resolve_mpp

if TYPE_CHECKING:
    import tifffile

OME_EXTRA = "pip install 'gigassl[ome]'"

# Length units of the OME schema (UnitsLength) → µm.
_UNIT_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6}
_CACHED_SEGMENTS = 16  # decoded tiles kept: a tile read touches at most 4, its neighbours share them


def is_ome_tiff(path: Path) -> bool:
    """Whether ``path`` is a TIFF whose first page carries OME-XML."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            return bool(tiff.is_ome)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: the other readers will say why
        return False


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ome_pixel_size_um(xml: str, width: int, height: int) -> tuple[float | None, float | None]:
    """(µm/px, objective magnification) of the OME ``Image`` of size ``width × height`` (the
    first Image when none matches); None for what the XML does not give."""
    root = ElementTree.fromstring(xml)
    images = [e for e in root.iter() if _local(e.tag) == "Image"]
    pixels = [next((c for c in image if _local(c.tag) == "Pixels"), None) for image in images]
    chosen = next((p for p in pixels if p is not None and p.get("SizeX") == str(width) and p.get("SizeY") == str(height)), None)
    chosen = chosen if chosen is not None else next((p for p in pixels if p is not None), None)
    objectives = [e.get("NominalMagnification") for e in root.iter() if _local(e.tag) == "Objective"]
    powers = {float(value) for value in objectives if value}
    magnification = powers.pop() if len(powers) == 1 else None
    if chosen is None or chosen.get("PhysicalSizeX") is None:
        return None, magnification
    unit = chosen.get("PhysicalSizeXUnit", "µm")
    if unit not in _UNIT_UM:
        raise ValueError(f"PhysicalSizeXUnit {unit!r} is not a length unit ({', '.join(_UNIT_UM)})")
    return float(chosen.get("PhysicalSizeX", "nan")) * _UNIT_UM[unit], magnification


class OmeTiffReader(SlideReader):
    """An OME-TIFF pyramid: level 0 and its reduced copies, decoded tile by tile."""

    def __init__(
        self,
        path: Path,
        tiff: tifffile.TiffFile,
        series: tifffile.TiffPageSeries,
        level0_mpp: float,
        mpp_source: str,
        magnification: float | None,
    ) -> None:
        self.path = path
        self._tiff = tiff
        self._pages = [level.keyframe for level in series.levels]
        self.level0_mpp, self.mpp_source = level0_mpp, mpp_source
        self.magnification = magnification
        self._sizes = [(int(page.imagewidth), int(page.imagelength)) for page in self._pages]
        self.dimensions = self._sizes[0]
        self.level_downsamples = mean_downsamples(self._sizes)
        self._segments: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._whole: dict[int, np.ndarray] = {}

    def _segment(self, level: int, index: int) -> np.ndarray:
        """Decoded tile (or strip) ``index`` of ``level``: (rows, columns, samples), edge ones padded."""
        key = (level, index)
        if key in self._segments:
            self._segments.move_to_end(key)
            return self._segments[key]
        page = self._pages[level]
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        rows, columns = int(page.chunks[0]), int(page.chunks[1])
        if count == 0:  # a tile never written (sparse pyramid): background
            decoded = np.full((rows, columns, page.samplesperpixel), 255, dtype=np.uint8)
        else:
            handle = self._tiff.filehandle
            with handle.lock:
                handle.seek(offset)
                data = handle.read(count)
            segment = np.asarray(page.decode(data, index, jpegtables=page.jpegtables)[0])
            decoded = segment.reshape(segment.shape[-3], segment.shape[-2], segment.shape[-1])  # (depth 1, rows, cols, S)
        self._segments[key] = decoded
        if len(self._segments) > _CACHED_SEGMENTS:
            self._segments.popitem(last=False)
        return decoded

    def _crop(self, level: int, left: int, top: int, right: int, bottom: int) -> Image.Image:
        page = self._pages[level]
        if page.planarconfig != 1 and page.samplesperpixel > 1:  # planes stored apart: decode the level once
            if level not in self._whole:
                self._whole[level] = np.asarray(page.asarray()).reshape(page.imagelength, page.imagewidth, -1)
            return _as_image(self._whole[level][top:bottom, left:right])
        rows, columns = int(page.chunks[0]), int(page.chunks[1])
        per_row = int(page.chunked[1])
        out = np.empty((bottom - top, right - left, page.samplesperpixel), dtype=np.uint8)
        for row in range(top // rows, (bottom - 1) // rows + 1):
            for column in range(left // columns, (right - 1) // columns + 1):
                segment = self._segment(level, row * per_row + column)
                y0, x0 = max(top, row * rows), max(left, column * columns)
                y1, x1 = min(bottom, (row + 1) * rows), min(right, (column + 1) * columns)
                out[y0 - top : y1 - top, x0 - left : x1 - left] = segment[
                    y0 - row * rows : y1 - row * rows, x0 - column * columns : x1 - column * columns
                ]
        return _as_image(out)

    def _read_level_region(self, x0: int, y0: int, level: int, width: int, height: int) -> Image.Image:
        downsample = self.level_downsamples[level]
        x, y = math.floor(x0 / downsample), math.floor(y0 / downsample)
        return read_in_bounds(lambda *box: self._crop(level, *box), self._sizes[level], x, y, width, height)

    def close(self) -> None:
        self._tiff.close()


def _as_image(array: np.ndarray) -> Image.Image:
    if array.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(array[:, :, 0]), "L")
    return Image.fromarray(np.ascontiguousarray(array[:, :, :4] if array.shape[2] >= 4 else array[:, :, :3]))


class MissingCodecError(SlideReadError, UserError):
    """An OME-TIFF compressed with a codec tifffile decodes only through imagecodecs, not installed."""


def _check_decodable(path: Path, reader: OmeTiffReader) -> None:
    """Decode the first tile now, so that a missing codec is one line at open, not a failure per tile."""
    try:
        reader._segment(0, 0)
    except Exception as error:  # noqa: BLE001 - tifffile and its codecs raise many types
        if "imagecodecs" in str(error):
            raise MissingCodecError(f"{path}: {error}; {OME_EXTRA}") from error
        raise SlideReadError(f"{path}: cannot decode its first tile ({error}); is the file complete?") from error


def _check_brightfield(path: Path, series: tifffile.TiffPageSeries) -> None:
    axes, dtype = series.axes, series.dtype
    samples = dict(zip(axes, series.shape)).get("S", 1)
    extra = [axis for axis, size in zip(axes, series.shape) if axis not in "YXS" and size > 1]
    if dtype != np.uint8 or samples not in (1, 3, 4) or extra:
        raise SlideReadError(
            f"{path}: an OME-TIFF image of axes {axes}, shape {series.shape}, {dtype}: gigassl reads brightfield slides "
            "only (8-bit RGB or grey, one plane); export the RGB image"
        )


def open_ome_tiff(path: Path, mpp_override: float | None = None, *, default_mpp: float | None = None) -> OmeTiffReader:
    """Open the largest image of an OME-TIFF with its pyramid. Raises :class:`SlideReadError`
    naming the file (unreadable, not brightfield, a bad unit) or :class:`~extract.slides.reader.MissingMppError`."""
    import tifffile

    try:
        tiff = tifffile.TiffFile(path)
    except Exception as error:  # noqa: BLE001 - tifffile raises many types for a broken file
        raise SlideReadError(f"{path}: tifffile cannot open this OME-TIFF ({error})") from error
    try:
        series = max(tiff.series, key=lambda s: int(np.prod(s.levels[0].keyframe.shape[:2])))
        _check_brightfield(path, series)
        page = series.levels[0].keyframe
        try:
            mpp, magnification = ome_pixel_size_um(tiff.ome_metadata or "", int(page.imagewidth), int(page.imagelength))
        except (ValueError, ElementTree.ParseError) as error:
            raise SlideReadError(f"{path}: its OME-XML cannot give the pixel size ({error}); fix it or give --mpp-csv") from error
        level0_mpp, origin = resolve_mpp(path, mpp, "the OME-XML PhysicalSizeX", mpp_override, default_mpp)
        reader = OmeTiffReader(path, tiff, series, level0_mpp, origin, magnification)
        if page.planarconfig == 1 or page.samplesperpixel == 1:
            _check_decodable(path, reader)
        return reader
    except BaseException:
        tiff.close()
        raise
