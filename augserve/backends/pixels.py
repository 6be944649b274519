"""The per-pixel stage with OpenCV and numpy: each `PixelStep` of a plan, in place on one
[H, W, 3] uint8 RGB image (after the warp and the colour matrix). The DALI backend builds the
same steps into its graph; `augserve.core.ops.canvas.PixelStep` defines what each computes.

Lookup-table steps (posterize, solarize, autocontrast, equalize) are one `cv2.LUT` with a table
per channel; autocontrast and equalize build theirs from the image's per-channel histograms.
Sharpness is one `cv2.filter2D` with the blended 3x3 kernel (DALI's CPU filter wraps the same
call); blur one `cv2.sepFilter2D` with the Gaussian DALI computes (float32 taps, normalised).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from augserve.core.ops.canvas import PixelStep
from augserve.core.ops.pixel import blur_radius, sharpness_kernel

BORDER = cv2.BORDER_REFLECT_101
LEVELS = np.arange(256, dtype=np.int64)
IDENTITY_TABLE = np.arange(256, dtype=np.uint8)


@functools.lru_cache(maxsize=16)
def posterize_table(bits: int) -> np.ndarray:
    """[256] uint8: each value with all but its `bits` high bits cleared."""
    mask = (0xFF << (8 - bits)) & 0xFF
    return (LEVELS & mask).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def solarize_table(threshold: int) -> np.ndarray:
    """[256] uint8: values >= threshold inverted."""
    return np.where(LEVELS >= threshold, 255 - LEVELS, LEVELS).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def gaussian_taps(sigma: float) -> np.ndarray:
    """[2r + 1] float32 taps of a Gaussian of `sigma` pixels, r = ceil(3 sigma), summing to 1."""
    radius = blur_radius(sigma)
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    taps = np.exp(-(offsets * offsets) / np.float32(2.0 * sigma * sigma)).astype(np.float32)
    return (taps / taps.sum(dtype=np.float32)).astype(np.float32)


def channel_histograms(image: np.ndarray) -> np.ndarray:
    """[3, 256] int64: each channel's count of every value."""
    return np.stack(
        [cv2.calcHist([image], [channel], None, [256], [0, 256]).reshape(256) for channel in range(3)]
    ).astype(np.int64)


def autocontrast_table(histogram: np.ndarray) -> np.ndarray:
    """[256] uint8 for one channel's histogram: floor(255 (v - min) / (max - min)) on [min, max]
    (values outside it do not occur), the identity for a channel of one value."""
    present = np.flatnonzero(histogram)
    low, high = int(present[0]), int(present[-1])
    if high == low:
        return IDENTITY_TABLE
    stretched = (LEVELS - low) * 255 // (high - low)
    return np.clip(stretched, 0, 255).astype(np.uint8)


def equalize_table(histogram: np.ndarray) -> np.ndarray:
    """[256] uint8 for one channel's histogram, as OpenCV's `equalizeHist` builds it: with i0
    the lowest value present, lut[i0] = 0 and lut[i] = round(cumulative count up to i x 255 /
    (pixels - count of i0)) in float32; a channel of one value is kept."""
    present = np.flatnonzero(histogram)
    lowest = int(present[0])
    total = int(histogram.sum())
    if histogram[lowest] == total:
        return IDENTITY_TABLE
    scale = np.float32(255.0) / np.float32(total - histogram[lowest])
    cumulative = np.cumsum(histogram) - histogram[lowest]
    table = np.rint(cumulative.astype(np.float32) * scale)
    table[:lowest] = 0
    return np.clip(table, 0, 255).astype(np.uint8)


def _per_channel(image: np.ndarray, table_of: Callable[[np.ndarray], np.ndarray]) -> None:
    tables = np.stack([table_of(histogram) for histogram in channel_histograms(image)], axis=-1)
    cv2.LUT(image, tables.reshape(1, 256, 3), dst=image)


def _lookup(image: np.ndarray, table: np.ndarray) -> None:
    cv2.LUT(image, table, dst=image)


def apply_step(image: np.ndarray, step: PixelStep) -> None:
    """Run one step on `image` ([H, W, 3] uint8, C-contiguous rows), in place."""
    kind = step.kind
    if kind == "identity":
        return
    STEPS[kind](image, step.amount)


def _posterize(image: np.ndarray, bits: float) -> None:
    _lookup(image, posterize_table(int(bits)))


def _solarize(image: np.ndarray, threshold: float) -> None:
    _lookup(image, solarize_table(int(threshold)))


def _autocontrast(image: np.ndarray, amount: float) -> None:
    _per_channel(image, autocontrast_table)


def _equalize(image: np.ndarray, amount: float) -> None:
    _per_channel(image, equalize_table)


def _sharpness(image: np.ndarray, factor: float) -> None:
    # filter2D reads neighbours, so not in place.
    image[...] = cv2.filter2D(image, -1, sharpness_kernel(factor), borderType=BORDER)


def _blur(image: np.ndarray, sigma: float) -> None:
    taps = gaussian_taps(sigma)
    image[...] = cv2.sepFilter2D(image, -1, taps, taps, borderType=BORDER)


STEPS: dict[str, Callable[[np.ndarray, float], None]] = {
    "posterize": _posterize,
    "solarize": _solarize,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "sharpness": _sharpness,
    "blur": _blur,
}


def apply_steps(image: np.ndarray, steps: Sequence[PixelStep]) -> None:
    """Run a plan's pixel steps on `image` in order, in place."""
    for step in steps:
        apply_step(image, step)
