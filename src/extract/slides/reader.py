"""Reading slides at a resolution in µm/px: OpenSlide formats, DICOM WSI, OME-TIFF and plain images.

Tiles are asked for by their level-0 footprint (top-left x, y and side in level-0 pixels) and
an output size in pixels. The reader takes the pyramid level closest to but finer than the
target and resizes down, so the result is at the requested µm/px whatever the pyramid holds
(never chosen by pyramid index). Transparent and out-of-bounds pixels come back white.

µm/px of level 0 comes, in order, from an explicit override (the ``--mpp-csv`` entry), the
slide's metadata, then a default (``--default-mpp``); a slide with none of them is refused.

This module holds the :class:`SlideReader` interface, the µm/px rules and the formats read by
OpenSlide or Pillow; :func:`extract.slides.formats.open_slide` chooses the reader of a file (DICOM
and OME-TIFF have modules of their own, which build on this one).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from extract.errors import UserError

if TYPE_CHECKING:
    import openslide

logger = logging.getLogger(__name__)

PLAIN_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})
OPENSLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi"})
DICOM_SUFFIXES = frozenset({".dcm"})  # a folder of DICOM instances is a slide too (extract.batch.slide_list)
SLIDE_SUFFIXES = PLAIN_IMAGE_SUFFIXES | OPENSLIDE_SUFFIXES | DICOM_SUFFIXES
# A relative tolerance so that a level whose downsample equals the target up to rounding
# (e.g. 4.0002 for a target of 4) still counts as "not coarser than the target".
_LEVEL_TOLERANCE = 1e-3
# A tile whose footprint at the read level is within this fraction of the output size is read
# at the output size, not resampled: e.g. a 20× Aperio slide at 0.499 µm/px read for 0.5 µm/px
# (224.4 → 224 px). A scale error under 1 % is below scanners' own µm/px calibration error,
# while bilinear resampling by it would blur every pixel and cost a third of the read.
RESAMPLE_TOLERANCE = 0.01


class SlideReadError(UserError):
    """A file that cannot be opened or read as a slide; the message names the file."""


class MissingMppError(SlideReadError):
    """A slide whose µm/px is neither in its metadata nor given by the user."""


def _missing_mpp(path: Path) -> MissingMppError:
    return MissingMppError(
        f"{path}: no µm/px in the slide's metadata; give it per slide with --mpp-csv "
        f"(CSV columns slide,mpp with slide={path.stem}) or for all such slides with --default-mpp"
    )


class SlideReader:
    """An open slide (context manager). Subclasses provide the pyramid and region reads.

    Attributes: ``path``, ``slide_id`` (file stem), ``level0_mpp`` (µm/px of level 0), ``mpp_source``
    (where that value came from, for messages: "--mpp-csv", "--default-mpp", "the TIFF
    resolution tag" …), ``dimensions`` (level-0 width, height), ``magnification`` (objective
    power or None), ``level_downsamples`` (one float per pyramid level, level 0 first).
    """

    path: Path
    level0_mpp: float
    mpp_source: str = "the caller"
    dimensions: tuple[int, int]
    magnification: float | None
    level_downsamples: tuple[float, ...]

    @property
    def slide_id(self) -> str:
        return self.path.stem

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release the file."""

    def _read_level_region(self, x0: int, y0: int, level: int, width: int, height: int) -> Image.Image:
        """RGB(A) image of ``width × height`` level pixels whose top-left is level-0 (x0, y0)."""
        raise NotImplementedError

    def _stored_thumbnail(self, downsample: float) -> Image.Image | None:
        """A whole-slide preview stored in the file, at least as fine as ``downsample``, or None."""
        return None

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (level 0 at worst)."""
        fine_enough = [
            (level_downsample, level)
            for level, level_downsample in enumerate(self.level_downsamples)
            if level_downsample <= downsample * (1 + _LEVEL_TOLERANCE)
        ]
        return max(fine_enough)[1] if fine_enough else 0

    def read_tile(self, x0: int, y0: int, size_level0: float, out_px: int) -> np.ndarray:
        """The square of side ``size_level0`` level-0 px at (x0, y0), as (out_px, out_px, 3) uint8 RGB."""
        downsample = size_level0 / out_px
        level = self.best_level(downsample)
        size_level = size_level0 / self.level_downsamples[level]
        if abs(size_level / out_px - 1.0) <= RESAMPLE_TOLERANCE:
            size_level = float(out_px)  # see RESAMPLE_TOLERANCE
        read_px = max(1, math.ceil(size_level - 1e-6))
        try:
            region = self._read_level_region(int(x0), int(y0), level, read_px, read_px)
        except SlideReadError:
            raise
        except Exception as error:  # noqa: BLE001 - OpenSlide/Pillow raise many types for one meaning
            raise SlideReadError(f"{self.path}: cannot read a tile at ({x0}, {y0}) level {level}: {error}") from error
        region = _flatten_on_white(region)
        if read_px != out_px or abs(size_level - read_px) > 1e-6:
            # The box crops the exact fractional footprint before resampling.
            region = region.resize((out_px, out_px), Image.Resampling.BILINEAR, box=(0, 0, size_level, size_level))
        return np.array(region, dtype=np.uint8)

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole slide with its longer side at most ``max_side`` px.

        Returns (H, W, 3) uint8 RGB and the downsample (level-0 px per thumbnail px).
        """
        width, height = self.dimensions
        downsample = max(width, height) / max_side if max(width, height) > max_side else 1.0
        out_w, out_h = max(1, round(width / downsample)), max(1, round(height / downsample))
        level = self.best_level(downsample)
        level_downsample = self.level_downsamples[level]
        region = self._stored_thumbnail(downsample) if level_downsample * 2 < downsample else None
        if region is None:
            read_w = max(1, math.ceil(width / level_downsample))
            read_h = max(1, math.ceil(height / level_downsample))
            try:
                region = self._read_level_region(0, 0, level, read_w, read_h)
            except SlideReadError:
                raise
            except Exception as error:  # noqa: BLE001
                raise SlideReadError(f"{self.path}: cannot read level {level} for the thumbnail: {error}") from error
        region = _flatten_on_white(region)
        if region.size != (out_w, out_h):
            region = region.resize((out_w, out_h), Image.Resampling.BILINEAR)
        return np.array(region, dtype=np.uint8), width / out_w


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB image; transparent pixels (outside the scanned area) become white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:
            return rgba.convert("RGB")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def read_in_bounds(
    crop: Callable[[int, int, int, int], Image.Image], bounds: tuple[int, int], x0: int, y0: int, width: int, height: int
) -> Image.Image:
    """The ``width × height`` region at (x0, y0) of an image of size ``bounds`` (width, height):
    ``crop(left, top, right, bottom)`` reads the part inside, white fills the rest."""
    image_w, image_h = bounds
    if x0 >= 0 and y0 >= 0 and x0 + width <= image_w and y0 + height <= image_h:
        return crop(x0, y0, x0 + width, y0 + height)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    left, top = max(x0, 0), max(y0, 0)
    right, bottom = min(x0 + width, image_w), min(y0 + height, image_h)
    if right > left and bottom > top:
        canvas.paste(_flatten_on_white(crop(left, top, right, bottom)), (left - x0, top - y0))
    return canvas


def mean_downsamples(sizes: Sequence[tuple[int, int]]) -> tuple[float, ...]:
    """Per level, the mean of the width and height ratios to level 0 (OpenSlide's rule, so that a
    slide read by another library picks the same levels)."""
    width0, height0 = sizes[0]
    return tuple((width0 / width + height0 / height) / 2 for width, height in sizes)


class OpenSlideReader(SlideReader):
    """A pyramidal slide read through OpenSlide."""

    def __init__(
        self,
        path: Path,
        handle: openslide.OpenSlide,
        level0_mpp: float,
        magnification: float | None,
        mpp_source: str = "the slide metadata",
    ) -> None:
        self.path = path
        self._slide = handle
        self.level0_mpp, self.mpp_source = level0_mpp, mpp_source
        self.magnification = magnification
        self.dimensions = (int(handle.dimensions[0]), int(handle.dimensions[1]))
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)

    def _read_level_region(self, x0: int, y0: int, level: int, width: int, height: int) -> Image.Image:
        return self._slide.read_region((x0, y0), level, (width, height))

    def _stored_thumbnail(self, downsample: float) -> Image.Image | None:
        # Slides without a coarse pyramid level (e.g. small single-level SVS) would otherwise be
        # decoded whole for the tissue mask; the scanner's own thumbnail is used instead when it
        # shows the same field (same aspect ratio) at least as finely as needed.
        try:
            image = self._slide.associated_images.get("thumbnail")
        except Exception:  # noqa: BLE001 - a broken associated image just means "not usable"
            return None
        if image is None:
            return None
        width, height = self.dimensions
        same_field = abs(image.width / image.height - width / height) <= 0.01 * width / height
        if not same_field or width / image.width > downsample:
            return None
        return image

    def close(self) -> None:
        self._slide.close()


class ImageReader(SlideReader):
    """A plain image (jpg, png, single-level tif) held in memory as RGB; one level."""

    def __init__(self, path: Path, image: Image.Image, level0_mpp: float, mpp_source: str = "the caller") -> None:
        self.path = path
        self._image = image
        self.level0_mpp, self.mpp_source = level0_mpp, mpp_source
        self.magnification = None
        self.dimensions = (int(image.width), int(image.height))
        self.level_downsamples = (1.0,)

    def _read_level_region(self, x0: int, y0: int, level: int, width: int, height: int) -> Image.Image:
        return read_in_bounds(lambda *box: self._image.crop(box), self._image.size, x0, y0, width, height)

    def close(self) -> None:
        self._image.close()


def _metadata_mpp(properties: Mapping[str, str]) -> float | None:
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            value = float(properties[key])
        except (KeyError, ValueError):
            continue
        if value > 0 and math.isfinite(value):
            return value
    return None


def _metadata_origin(properties: Mapping[str, str]) -> str:
    """Where OpenSlide's ``openslide.mpp-x`` came from, in words."""
    vendor = properties.get("openslide.vendor", "")
    if vendor == "generic-tiff" or (not vendor and "tiff.XResolution" in properties):
        return "the TIFF resolution tag"
    if vendor == "dicom":
        return "the DICOM pixel spacing"
    return f"the {vendor} metadata" if vendor else "the slide metadata"


def _metadata_magnification(properties: Mapping[str, str]) -> float | None:
    try:
        value = float(properties["openslide.objective-power"])
    except (KeyError, ValueError):
        return None
    return value if value > 0 else None


def _check_mpp(path: Path, value: float, origin: str) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise SlideReadError(f"{path}: µm/px {value!r} from {origin} is not a positive number; fix {origin}")
    return float(value)


def check_readable(path: Path) -> None:
    """Raise :class:`SlideReadError` naming the real cause (permission denied, I/O error …) when
    ``path`` cannot be read: OpenSlide would call any such file "not a slide format"."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        cause = error.strerror or str(error)
        fix = (
            "make it readable (chmod a+r) or move it out of the folder"
            if isinstance(error, PermissionError)
            else "check the disk"
        )
        raise SlideReadError(f"{path}: cannot be read: {cause.lower()}; {fix}") from error


def resolve_mpp(
    path: Path, metadata_mpp: float | None, metadata_origin: str, mpp_override: float | None, default_mpp: float | None
) -> tuple[float, str]:
    """µm/px of level 0 and where it came from: ``mpp_override`` (--mpp-csv), else the metadata,
    else ``default_mpp`` (--default-mpp); raises :class:`MissingMppError` when there is none."""
    if mpp_override is not None:
        return _check_mpp(path, mpp_override, "--mpp-csv"), "--mpp-csv"
    if metadata_mpp is not None:
        return _check_mpp(path, metadata_mpp, metadata_origin), metadata_origin
    if default_mpp is not None:
        return _check_mpp(path, default_mpp, "--default-mpp"), "--default-mpp"
    raise _missing_mpp(path)


def openslide_reader(
    path: Path, handle: openslide.OpenSlide, mpp_override: float | None, default_mpp: float | None
) -> OpenSlideReader:
    """An :class:`OpenSlideReader` over an open ``openslide.OpenSlide`` (closed when refused)."""
    try:
        mpp, origin = resolve_mpp(
            path, _metadata_mpp(handle.properties), _metadata_origin(handle.properties), mpp_override, default_mpp
        )
    except SlideReadError:
        handle.close()
        raise
    return OpenSlideReader(path, handle, mpp, _metadata_magnification(handle.properties), mpp_source=origin)


def open_openslide_or_image(path: Path, mpp_override: float | None, default_mpp: float | None) -> SlideReader:
    """A file OpenSlide opens, else a plain image Pillow opens (the formats of this module); raises
    :class:`SlideReadError` (or :class:`MissingMppError`) naming the file."""
    import openslide

    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        handle = None
    except openslide.OpenSlideError as error:
        raise SlideReadError(f"{path}: OpenSlide cannot open this file ({error}); is it a complete slide?") from error
    if handle is not None:
        return openslide_reader(path, handle, mpp_override, default_mpp)
    return _image_reader(path, mpp_override, default_mpp)


def _image_reader(path: Path, mpp_override: float | None, default_mpp: float | None) -> ImageReader:
    """A file OpenSlide refused, read whole by Pillow when its suffix is a plain image's."""
    if path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        raise SlideReadError(
            f"{path}: not a slide format OpenSlide or Pillow reads (plain images: {', '.join(sorted(PLAIN_IMAGE_SUFFIXES))})"
        )
    try:
        image = Image.open(path)
        image.load()
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for "not an image"
        raise SlideReadError(f"{path}: neither OpenSlide nor Pillow can read this file ({error})") from error
    try:
        mpp, origin = resolve_mpp(path, None, "", mpp_override, default_mpp)
    except SlideReadError:
        image.close()
        raise
    rgb = _flatten_on_white(image)
    if rgb is not image:
        image.close()
    return ImageReader(path, rgb, mpp, mpp_source=origin)


def load_mpp_overrides(path: str | Path) -> dict[str, float]:
    """Read a CSV with columns ``slide,mpp``; keys are slide stems (a file name is reduced to its stem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mpp-csv {path} does not exist")
    overrides: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower() for name in (reader.fieldnames or [])}
        if not {"slide", "mpp"} <= columns:
            raise UserError(f"--mpp-csv {path}: needs columns 'slide,mpp', found {sorted(columns)}")
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            name = row["slide"]
            if not name:
                continue
            try:
                value = float(row["mpp"])
            except ValueError:
                raise UserError(f"--mpp-csv {path} line {line}: mpp {row['mpp']!r} is not a number") from None
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"--mpp-csv {path} line {line}: mpp {value} must be positive")
            stem = Path(name).stem if Path(name).suffix.lower() in SLIDE_SUFFIXES else name
            overrides[stem] = value
    return overrides
