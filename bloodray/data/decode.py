"""Turning image bytes into an RGB picture, defensively.

Archives contain whatever the scanner or an export tool wrote, so every
failure becomes an :class:`ImageDecodeError` with a stable ``kind`` (one of
:data:`FAILURE_KINDS`) that callers write to their errors table instead of
failing the job.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

#: Pixel limit per image (width x height) before full decoding. CellaVision crops
#: are ~0.13 MP; anything far larger is a scan mistake or a decompression bomb.
DEFAULT_MAX_PIXELS = 25_000_000

#: PIL modes we convert to RGB. Others (16-bit, float, ...) are not microscope
#: photographs and are refused rather than silently mis-scaled.
SUPPORTED_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "RGBX"})

#: Every value :attr:`ImageDecodeError.kind` can take.
FAILURE_KINDS = ("empty", "truncated", "not_image", "corrupt", "unsupported_mode", "too_large")


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image; ``kind`` is one of :data:`FAILURE_KINDS`."""

    def __init__(self, kind: str, message: str):
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown decode failure kind {kind!r}; expected one of {', '.join(FAILURE_KINDS)}")
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, *, target_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` to an RGB PIL image, refusing anything suspicious.

    ``target_size`` lets JPEG decoding use DCT scaling (``Image.draft``), which
    decodes a 360 px CellaVision crop at 1/2 or 1/4 scale when the model only
    needs 100-224 px: several times faster with no visible loss after resize.
    """
    if not data:
        raise ImageDecodeError("empty", "file is empty (0 bytes)")
    # PIL would otherwise emit a warning, or raise only once pixels are touched.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_image", "not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_large", f"image exceeds the pixel limit ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad header
        raise ImageDecodeError(_failure_kind(exc), f"cannot read image header: {exc}") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    if image.mode not in SUPPORTED_MODES:
        raise ImageDecodeError("unsupported_mode", f"unsupported image mode {image.mode!r}")
    try:
        if target_size and image.format == "JPEG":
            image.draft("RGB", (target_size, target_size))
        image.load()
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
