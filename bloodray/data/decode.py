"""Turning image bytes into an RGB picture, defensively.

Archives contain whatever the scanner or an export tool wrote, so every
failure becomes an :class:`ImageDecodeError` with a stable ``kind`` (one of
:data:`FAILURE_KINDS`) that callers write to their errors table instead of
failing the job.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np

from PIL import Image, ImageFile, UnidentifiedImageError

#: Pixel limit per image (width x height) before full decoding. CellaVision crops
#: are ~0.13 MP; anything far larger is a scan mistake or a decompression bomb.
DEFAULT_MAX_PIXELS = 25_000_000

#: PIL modes we convert to RGB. Others (16-bit, float, ...) are not microscope
#: photographs and are refused rather than silently mis-scaled.
SUPPORTED_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "RGBX"})

#: Every value :attr:`ImageDecodeError.kind` can take.
FAILURE_KINDS = ("empty", "truncated", "not_image", "corrupt", "unsupported_mode", "too_large", "not_a_cell_image",
                 "decode_budget")

#: Defaults of :class:`DecodeBudget` (the nightly job's ``limits.max_decode_work`` and ``limits.decode_timeout_s``).
#: Work is pixels x JPEG scans: a PBC crop costs ~0.13 M (baseline, one scan), a 25 MP progressive photo with
#: libjpeg's 10 scans 250 M; a 6 MB JPEG repeating a tiny scan 500,000 times costs 65,000 M. A PBC crop decodes
#: in a few milliseconds.
DEFAULT_MAX_DECODE_WORK = 400_000_000
DEFAULT_DECODE_TIMEOUT_S = 10.0

#: Defaults of :class:`CellImageLimits` (the nightly job's ``limits.*`` keys). Real crops are far inside them:
#: PBC crops are 360-366 px with a grey-level standard deviation of at least 18.7 (Chula: at least 168 px and 7.8,
#: but for one 10 x 10 px fragment); blank or placeholder images have a deviation near 0 (bench/input_reads.py).
DEFAULT_MIN_SIDE_PX = 24
DEFAULT_MAX_SIDE_PX = 2048
DEFAULT_MAX_ASPECT_RATIO = 3.0
DEFAULT_MIN_CONTRAST = 2.0


@dataclass
class PixelLimit:
    """The decoding limit every job shares (``data.max_pixels`` of training, ``limits.max_pixels`` of the nightly
    job): declared once here."""

    #: images with more pixels (width x height) are refused before decoding (error ``too_large``).
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self, prefix: str) -> None:
        if self.max_pixels < 1:
            from bloodray.config import ConfigError

            raise ConfigError(f"{prefix}.max_pixels: must be >= 1, got {self.max_pixels}")


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; ``kind`` is one of :data:`FAILURE_KINDS`."""

    def __init__(self, kind: str, message: str):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown decode failure kind {kind!r}; expected one of {', '.join(FAILURE_KINDS)}")
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class CellImageLimits:
    """What a picture of one cell looks like; anything else is refused as ``not_a_cell_image``.

    A 1x1 px placeholder, a 5000 x 4999 blank page or a near-constant image
    would otherwise be classified (with high confidence) and counted in a
    differential. ``min_contrast`` is the standard deviation of the grey
    levels (0-255) of the resized image.
    """

    min_side_px: int = DEFAULT_MIN_SIDE_PX
    max_side_px: int = DEFAULT_MAX_SIDE_PX
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    min_contrast: float = DEFAULT_MIN_CONTRAST

    def check_size(self, width: int, height: int) -> None:
        """Raise ``not_a_cell_image`` for a picture too small, too large or too elongated for a cell crop."""
        short, long = sorted((width, height))
        if short < self.min_side_px:
            raise ImageDecodeError("not_a_cell_image", f"{width}x{height} px: a side is below {self.min_side_px} px "
                                                       "(limits.min_side_px)")
        if long > self.max_side_px:
            raise ImageDecodeError("not_a_cell_image", f"{width}x{height} px: a side is above {self.max_side_px} px "
                                                       "(limits.max_side_px)")
        if long / short > self.max_aspect_ratio:
            raise ImageDecodeError("not_a_cell_image", f"{width}x{height} px: aspect ratio above "
                                                       f"{self.max_aspect_ratio} (limits.max_aspect_ratio)")

    def check_contrast(self, pixels: np.ndarray) -> None:
        """Raise ``not_a_cell_image`` for a blank or near-constant RGB ``uint8`` image."""
        grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        contrast = float(grey.std())
        if contrast < self.min_contrast:
            raise ImageDecodeError("not_a_cell_image", f"blank or near-constant image (grey-level deviation "
                                                       f"{contrast:.2f} < {self.min_contrast}, limits.min_contrast)")


@dataclass(frozen=True)
class DecodeBudget:
    """What decoding one image may cost; an image over it is a ``decode_budget`` error, never a stuck task.

    ``max_work``: width x height x number of JPEG scans (progressive JPEGs decode every scan over the whole
    image; other formats count one), checked from the header before any pixel is decoded. ``timeout_s``: wall
    time of the decode itself, checked each time the decoder asks for more bytes (every 64 kB).
    """

    max_work: int = DEFAULT_MAX_DECODE_WORK
    timeout_s: float = DEFAULT_DECODE_TIMEOUT_S

    def check_work(self, data: bytes, image: Image.Image) -> None:
        """Raise ``decode_budget`` when the header promises more work than :attr:`max_work`."""
        scans = jpeg_scans(data) if image.format == "JPEG" else 1
        width, height = image.size
        work = width * height * max(1, scans)
        if work > self.max_work:
            raise ImageDecodeError("decode_budget", f"{width}x{height} px x {scans} JPEG scan(s) = {work:,} pixel-scans "
                                                    f"exceeds limits.max_decode_work ({self.max_work:,})")

    def reader(self, data: bytes) -> "_DeadlineReader":
        """A file over ``data`` that stops the decoder once :attr:`timeout_s` has passed."""
        return _DeadlineReader(data, time.monotonic() + self.timeout_s, self.timeout_s)


class _DecodeTimeout(Exception):
    """Raised from inside the decoder's reads (Pillow passes it through)."""


class _DeadlineReader(io.BytesIO):
    def __init__(self, data: bytes, deadline: float, timeout_s: float):
        super().__init__(data)
        self.deadline, self.timeout_s = deadline, timeout_s

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise _DecodeTimeout(f"decoding took longer than limits.decode_timeout_s ({self.timeout_s:g} s)")
        return super().read(size)


def jpeg_scans(data: bytes) -> int:
    """Number of scans (SOS markers) in JPEG ``data``: 1 for baseline, ~10 for a usual progressive file.

    Entropy-coded data never holds ``FF DA`` (an ``FF`` there is always followed by ``00`` or a restart marker), so
    counting the marker bytes counts scans; an EXIF thumbnail adds its own one.
    """
    return data.count(b"\xff\xda")


def decode_image(data: bytes, *, target_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cell: CellImageLimits | None = None,
                 budget: DecodeBudget | None = None) -> Image.Image:
    """Decode ``data`` to an RGB PIL image, refusing anything suspicious.

    ``target_size`` lets JPEG decoding use DCT scaling (``Image.draft``), which
    decodes a 360 px CellaVision crop at 1/2 or 1/4 scale when the model only
    needs 100-224 px: several times faster with no visible loss after resize.
    ``cell`` checks the stored size (before any DCT scaling) against a cell crop's.
    ``budget`` bounds the decoding work and time (:class:`DecodeBudget`; defaults when None).
    """
    if not data:
        raise ImageDecodeError("empty", "file is empty (0 bytes)")
    budget = budget or DecodeBudget()
    # PIL would otherwise emit a warning, or raise only once pixels are touched.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(budget.reader(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_image", "not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_large", f"image exceeds the pixel limit ({exc})") from exc
    except _DecodeTimeout as exc:
        raise ImageDecodeError("decode_budget", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad header
        raise ImageDecodeError(_failure_kind(exc), f"cannot read image header: {exc}") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    if cell is not None:
        cell.check_size(width, height)
    if image.mode not in SUPPORTED_MODES:
        raise ImageDecodeError("unsupported_mode", f"unsupported image mode {image.mode!r}")
    budget.check_work(data, image)
    try:
        if target_size and image.format == "JPEG":
            image.draft("RGB", (target_size, target_size))
        image.load()
    except _DecodeTimeout as exc:
        raise ImageDecodeError("decode_budget", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes an error row
        raise ImageDecodeError(_failure_kind(exc), f"cannot decode image data: {exc}") from exc
    if image.mode in ("RGBA", "LA", "PA", "P"):
        # Transparent pixels of exported crops are background: composite on white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _failure_kind(exc: BaseException) -> str:
    text = str(exc).lower()
    return "truncated" if "truncat" in text or "premature end" in text else "corrupt"
