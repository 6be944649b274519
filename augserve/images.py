"""Checking encoded images before any decoder sees them.

`inspect_image` reads only the header: format, size after EXIF orientation, frame count. It
rejects what would crash, stall or mislead a decoder: empty data, non-images, unsupported or
animated formats, truncated JPEG/PNG files and pixel counts over the limit (decompression
bombs). Both backends call it first, so a bad file is classified the same way everywhere.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from augserve.errors import BadImageError

# Formats both OpenCV and DALI decode.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000
# EXIF orientations 5..8 swap width and height.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112
JPEG_START_OF_SCAN = b"\xff\xda"
JPEG_END = b"\xff\xd9"
PNG_END = b"IEND"


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: format name and the size (height, width) decoders will produce."""

    format: str
    height: int
    width: int


def inspect_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Return the header of `data` or raise `BadImageError(source, reason)`."""
    if len(data) == 0:
        raise BadImageError(source, "empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns before it raises on huge images; the limit below is ours to enforce.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format or "unknown"
                width, height = image.size
                frames = getattr(image, "n_frames", 1)
                # Both decoders apply EXIF orientation to JPEG files.
                orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image_format == "JPEG" else 1
    except Image.DecompressionBombError:
        raise BadImageError(source, f"over the pixel limit of {max_pixels}") from None
    except UnidentifiedImageError:
        raise BadImageError(source, "not a recognised image format") from None
    except Exception as error:  # PIL raises many types for malformed headers
        raise BadImageError(source, f"unreadable image header ({type(error).__name__}: {error})") from None
    if image_format not in SUPPORTED_FORMATS:
        raise BadImageError(source, f"unsupported format {image_format}; supported: {', '.join(SUPPORTED_FORMATS)}")
    if frames != 1:
        raise BadImageError(source, f"animated {image_format} with {frames} frames is not supported")
    if width <= 0 or height <= 0:
        raise BadImageError(source, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise BadImageError(source, f"{width}x{height} is over the pixel limit of {max_pixels}")
    # Entropy-coded data cannot hold these markers, so the end marker must follow the last scan
    # (an embedded thumbnail's end marker comes before it).
    if image_format == "JPEG" and data.rfind(JPEG_END) < data.rfind(JPEG_START_OF_SCAN):
        raise BadImageError(source, "truncated JPEG (no end-of-image marker after the last scan)")
    if image_format == "PNG" and PNG_END not in data[-64:]:
        raise BadImageError(source, "truncated PNG (no IEND chunk)")
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageHeader(image_format, height, width)
