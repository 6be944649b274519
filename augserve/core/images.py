"""Checking encoded images before any decoder sees them.

`inspect_image` reads only the header: format, stored size, EXIF orientation, frame count. It
rejects what would crash, stall or mislead a decoder: empty data, non-images, unsupported or
animated formats, truncated JPEG/PNG files and pixel counts over the limit (decompression
bombs). Both backends call it first, so a bad file is classified the same way everywhere.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from augserve.core.errors import BadImageError
from augserve.core.policy import DEFAULT_MAX_PIXELS
from augserve.core.sample import SourceImage

# Formats both OpenCV and DALI decode.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
EXIF_ORIENTATION = 0x0112
JPEG_START_OF_SCAN = b"\xff\xda"
JPEG_END = b"\xff\xd9"
PNG_END = b"IEND"
# TIFF can hold floats, bits and more that the two decoders treat differently; these 8-bit
# modes both decode alike.
TIFF_MODES = ("L", "RGB", "RGBA")


def _jpeg_first_scan_data(data: bytes) -> int | None:
    """Offset of the first scan's entropy-coded data, found by walking the marker segments from
    the start marker by their lengths; None when stray bytes come between segments or the data
    ends before a scan (libjpeg skips stray bytes with a warning, DALI's parser refuses).

    Segments are a 0xFF, a marker byte and, except for the standalone markers (TEM 0x01, RST0-7
    0xD0-0xD7, SOI 0xD8, EOI 0xD9), a 2-byte big-endian length that counts itself. Walking them
    rather than searching for 0xFF 0xDA keeps binary APPn payloads (EXIF thumbnails, Photoshop
    resources) that hold those bytes from being taken for a scan.
    """
    position = 2  # past the start marker, which PIL has already identified
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:  # the length counts its own two bytes
            return None
        if marker == 0xDA:  # start of scan: its header, then the entropy-coded data
            return position + 2 + length if position + 2 + length <= len(data) else None
        position += 2 + length
    return None


def _jpeg_scan_has_invalid_marker(data: bytes, scan_start: int) -> bool:
    """True when the entropy-coded data from `scan_start` on holds a byte pair 0xFF 0x01..0xBF,
    which no valid JPEG has there (stuffed 0xFF00, restarts 0xFFD0..D7 and markers 0xFFC0..FE
    are allowed).

    libjpeg recovers from some such damage with a warning while DALI's parser rejects it;
    rejecting it here keeps both backends' verdicts the same.
    """
    scan = np.frombuffer(data, np.uint8, offset=scan_start)
    following = scan[1:][scan[:-1] == 0xFF]
    return bool(np.any((following >= 0x01) & (following <= 0xBF)))


@dataclass(frozen=True)
class UnreadableSource(SourceImage):
    """A sample whose file could not be read safely (gone, not a regular file, over the byte
    limit, outside the dataset root): no bytes, and `reason` for the bad-image policy. It is
    refused before any header check, so the client is told why rather than "empty file"."""

    reason: str = "unreadable file"


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: format name, stored size in pixels, and the EXIF orientation
    (1 to 8; 1 is upright). Decoders return the stored pixels; plans apply the orientation."""

    format: str
    height: int
    width: int
    orientation: int = 1


def inspect_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Return the header of `data` or raise `BadImageError(source, reason)`."""
    if len(data) == 0:
        raise BadImageError(source, "empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns about huge images (the limit below is ours to enforce) and about
            # damaged metadata that decoders ignore: neither may decide the verdict.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format or "unknown"
                width, height = image.size
                frames = getattr(image, "n_frames", 1)
                mode = image.mode
                # Cameras write the orientation tag into JPEG files; other formats are taken as stored.
                orientation = image.getexif().get(EXIF_ORIENTATION, 1) if image_format == "JPEG" else 1
    except Image.DecompressionBombError:
        raise BadImageError(source, f"over the pixel limit of {max_pixels}") from None
    except UnidentifiedImageError:
        raise BadImageError(source, "not a recognised image format") from None
    except Exception as error:  # PIL raises many types for malformed headers
        raise BadImageError(source, f"unreadable image header ({type(error).__name__}: {error})") from None
    if image_format not in SUPPORTED_FORMATS:
        raise BadImageError(source, f"unsupported format {image_format}; supported: {', '.join(SUPPORTED_FORMATS)}")
    if image_format == "TIFF" and mode not in TIFF_MODES:
        raise BadImageError(source, f"TIFF of mode {mode} is not supported; supported: {', '.join(TIFF_MODES)}")
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
    if image_format == "JPEG":
        scan_start = _jpeg_first_scan_data(data)
        if scan_start is None:
            raise BadImageError(source, "corrupt JPEG (stray bytes between header segments)")
        if _jpeg_scan_has_invalid_marker(data, scan_start):
            raise BadImageError(source, "corrupt JPEG (invalid marker in the image data)")
    if image_format == "PNG" and PNG_END not in data[-64:]:
        raise BadImageError(source, "truncated PNG (no IEND chunk)")
    if orientation not in range(1, 9):
        orientation = 1  # an invalid tag means upright, as in every viewer
    return ImageHeader(image_format, height, width, orientation)


class HeaderCache:
    """`inspect_image` verdicts by file identity, so a file is checked once rather than every
    epoch by every producer. An entry holds while the file keeps its size and modification time
    (a decoder still rejects data that changed without either)."""

    def __init__(self, max_entries: int = 4_000_000) -> None:
        self.max_entries = max_entries
        self._verdicts: dict[tuple[object, ...], ImageHeader | str] = {}

    def inspect(self, data: bytes, source: str, identity: tuple[int, ...] | None, max_pixels: int) -> ImageHeader:
        """As `inspect_image`; `identity` is what tells the file apart (e.g. byte size,
        modification time in ns, device, inode) or None."""
        if identity is None:
            return inspect_image(data, source, max_pixels)
        key = (source, *identity, max_pixels)
        verdict = self._verdicts.get(key)
        if verdict is None:
            try:
                verdict = inspect_image(data, source, max_pixels)
            except BadImageError as error:
                verdict = error.reason
            if len(self._verdicts) < self.max_entries:
                self._verdicts[key] = verdict
        if isinstance(verdict, str):
            raise BadImageError(source, verdict)
        return verdict
