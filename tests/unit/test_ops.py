"""One test class per registered op, generated from the registry, sharing six checks:

- input not mutated: the encoded source, the decoded array, the op's params and its record;
- the identity setting is the identity (p=0, degrees [0, 0], factor [1, 1], ...); ops that set
  the size are checked against a whole-image window at the same size and a plain numpy crop;
- drawn records lie within the declared bounds, and spread over them, across many draws; every
  record field has a bound;
- records are plain JSON-serialisable values, and applying them alone rebuilds the plan;
- OpenCV and DALI (CPU) agree on the same plan, within the tolerances of tests/test_parity.py
  (policies: POLICY_PARITY there, as a pixel step may magnify a one-level warp difference);
- an independent reference (PIL, OpenCV functions, numpy, scikit-image), fed the record the op
  drew, agrees with the OpenCV backend within the tolerance each reference states.

Reference tolerances are, as in tests/test_parity.py, limits on the mean and the max absolute
difference in gray levels over every compared pixel and channel, and on the fraction of pixels
that differ at all; the measured worst case on these images sits beside each. Warps are compared
away from the image border only (a mask eroded by 2 px): where a sample point leaves the image,
PIL and OpenCV mix in the fill differently. Resizes are compared on enlargements with
fill_mode "nearest": there PIL's and OpenCV's bilinear filters are the same triangle filter with
the same half-pixel centres and edge clamping (PIL antialiases reductions, OpenCV does not).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
import pytest
import scipy.ndimage
import skimage.color
from helpers import encode, spec_of
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from test_parity import EXACT, INTERPOLATION, POLICY_PARITY, ROUNDING, assert_close

from augserve.backends.opencv import apply_plan, decode_stored
from augserve.core.images import inspect_image
from augserve.core.ops import OPS, Canvas
from augserve.core.ops.policies import (
    AUTO_AUGMENT_BINS,
    AUTO_AUGMENT_POLICIES,
    AUTO_AUGMENT_SPACE,
    RAND_AUGMENT_SPACE,
    TRIVIAL_AUGMENT_WIDE_SPACE,
    SubOp,
    magnitudes_of,
)
from augserve.core.ops.registry import register_op
from augserve.core.plan import NEAREST_TIE_BREAK, SamplePlan, make_plan, plan_from_draws, uniforms
from augserve.core.spec import AugmentSpec

Size = tuple[int, int]  # (height, width) in pixels
Op = dict[str, dict[str, Any]]  # one spec entry, {name: {parameter: value}}
# (mean limit, max limit, limit on the fraction of differing pixels), as in test_parity.
Tolerance = tuple[float, int, float]
# (expected [H, W, 3] uint8, mask [H, W] bool of the pixels to compare or None for all).
ReferenceResult = tuple[np.ndarray, np.ndarray | None]
ReferenceFunction = Callable[[np.ndarray, dict[str, Any], int], ReferenceResult]

FILL_VALUE = 100
DRAWS_PER_SIZE = 600
# Draws must come this close (a fraction of the interval) to both ends of a drawn interval.
SPREAD = 0.1


# --- images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A test picture: its encoded bytes and the [H, W, 3] uint8 RGB pixels they decode to."""

    data: bytes
    pixels: np.ndarray


@pytest.fixture(scope="module")
def sources(photos, synthetic_images) -> dict[str, Source]:
    """Real photographs as PNG and as JPEG (pixels as OpenCV decodes them, so references see
    what the backends see), and a small synthetic pattern of odd size."""
    chosen = {
        "chelsea.png": encode(photos["chelsea"], ".png"),
        "coffee.jpg": encode(photos["coffee"], ".jpg", quality=90),
        "pattern.png": encode(synthetic_images["pattern_97x131"], ".png"),
        "astronaut.jpg": encode(photos["astronaut"], ".jpg", quality=90),
        "rocket.png": encode(photos["rocket"], ".png"),
    }
    return {name: Source(data, decode_stored(data)) for name, data in chosen.items()}


def plan_for(spec: AugmentSpec, source: Source, sample_id: int, seed: int = 0) -> SamplePlan:
    header = inspect_image(source.data, "test image")
    return make_plan(spec, seed, 0, sample_id, (header.height, header.width), header.orientation)


def augmented(backend, source: Source, plan: SamplePlan) -> np.ndarray:
    result = backend.augment([source.data], [plan])
    assert result.kept == [0], result.failures
    return result.images[0]


# --- bounds of drawn records --------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Every draw lies in [low, high] and draws reach within SPREAD of both ends."""

    low: float
    high: float

    def check(self, values: Sequence[Any]) -> None:
        assert all(self.low <= value <= self.high for value in values), (
            min(values),
            max(values),
            self,
        )
        reach = SPREAD * (self.high - self.low)
        assert min(values) <= self.low + reach and max(values) >= self.high - reach, (
            min(values),
            max(values),
            self,
        )


@dataclass(frozen=True)
class Chance:
    """A boolean drawn true with probability p: the frequency is within 4 standard deviations."""

    p: float

    def check(self, values: Sequence[Any]) -> None:
        assert all(isinstance(value, bool) for value in values)
        spread = 4 * math.sqrt(self.p * (1 - self.p) / len(values))
        assert abs(sum(values) / len(values) - self.p) <= spread, (sum(values) / len(values), self)


@dataclass(frozen=True)
class Fixed:
    """Not random: every draw records this value."""

    value: Any

    def check(self, values: Sequence[Any]) -> None:
        assert all(value == self.value for value in values), (set(map(repr, values)), self)


@dataclass(frozen=True)
class Windows:
    """Boxes (top, left, height, width) inside a canvas of `canvas` (h, w) pixels, each covering a
    `scale` fraction of its area with width/height in `ratio` (both up to the rounding of the
    sides to whole pixels); the areas and log-aspects spread over the declared intervals.
    `strictly_inside`: smaller than the canvas on both sides. A draw records a tuple of boxes,
    or with `single` one box (its four fields)."""

    canvas: Size
    scale: tuple[float, float]
    ratio: tuple[float, float]
    strictly_inside: bool = False
    single: bool = False

    def check(self, values: Sequence[Any]) -> None:
        canvas_h, canvas_w = self.canvas
        area = canvas_h * canvas_w
        boxes = list(values) if self.single else [box for boxes in values for box in boxes]
        assert len(boxes) >= len(values) // 2, "too few boxes to judge"
        for top, left, height, width in boxes:
            assert 0 <= top and top + height <= canvas_h and 0 <= left and left + width <= canvas_w
            if self.strictly_inside:
                assert height < canvas_h and width < canvas_w
            assert (height + 0.5) * (width + 0.5) >= self.scale[0] * area
            assert (height - 0.5) * (width - 0.5) <= self.scale[1] * area
            assert (width + 0.5) / (height - 0.5) >= self.ratio[0]
            assert (width - 0.5) / (height + 0.5) <= self.ratio[1]
        fractions = [height * width / area for _, _, height, width in boxes]
        reach = SPREAD * (self.scale[1] - self.scale[0])
        assert min(fractions) <= self.scale[0] + reach and max(fractions) >= self.scale[1] - reach
        log_ratio = [math.log(width / height) for _, _, height, width in boxes]
        log_reach = SPREAD * math.log(self.ratio[1] / self.ratio[0])
        assert min(log_ratio) <= math.log(self.ratio[0]) + log_reach
        assert max(log_ratio) >= math.log(self.ratio[1]) - log_reach


@dataclass(frozen=True)
class Holes:
    """Up to `count` holes per draw of at most `size` (h, w) pixels, clipped to a canvas of
    `canvas` pixels; unclipped holes are exactly `size`, and holes reach every edge."""

    canvas: Size
    size: Size
    count: int

    def check(self, values: Sequence[Any]) -> None:
        canvas_h, canvas_w = self.canvas
        assert all(len(holes) <= self.count for holes in values)
        holes = [hole for holes in values for hole in holes]
        assert len(holes) >= len(values)
        for top, left, height, width in holes:
            assert 0 <= top and top + height <= canvas_h and 0 <= left and left + width <= canvas_w
            assert 0 < height <= self.size[0] and 0 < width <= self.size[1]
            if 0 < top and top + height < canvas_h:
                assert height == self.size[0]
            if 0 < left and left + width < canvas_w:
                assert width == self.size[1]
        assert (
            min(top for top, _, _, _ in holes) == 0
            and max(t + h for t, _, h, _ in holes) == canvas_h
        )
        assert (
            min(left for _, left, _, _ in holes) == 0
            and max(l + w for _, l, _, w in holes) == canvas_w
        )


@dataclass(frozen=True)
class SubOpDraws:
    """Draws of a RandAugment or TrivialAugment: each draw's (sub-op, signed magnitude) pairs
    name sub-ops of `space`, with a magnitude of the sub-op's table for `bins` levels on a
    `canvas` (h, w) (table level `level` when given), negative only where the sub-op is signed.
    Every sub-op occurs, signed ones with both signs, and (without `level`) the table's both
    ends. A draw records (ops, magnitudes) tuples, or with `single` one (op, magnitude)."""

    space: dict[str, SubOp]
    bins: int
    canvas: Size
    level: int | None = None
    single: bool = False

    def check(self, values: Sequence[Any]) -> None:
        pairs = [value for value in values] if self.single else [
            pair for ops, magnitudes in values for pair in zip(ops, magnitudes)
        ]
        seen: dict[str, set[float]] = {}
        for name, magnitude in pairs:
            assert name in self.space, name
            table = magnitudes_of(self.space, name, self.bins, self.canvas)
            if table is None:
                allowed = {0.0}
            elif self.level is not None:
                allowed = {table[self.level]}
            else:
                allowed = set(table)
            assert abs(magnitude) in allowed, (name, magnitude, sorted(allowed))
            assert magnitude >= 0 or self.space[name].signed, (name, magnitude)
            seen.setdefault(name, set()).add(magnitude)
        assert set(seen) == set(self.space), sorted(set(self.space) - set(seen))
        for name, magnitudes in seen.items():
            table = magnitudes_of(self.space, name, self.bins, self.canvas)
            if self.space[name].signed and (self.level is None or table[self.level] != 0):
                assert min(magnitudes) < 0 < max(magnitudes), (name, sorted(magnitudes))
            if table is not None and self.level is None:
                reached = {abs(magnitude) for magnitude in magnitudes}
                assert table[0] in reached and table[-1] in reached, (name, sorted(reached))


@dataclass(frozen=True)
class SubPolicyDraws:
    """Draws of an AutoAugment (sub_policy, ops, applied, magnitudes): the ops are the drawn
    sub-policy's, every sub-policy occurs, a sub-op that did not fire or takes no magnitude has
    0.0, one that fired has its level's magnitude, negative only where signed."""

    policy: str
    canvas: Size

    def check(self, values: Sequence[Any]) -> None:
        policies = AUTO_AUGMENT_POLICIES[self.policy]
        for index, ops, applied, magnitudes in values:
            assert tuple(ops) == tuple(name for name, _, _ in policies[index])
            for (name, _, level), fired, magnitude in zip(policies[index], applied, magnitudes):
                table = magnitudes_of(AUTO_AUGMENT_SPACE, name, AUTO_AUGMENT_BINS, self.canvas)
                if not fired or table is None or level is None:
                    assert magnitude == 0.0, (name, fired, magnitude)
                else:
                    assert abs(magnitude) == table[level], (name, magnitude)
                    assert magnitude >= 0 or AUTO_AUGMENT_SPACE[name].signed
        assert {index for index, _, _, _ in values} == set(range(len(policies)))


Bound = Interval | Chance | Fixed | Windows | Holes | SubOpDraws | SubPolicyDraws
# Record field (or tuple of fields, checked together) -> its bound.
BoundsFunction = Callable[[dict[str, Any], Size], dict[str | tuple[str, ...], Bound]]


# --- references ---------------------------------------------------------------------------------


def _pil_warp(
    image: np.ndarray, warp: Callable[[Image.Image, Image.Resampling, Any], Image.Image], fill: int
) -> ReferenceResult:
    """`warp(picture, resample, fillcolor)` applied with PIL's bilinear filter, and the mask of
    output pixels that sample at least 2 px inside the image: PIL's nearest warp of a white
    image, eroded by 2 px, the frame counting as uncovered (a pixel at the frame can sample
    within a pixel of the image's edge, as at small angles)."""
    expected = np.asarray(warp(Image.fromarray(image), Image.Resampling.BILINEAR, (fill,) * 3))
    coverage = warp(
        Image.new("L", (image.shape[1], image.shape[0]), 255), Image.Resampling.NEAREST, 0
    )
    eroded = ImageOps.expand(coverage, border=2, fill=0).filter(ImageFilter.MinFilter(5))
    mask = np.asarray(eroded)[2:-2, 2:-2] > 0
    return expected, mask


def _pil_affine(
    data: tuple[float, ...],
) -> Callable[[Image.Image, Image.Resampling, Any], Image.Image]:
    """PIL's affine transform with `data` (output -> input, PIL's pixel-edge coordinates)."""

    def warp(picture: Image.Image, resample: Image.Resampling, fillcolor: Any) -> Image.Image:
        return picture.transform(
            picture.size, Image.Transform.AFFINE, data, resample=resample, fillcolor=fillcolor
        )

    return warp


def rotate_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL `Image.rotate` (counter-clockwise degrees about the image centre), bilinear."""
    return _pil_warp(
        image,
        lambda picture, resample, fillcolor: picture.rotate(
            record["angle"], resample, fillcolor=fillcolor
        ),
        fill,
    )


def flip_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL `ImageOps.mirror` / `ImageOps.flip`."""
    picture = Image.fromarray(image)
    if record["horizontal"]:
        picture = ImageOps.mirror(picture)
    if record["vertical"]:
        picture = ImageOps.flip(picture)
    return np.asarray(picture), None


def shift_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL affine transform: output (x, y) reads input (x - dx, y - dy)."""
    return _pil_warp(image, _pil_affine((1, 0, -record["dx"], 0, 1, -record["dy"])), fill)


def zoom_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL affine transform scaling about the image centre (w/2, h/2 in PIL's coordinates)."""
    center_x, center_y = image.shape[1] / 2, image.shape[0] / 2
    inverse_x, inverse_y = 1 / record["scale_x"], 1 / record["scale_y"]
    data = (inverse_x, 0, center_x * (1 - inverse_x), 0, inverse_y, center_y * (1 - inverse_y))
    return _pil_warp(image, _pil_affine(data), fill)


def shear_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL affine transform: output x reads input x - tan(angle) * (y - h/2)."""
    slope = math.tan(math.radians(record["angle"]))
    return _pil_warp(image, _pil_affine((1, -slope, slope * image.shape[0] / 2, 0, 1, 0)), fill)


def crop_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """numpy slicing of the recorded window."""
    top, left = record["top"], record["left"]
    return image[top : top + record["height"], left : left + record["width"]], None


def _window(image: np.ndarray, record: dict[str, Any]) -> tuple[int, int, int, int]:
    """(top, left, height, width) a record scales to its size: its window, or the whole image."""
    if "top" in record:
        return record["top"], record["left"], record["height"], record["width"]
    return 0, 0, image.shape[0], image.shape[1]


def window_bilinear_reference(
    image: np.ndarray, record: dict[str, Any], fill: int
) -> ReferenceResult:
    """PIL `Image.resize(size, BILINEAR, box=window)`."""
    top, left, height, width = _window(image, record)
    out_h, out_w = record["size"]
    box = (left, top, left + width, top + height)
    return np.asarray(
        Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    ), None


def window_nearest_reference(
    image: np.ndarray, record: dict[str, Any], fill: int
) -> ReferenceResult:
    """PIL affine transform with NEAREST of the window onto the record's size, sampling at the
    plan's documented positions: the pixel-centre position moved by plan.NEAREST_TIE_BREAK.
    (`cv2.resize`'s INTER_NEAREST floors instead of rounding; INTER_NEAREST_EXACT rounds but
    without the tie-break, so 1/64 of rows and columns would differ.)"""
    top, left, height, width = _window(image, record)
    out_h, out_w = record["size"]
    data = (width / out_w, 0, left + NEAREST_TIE_BREAK, 0, height / out_h, top + NEAREST_TIE_BREAK)
    return np.asarray(
        Image.fromarray(image).transform(
            (out_w, out_h), Image.Transform.AFFINE, data, Image.Resampling.NEAREST
        )
    ), None


def resize_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """`cv2.resize` with INTER_LINEAR to the recorded size."""
    out_h, out_w = record["size"]
    return cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR), None


def resize_shorter_side_reference(
    image: np.ndarray, record: dict[str, Any], fill: int
) -> ReferenceResult:
    """PIL `Image.resize` (bilinear) to the recorded size; that size keeps the aspect ratio."""
    out_h, out_w = record["size"]
    assert abs(out_w / out_h - image.shape[1] / image.shape[0]) <= 1 / min(out_h, out_w)
    return np.asarray(
        Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR)
    ), None


def brightness_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL `ImageEnhance.Brightness`."""
    return np.asarray(
        ImageEnhance.Brightness(Image.fromarray(image)).enhance(record["factor"])
    ), None


def contrast_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """`cv2.addWeighted`: factor * x + (1 - factor) * 127.5, rounded and clamped. (PIL's and
    torchvision's contrast pivot on the image's mean gray; augserve's on a fixed mid-gray.)"""
    factor = record["factor"]
    return cv2.addWeighted(image, factor, image, 0.0, (1.0 - factor) * 127.5), None


def saturation_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL `ImageEnhance.Color` (a blend with `convert('L')`, whose luma PIL rounds to whole
    levels: up to |1 - factor| / 2 of a level more)."""
    return np.asarray(ImageEnhance.Color(Image.fromarray(image)).enhance(record["factor"])), None


def hue_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """scikit-image `rgb2yiq` / `yiq2rgb` with the chroma (I + iQ) turned by e^(i angle) in
    numpy. augserve's hue is this YIQ rotation (torchvision's is HSV, not installable here);
    scikit-image's more precise NTSC coefficients move results by up to a level."""
    yiq = skimage.color.rgb2yiq(image)
    chroma = (yiq[..., 1] + 1j * yiq[..., 2]) * np.exp(1j * math.radians(record["angle"]))
    yiq[..., 1], yiq[..., 2] = chroma.real, chroma.imag
    rgb = skimage.color.yiq2rgb(yiq) * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), None


def grayscale_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL `convert('L')` into all three channels, when the op fired."""
    if not record["applied"]:
        return image, None
    return np.repeat(np.asarray(Image.fromarray(image).convert("L"))[..., None], 3, axis=2), None


def erase_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """numpy slice assignment of the recorded value into the recorded rectangles."""
    expected = image.copy()
    for top, left, height, width in record["rectangles"]:
        expected[top : top + height, left : left + width] = record["value"]
    return expected, None


def _if_applied(
    transform: Callable[[np.ndarray, dict[str, Any]], np.ndarray],
) -> ReferenceFunction:
    """A reference that runs `transform(image, record)` when the record says the op fired."""

    def reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
        return (transform(image, record) if record["applied"] else image), None

    return reference


def _pil(function: Callable[[Image.Image], Image.Image], image: np.ndarray) -> np.ndarray:
    return np.asarray(function(Image.fromarray(image)))


def _equalize_hist(image: np.ndarray) -> np.ndarray:
    """OpenCV's `equalizeHist` on each channel."""
    return np.stack(
        [cv2.equalizeHist(np.ascontiguousarray(image[..., channel])) for channel in range(3)],
        axis=-1,
    )


def _frame_mask(shape: tuple[int, ...], width: int = 1) -> np.ndarray:
    """[H, W] bool: every pixel but the `width`-pixel frame."""
    mask = np.zeros(shape[:2], bool)
    mask[width:-width, width:-width] = True
    return mask


posterize_reference = _if_applied(
    lambda image, record: _pil(lambda picture: ImageOps.posterize(picture, record["bits"]), image)
)
posterize_reference.__doc__ = "PIL `ImageOps.posterize`."
solarize_reference = _if_applied(
    lambda image, record: _pil(lambda picture: ImageOps.solarize(picture, record["threshold"]), image)
)
solarize_reference.__doc__ = "PIL `ImageOps.solarize` (values >= threshold inverted)."
invert_reference = _if_applied(lambda image, record: _pil(ImageOps.invert, image))
invert_reference.__doc__ = "PIL `ImageOps.invert`."
autocontrast_reference = _if_applied(lambda image, record: _pil(ImageOps.autocontrast, image))
autocontrast_reference.__doc__ = "PIL `ImageOps.autocontrast` (cutoff 0, per channel)."
equalize_opencv_reference = _if_applied(lambda image, record: _equalize_hist(image))
equalize_opencv_reference.__doc__ = "OpenCV `equalizeHist` on each channel (augserve's table)."
equalize_pil_reference = _if_applied(lambda image, record: _pil(ImageOps.equalize, image))
equalize_pil_reference.__doc__ = """PIL `ImageOps.equalize` (torchvision's table): PIL steps by
(pixels - count of the top value) // 255 and rounds differently, a few levels from OpenCV's."""


def sharpness_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """PIL `ImageEnhance.Sharpness` (a blend with `ImageFilter.SMOOTH`), compared inside the
    1-pixel frame, which PIL keeps unfiltered and augserve filters with a reflected border."""
    if not record["applied"]:
        return image, None
    expected = _pil(lambda picture: ImageEnhance.Sharpness(picture).enhance(record["factor"]), image)
    return expected, _frame_mask(image.shape)


def gaussian_blur_reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
    """scipy `ndimage.gaussian_filter` (float64 taps), radius ceil(3 sigma), mode "mirror"
    (reflect-101), rounded."""
    if not record["applied"]:
        return image, None
    sigma = record["sigma"]
    radius = max(1, math.ceil(3 * sigma))
    blurred = scipy.ndimage.gaussian_filter(
        image.astype(np.float64), sigma=(sigma, sigma, 0), mode="mirror", radius=(radius, radius, 0)
    )
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8), None


# --- policies: each drawn sub-op with PIL (geometry, pixels) and numpy (colour) ----------------

# Which stage each sub-op acts in: augserve runs every geometric sub-op (one warp), then every
# colour sub-op (one colour matrix), then the pixel sub-ops, each group in drawn order.
SUB_OP_STAGES = {
    "Identity": 1,
    "ShearX": 0,
    "ShearY": 0,
    "TranslateX": 0,
    "TranslateY": 0,
    "Rotate": 0,
    "Brightness": 1,
    "Color": 1,
    "Contrast": 1,
}
PIL_LUMA = np.array([0.299, 0.587, 0.114])


def _sub_op_warp(image: np.ndarray, name: str, magnitude: float, fill: int) -> np.ndarray:
    """torchvision's geometric sub-op as one `cv2.warpAffine`, bilinear, constant fill: the
    inverse map built from torchvision's PIL data (output to input in pixel-edge coordinates;
    shears about the top-left corner, as its center=[0, 0]) or, for Rotate,
    `cv2.getRotationMatrix2D` about the centre (counter-clockwise). OpenCV's sampling, as the
    backend's, so that a drawn sub-op's matrix is checked, not PIL's rounding."""
    height, width = image.shape[:2]
    if name == "Rotate":
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), magnitude, 1.0)
        flags = cv2.INTER_LINEAR
    else:
        a, b, c, d, e, f = {
            "ShearX": (1, magnitude, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, magnitude, 1, 0),
            "TranslateX": (1, 0, -int(magnitude), 0, 1, 0),
            "TranslateY": (1, 0, 0, 0, 1, -int(magnitude)),
        }[name]
        # PIL samples output pixel x at x + 0.5 and reads input x' + 0.5: move both to centres.
        matrix = np.array(
            [[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]], np.float64
        )
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(
        image, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill,) * 3,
    )


def _colour_sub_op(values: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    """torchvision's enhance sub-ops on float RGB, unclamped (augserve clamps once, at the end
    of its colour matrix); Contrast about mid-gray (augserve's pivot)."""
    factor = 1.0 + magnitude
    if name == "Brightness":
        return values * factor
    if name == "Color":
        return factor * values + (1 - factor) * (values @ PIL_LUMA)[..., None]
    if name == "Contrast":
        return factor * values + (1 - factor) * 127.5
    assert name == "Identity", name
    return values


def _pixel_sub_op(image: np.ndarray, name: str, magnitude: float) -> np.ndarray:
    """torchvision's PIL kernels for the pixel sub-ops (Equalize: OpenCV's, augserve's table)."""
    pixel_ops: dict[str, Callable[[Image.Image], Image.Image]] = {
        "Posterize": lambda picture: ImageOps.posterize(picture, int(magnitude)),
        "Solarize": lambda picture: ImageOps.solarize(picture, magnitude),
        "AutoContrast": ImageOps.autocontrast,
        "Invert": ImageOps.invert,
        "Sharpness": lambda picture: ImageEnhance.Sharpness(picture).enhance(1 + magnitude),
    }
    if name == "Equalize":
        return _equalize_hist(image)
    return _pil(pixel_ops[name], image)


def policy_reference(
    sub_ops_of: Callable[[dict[str, Any]], list[tuple[str, float]]],
) -> ReferenceFunction:
    """A policy's reference: the record's fired sub-ops, geometric ones first (each its own
    warp, see `_sub_op_warp`), then colour ones (numpy, float, clamped once), then pixel ones
    (PIL's kernels), each group in drawn order. With Sharpness, compared inside the 1-pixel
    frame."""

    def reference(image: np.ndarray, record: dict[str, Any], fill: int) -> ReferenceResult:
        sub_ops = sorted(sub_ops_of(record), key=lambda pair: SUB_OP_STAGES.get(pair[0], 2))
        mask = None
        for name, magnitude in sub_ops:
            if SUB_OP_STAGES.get(name) == 0:
                image = _sub_op_warp(image, name, magnitude, fill)
        colour = [(name, magnitude) for name, magnitude in sub_ops if SUB_OP_STAGES.get(name) == 1]
        if colour:
            values = image.astype(np.float64)
            for name, magnitude in colour:
                values = _colour_sub_op(values, name, magnitude)
            image = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        for name, magnitude in sub_ops:
            if name not in SUB_OP_STAGES:
                image = _pixel_sub_op(image, name, magnitude)
                if name == "Sharpness":
                    frame = _frame_mask(image.shape)
                    mask = frame if mask is None else mask & frame
        return image, mask

    return reference


rand_augment_reference = policy_reference(
    lambda record: list(zip(record["ops"], record["magnitudes"]))
)
rand_augment_reference.__doc__ = "Each drawn sub-op (see `policy_reference`)."
trivial_augment_wide_reference = policy_reference(
    lambda record: [(record["op"], record["magnitude"])]
)
trivial_augment_wide_reference.__doc__ = "The drawn sub-op (see `policy_reference`)."
auto_augment_reference = policy_reference(
    lambda record: [
        (name, magnitude)
        for name, fired, magnitude in zip(record["ops"], record["applied"], record["magnitudes"])
        if fired
    ]
)
auto_augment_reference.__doc__ = "The sub-policy's fired sub-ops (see `policy_reference`)."


@dataclass(frozen=True)
class Reference:
    """An independent implementation of `op` fed the record the op drew, compared with the
    OpenCV backend on the named sources for the first `samples` sample ids."""

    op: Op
    function: ReferenceFunction
    tolerance: Tolerance
    fill_mode: str = "constant"
    images: tuple[str, ...] = ("chelsea.png", "coffee.jpg")
    samples: int = 3


# --- the table: what the shared checks need to know about each op -------------------------------

# A neutral setting for an image of a size, and what it must give for that image.
IdentityFunction = Callable[[Size], list[tuple[Op, Callable[[np.ndarray], np.ndarray]]]]


def unchanged(image: np.ndarray) -> np.ndarray:
    return image


# PIL's warps truncate sample values where OpenCV rounds them (PIL is lower by one level on about
# half the pixels). Measured worst: mean 0.50, max 1.
PIL_WARP = (0.6, 2, 1.0)
# Measured worst: mean 0.19, max 1.
BILINEAR_RESIZE = (0.3, 2, 1.0)
# Exact on these images; a scale that is a short binary fraction can land a tie-broken position
# exactly on a half pixel, which PIL and OpenCV round apart: a few whole rows or columns
# (seen on skimage's astronaut: 4 of 256 columns, 1.6 % of pixels).
NEAREST_RESIZE = (0.5, 255, 0.02)


# Policies against their reference: colour rounding (one level), PIL's sharpness (one level).
# Measured worst: mean 0.09, max 1, 25 % of pixels.
POLICY_REFERENCE = (0.25, 1, 0.5)
AUTO_AUGMENT_REFERENCE = POLICY_REFERENCE


@dataclass(frozen=True)
class OpCase:
    """`op`: typical random parameters (for the mutation, bounds and record checks);
    `identity`: neutral settings; `bounds`: each record field's bound for the resolved params
    and a canvas size, checked on `canvas_sizes`; `parity`: ops run on both backends with
    test_parity's tolerances; `references`: independent implementations."""

    op: Op
    identity: IdentityFunction
    bounds: BoundsFunction
    parity: tuple[tuple[Op, Tolerance], ...]
    references: tuple[Reference, ...]
    canvas_sizes: tuple[Size, ...] = ((300, 451), (97, 131))


def _same(op: Op) -> IdentityFunction:
    return lambda size: [(op, unchanged)]


def _center_crop(size: Size) -> list[tuple[Op, Callable[[np.ndarray], np.ndarray]]]:
    height, width = size
    crop_h, crop_w = height // 2 + 1, width // 3
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return [
        ({"crop": {"size": list(size)}}, unchanged),
        (
            {"crop": {"size": [crop_h, crop_w], "mode": "center"}},
            lambda image: image[top : top + crop_h, left : left + crop_w],
        ),
    ]


def _whole_window(size: Size) -> list[tuple[Op, Callable[[np.ndarray], np.ndarray]]]:
    aspect = size[1] / size[0]
    op = {
        "random_resized_crop": {"size": list(size), "scale": [1.0, 1.0], "ratio": [aspect, aspect]}
    }
    return [(op, unchanged)]


def _range(params: dict[str, Any], name: str, scale: float = 1.0) -> Interval:
    low, high = params[name]
    return Interval(low * scale, high * scale)


def _crop_bounds(params: dict[str, Any], size: Size) -> dict[str | tuple[str, ...], Bound]:
    crop_h, crop_w = params["size"]
    return {
        "top": Interval(0, size[0] - crop_h),
        "left": Interval(0, size[1] - crop_w),
        "height": Fixed(crop_h),
        "width": Fixed(crop_w),
    }


CASES: dict[str, OpCase] = {
    "rotate": OpCase(
        op={"rotate": {"degrees": [-30, 45]}},
        identity=_same({"rotate": {"degrees": [0, 0]}}),
        bounds=lambda params, size: {"angle": _range(params, "degrees")},
        parity=(({"rotate": {"degrees": 30}}, INTERPOLATION),),
        references=(Reference({"rotate": {"degrees": 40}}, rotate_reference, PIL_WARP),),
    ),
    "flip": OpCase(
        op={"flip": {"horizontal": 0.3, "vertical": 0.7}},
        identity=_same({"flip": {"horizontal": 0.0, "vertical": 0.0}}),
        bounds=lambda params, size: {
            "horizontal": Chance(params["horizontal"]),
            "vertical": Chance(params["vertical"]),
        },
        parity=(({"flip": {"horizontal": 0.5, "vertical": 0.5}}, EXACT),),
        references=(
            Reference(
                {"flip": {"horizontal": 0.5, "vertical": 0.5}}, flip_reference, EXACT, samples=8
            ),
        ),
    ),
    "shift": OpCase(
        op={"shift": {"x": [-0.2, 0.1], "y": [0.05, 0.3]}},
        identity=_same({"shift": {"x": 0.0, "y": 0.0}}),
        bounds=lambda params, size: {
            "dx": _range(params, "x", size[1]),
            "dy": _range(params, "y", size[0]),
        },
        parity=(({"shift": {"x": 0.2, "y": 0.2}}, INTERPOLATION),),
        references=(Reference({"shift": {"x": 0.2, "y": 0.2}}, shift_reference, PIL_WARP),),
    ),
    "zoom": OpCase(
        op={"zoom": {"range": [0.5, 2.0], "independent": True}},
        identity=_same({"zoom": {"range": [1.0, 1.0]}}),
        bounds=lambda params, size: {
            "scale_x": _range(params, "range"),
            "scale_y": _range(params, "range"),
        },
        parity=(({"zoom": {"range": [0.5, 2.0], "independent": True}}, INTERPOLATION),),
        # Enlarging, so no reading between far-apart samples (neither library antialiases a warp).
        references=(
            Reference(
                {"zoom": {"range": [1.1, 1.8], "independent": True}}, zoom_reference, PIL_WARP
            ),
        ),
    ),
    "shear": OpCase(
        op={"shear": {"degrees": [-20, 35]}},
        identity=_same({"shear": {"degrees": 0}}),
        bounds=lambda params, size: {"angle": _range(params, "degrees")},
        parity=(({"shear": {"degrees": 20}}, INTERPOLATION),),
        references=(Reference({"shear": {"degrees": 25}}, shear_reference, PIL_WARP),),
    ),
    "crop": OpCase(
        op={"crop": {"size": [48, 40]}},
        identity=_center_crop,
        bounds=_crop_bounds,
        parity=(({"crop": {"size": [48, 40]}}, EXACT),),
        references=(Reference({"crop": {"size": [90, 120]}}, crop_reference, EXACT),),
    ),
    "random_resized_crop": OpCase(
        op={"random_resized_crop": {"size": [40, 56], "scale": [0.1, 0.5], "ratio": [0.5, 2.0]}},
        identity=_whole_window,
        bounds=lambda params, size: {
            ("top", "left", "height", "width"): Windows(
                size, params["scale"], params["ratio"], single=True
            ),
            "size": Fixed(params["size"]),
            "interpolation": Fixed(params["interpolation"]),
        },
        parity=(
            ({"random_resized_crop": {"size": 56}}, INTERPOLATION),
            ({"random_resized_crop": {"size": 56, "interpolation": "nearest"}}, EXACT),
        ),
        # Windows of at most 0.25 of the area, ratio up to 4/3: at most 212 px wide, so the
        # scale to 256 x 256 enlarges on both axes.
        references=(
            Reference(
                {"random_resized_crop": {"size": 256, "scale": [0.08, 0.25]}},
                window_bilinear_reference,
                BILINEAR_RESIZE,
                fill_mode="nearest",
            ),
            Reference(
                {
                    "random_resized_crop": {
                        "size": 256,
                        "scale": [0.08, 0.25],
                        "interpolation": "nearest",
                    }
                },
                window_nearest_reference,
                NEAREST_RESIZE,
            ),
        ),
    ),
    "resize": OpCase(
        op={"resize": {"size": [50, 75]}},
        identity=lambda size: [({"resize": {"size": list(size)}}, unchanged)],
        bounds=lambda params, size: {
            "size": Fixed(params["size"]),
            "interpolation": Fixed(params["interpolation"]),
        },
        parity=(({"resize": {"size": [50, 75]}}, INTERPOLATION),),
        references=(
            # Measured worst: mean 0.12, max 1.
            Reference(
                {"resize": {"size": [450, 700]}}, resize_reference, BILINEAR_RESIZE, "nearest"
            ),
            Reference(
                {"resize": {"size": [450, 700], "interpolation": "nearest"}},
                window_nearest_reference,
                NEAREST_RESIZE,
            ),
        ),
    ),
    "resize_shorter_side": OpCase(
        op={"resize_shorter_side": {"size": 72}},
        identity=lambda size: [({"resize_shorter_side": {"size": min(size)}}, unchanged)],
        bounds=lambda params, size: {
            "size": Fixed(tuple(round(side * params["size"] / min(size)) for side in size)),
            "interpolation": Fixed(params["interpolation"]),
        },
        parity=(({"resize_shorter_side": {"size": 72}}, INTERPOLATION),),
        references=(
            Reference(
                {"resize_shorter_side": {"size": 512}},
                resize_shorter_side_reference,
                BILINEAR_RESIZE,
                "nearest",
            ),
        ),
    ),
    "brightness": OpCase(
        op={"brightness": {"factor": [0.4, 1.7]}},
        identity=_same({"brightness": {"factor": [1.0, 1.0]}}),
        bounds=lambda params, size: {"factor": _range(params, "factor")},
        parity=(({"brightness": {"factor": 0.5}}, ROUNDING),),
        # PIL's blend truncates. Measured worst: mean 0.51, max 1.
        references=(
            Reference({"brightness": {"factor": 0.5}}, brightness_reference, (0.6, 1, 1.0)),
        ),
    ),
    "contrast": OpCase(
        op={"contrast": {"factor": [0.4, 1.7]}},
        identity=_same({"contrast": {"factor": [1.0, 1.0]}}),
        bounds=lambda params, size: {"factor": _range(params, "factor")},
        parity=(({"contrast": {"factor": 0.5}}, ROUNDING),),
        # Measured: identical; one level of float rounding allowed.
        references=(Reference({"contrast": {"factor": 0.5}}, contrast_reference, (0.05, 1, 0.05)),),
    ),
    "saturation": OpCase(
        op={"saturation": {"factor": [0.0, 2.0]}},
        identity=_same({"saturation": {"factor": [1.0, 1.0]}}),
        bounds=lambda params, size: {"factor": _range(params, "factor")},
        parity=(({"saturation": {"factor": 0.8}}, ROUNDING),),
        # PIL's blend truncates and its luma is whole levels. Measured worst: mean 0.57, max 1.
        references=(
            Reference({"saturation": {"factor": 0.6}}, saturation_reference, (0.7, 2, 1.0)),
        ),
    ),
    "hue": OpCase(
        op={"hue": {"degrees": [-60, 120]}},
        identity=_same({"hue": {"degrees": [0, 0]}}),
        bounds=lambda params, size: {"angle": _range(params, "degrees")},
        parity=(({"hue": {"degrees": 90}}, ROUNDING),),
        # Measured worst: mean 0.13, max 1.
        references=(Reference({"hue": {"degrees": 90}}, hue_reference, (0.3, 2, 1.0)),),
    ),
    "grayscale": OpCase(
        op={"grayscale": {"p": 0.4}},
        identity=_same({"grayscale": {"p": 0.0}}),
        bounds=lambda params, size: {"applied": Chance(params["p"])},
        parity=(({"grayscale": {"p": 0.5}}, ROUNDING),),
        # Measured worst: mean 0.00, max 1 (PIL's integer luma weights).
        references=(
            Reference({"grayscale": {"p": 0.5}}, grayscale_reference, ROUNDING, samples=6),
        ),
    ),
    "random_erasing": OpCase(
        op={"random_erasing": {"p": 0.8, "scale": [0.05, 0.3], "ratio": [0.5, 2.0], "value": 7}},
        identity=_same({"random_erasing": {"p": 0.0}}),
        bounds=lambda params, size: {
            "applied": Chance(params["p"]),
            "value": Fixed(params["value"]),
            "rectangles": Windows(size, params["scale"], params["ratio"], strictly_inside=True),
        },
        parity=(({"random_erasing": {"p": 1.0}}, EXACT),),
        references=(
            Reference(
                {"random_erasing": {"p": 0.7, "value": 9}}, erase_reference, EXACT, samples=5
            ),
        ),
    ),
    "cutout": OpCase(
        op={"cutout": {"p": 0.6, "size": [21, 30], "holes": 3, "value": 200}},
        identity=_same({"cutout": {"p": 0.0, "size": 10}}),
        bounds=lambda params, size: {
            "applied": Chance(params["p"]),
            "value": Fixed(params["value"]),
            "rectangles": Holes(size, params["size"], params["holes"]),
        },
        parity=(({"cutout": {"size": 12, "holes": 4, "value": 200}}, EXACT),),
        references=(
            Reference(
                {"cutout": {"size": [40, 25], "holes": 4, "value": 3}}, erase_reference, EXACT
            ),
        ),
    ),
    "posterize": OpCase(
        op={"posterize": {"bits": 3, "p": 0.6}},
        identity=lambda size: [
            ({"posterize": {"p": 0.0}}, unchanged),
            ({"posterize": {"bits": 8, "p": 1.0}}, unchanged),
        ],
        bounds=lambda params, size: {"applied": Chance(params["p"]), "bits": Fixed(params["bits"])},
        parity=(({"posterize": {"bits": 2, "p": 1.0}}, EXACT),),
        references=(
            Reference({"posterize": {"bits": 3, "p": 0.7}}, posterize_reference, EXACT, samples=4),
        ),
    ),
    "solarize": OpCase(
        op={"solarize": {"threshold": 100.5, "p": 0.6}},
        identity=lambda size: [
            ({"solarize": {"p": 0.0}}, unchanged),
            ({"solarize": {"threshold": 256, "p": 1.0}}, unchanged),
        ],
        bounds=lambda params, size: {
            "applied": Chance(params["p"]),
            "threshold": Fixed(params["threshold"]),
        },
        parity=(({"solarize": {"threshold": 77, "p": 1.0}}, EXACT),),
        references=(
            Reference({"solarize": {"threshold": 140.5, "p": 0.7}}, solarize_reference, EXACT, samples=4),
        ),
    ),
    "invert": OpCase(
        op={"invert": {"p": 0.3}},
        identity=_same({"invert": {"p": 0.0}}),
        bounds=lambda params, size: {"applied": Chance(params["p"])},
        parity=(({"invert": {"p": 1.0}}, EXACT),),
        references=(Reference({"invert": {"p": 0.7}}, invert_reference, EXACT, samples=4),),
    ),
    "autocontrast": OpCase(
        op={"autocontrast": {"p": 0.6}},
        identity=_same({"autocontrast": {"p": 0.0}}),
        bounds=lambda params, size: {"applied": Chance(params["p"])},
        parity=(({"autocontrast": {"p": 1.0}}, EXACT),),
        # PIL computes the table in floats (int(v * scale + offset)). Measured worst: mean 0.005,
        # max 1, 1.4 % of pixels.
        references=(
            Reference(
                {"autocontrast": {"p": 1.0}},
                autocontrast_reference,
                (0.02, 1, 0.02),
                images=("chelsea.png", "coffee.jpg", "rocket.png"),
                samples=1,
            ),
        ),
    ),
    "equalize": OpCase(
        op={"equalize": {"p": 0.6}},
        identity=_same({"equalize": {"p": 0.0}}),
        bounds=lambda params, size: {"applied": Chance(params["p"])},
        parity=(({"equalize": {"p": 1.0}}, EXACT),),
        references=(
            Reference(
                {"equalize": {"p": 1.0}},
                equalize_opencv_reference,
                EXACT,
                images=("chelsea.png", "coffee.jpg", "astronaut.jpg", "pattern.png"),
                samples=1,
            ),
            # torchvision's (PIL's) table, on pictures without a large share of one extreme
            # value: measured worst mean 2.8, max 5. (OpenCV leaves the darkest value's pixels
            # out of the stretch, PIL the brightest's: on astronaut.jpg, a quarter black, the
            # tables are 12 levels apart on average.)
            Reference(
                {"equalize": {"p": 1.0}},
                equalize_pil_reference,
                (3.5, 8, 1.0),
                images=("chelsea.png", "coffee.jpg", "rocket.png"),
                samples=1,
            ),
        ),
    ),
    "sharpness": OpCase(
        op={"sharpness": {"factor": [0.2, 2.5], "p": 0.8}},
        identity=lambda size: [
            ({"sharpness": {"factor": [1.0, 1.0], "p": 1.0}}, unchanged),
            ({"sharpness": {"factor": [0.0, 3.0], "p": 0.0}}, unchanged),
        ],
        bounds=lambda params, size: {
            "applied": Chance(params["p"]),
            "factor": _range(params, "factor"),
        },
        parity=(({"sharpness": {"factor": [0.0, 3.0], "p": 1.0}}, ROUNDING),),
        # PIL rounds the smoothed image, then truncates the blend; augserve rounds once.
        # Measured worst: mean 0.35, max 1, 66 % of pixels.
        references=(
            Reference(
                {"sharpness": {"factor": [0.1, 1.9], "p": 1.0}}, sharpness_reference, (0.5, 1, 0.85)
            ),
        ),
    ),
    "gaussian_blur": OpCase(
        op={"gaussian_blur": {"sigma": [0.3, 2.5], "p": 0.8}},
        identity=lambda size: [
            ({"gaussian_blur": {"p": 0.0}}, unchanged),
            ({"gaussian_blur": {"sigma": [0.0, 0.0]}}, unchanged),
        ],
        bounds=lambda params, size: {
            "applied": Chance(params["p"]),
            "sigma": _range(params, "sigma"),
        },
        parity=(({"gaussian_blur": {"sigma": [0.5, 3.0]}}, ROUNDING),),
        # float32 taps against scipy's float64. Measured worst: mean 0.0000, max 1, 0.01 % of
        # pixels.
        references=(
            Reference({"gaussian_blur": {"sigma": [0.4, 2.5]}}, gaussian_blur_reference, (0.02, 1, 0.02)),
        ),
    ),
    "rand_augment": OpCase(
        op={"rand_augment": {"num_ops": 2, "magnitude": 12, "bins": 21}},
        identity=_same({"rand_augment": {"num_ops": 0}}),
        bounds=lambda params, size: {
            ("ops", "magnitudes"): SubOpDraws(
                RAND_AUGMENT_SPACE, params["bins"], size, level=params["magnitude"]
            ),
        },
        parity=(({"rand_augment": {"num_ops": 2, "magnitude": 9}}, POLICY_PARITY),),
        # One sub-op per sample, so the drawn order cannot differ from augserve's.
        references=(
            Reference(
                {"rand_augment": {"num_ops": 1, "magnitude": 15}},
                rand_augment_reference,
                POLICY_REFERENCE,
                samples=24,
            ),
        ),
    ),
    "trivial_augment_wide": OpCase(
        op={"trivial_augment_wide": {"bins": 5}},
        # No setting of TrivialAugment is neutral; tests/unit/test_policies.py checks that its
        # Identity draws are.
        identity=lambda size: [],
        bounds=lambda params, size: {
            ("op", "magnitude"): SubOpDraws(
                TRIVIAL_AUGMENT_WIDE_SPACE, params["bins"], size, single=True
            ),
        },
        parity=(({"trivial_augment_wide": {}}, POLICY_PARITY),),
        references=(
            Reference(
                {"trivial_augment_wide": {}}, trivial_augment_wide_reference, POLICY_REFERENCE, samples=24
            ),
        ),
    ),
    "auto_augment": OpCase(
        op={"auto_augment": {}},
        identity=lambda size: [],
        bounds=lambda params, size: {
            ("sub_policy", "ops", "applied", "magnitudes"): SubPolicyDraws(params["policy"], size),
        },
        parity=(({"auto_augment": {}}, POLICY_PARITY),),
        references=(
            Reference({"auto_augment": {}}, auto_augment_reference, AUTO_AUGMENT_REFERENCE, samples=24),
        ),
    ),
}


# --- the shared checks ------------------------------------------------------------------------


def _records(spec: AugmentSpec, size: Size, count: int) -> list[dict[str, Any]]:
    """The op's record in `count` plans of a `size` image (one op specs: the first draw)."""
    return [make_plan(spec, 1, 0, sample_id, size).draws[0][1] for sample_id in range(count)]


def _is_plain(value: Any) -> bool:
    """Whether `value` is built of Python's own bool, int, float and str in dicts and tuples
    (numpy scalars, which subclass float, do not count)."""
    if isinstance(value, dict):
        return all(type(key) is str and _is_plain(item) for key, item in value.items())
    if isinstance(value, tuple):
        return all(_is_plain(item) for item in value)
    return type(value) in (bool, int, float, str)


class OpChecks:
    """The checks every op's class runs; `case` is the op's entry of CASES."""

    op_name: str
    case: OpCase

    def spec(self, op: Op | None = None, fill_mode: str = "constant") -> AugmentSpec:
        return spec_of(op or self.case.op, fill_mode=fill_mode, fill_value=FILL_VALUE)

    def test_input_is_not_mutated(self, sources, opencv_backend, dali_backend):
        """Backends leave the encoded bytes and the decoded array alone; `draw` does not write to
        its parameters (it gets a read-only mapping) and `apply` does not write to its record."""
        spec = self.spec()
        source = sources["chelsea.png"]
        data = bytearray(source.data)  # writable, so that a write would show
        plan = plan_for(spec, source, sample_id=3)
        for backend in (opencv_backend, dali_backend):
            result = backend.augment([data], [plan])
            assert result.kept == [0], result.failures
            assert data == source.data, backend.name
        pixels = source.pixels.copy()
        out = np.empty((*plan.output_size, 3), np.uint8)
        apply_plan(pixels, plan, out)
        assert np.array_equal(pixels, source.pixels)

        definition, values = OPS[self.op_name], spec.ops[0].values
        frozen_params = MappingProxyType(copy.deepcopy(values))
        for sample_id in range(20):
            numbers = uniforms(1, 0, sample_id, definition.uniforms).tolist()
            record = definition.draw(frozen_params, numbers, (97, 131))
            assert record == definition.draw(values, numbers, (97, 131))
            before = copy.deepcopy(record)
            definition.apply(record, Canvas(97, 131))
            assert record == before
        assert dict(frozen_params) == values

    def test_identity_setting_is_the_identity(self, sources, backend):
        for name in ("chelsea.png", "pattern.png"):
            source = sources[name]
            for op, expected in self.case.identity(source.pixels.shape[:2]):
                for sample_id in range(3):
                    out = augmented(backend, source, plan_for(self.spec(op), source, sample_id))
                    assert np.array_equal(out, expected(source.pixels)), (name, op, sample_id)

    def test_draws_lie_within_the_declared_bounds(self):
        spec = self.spec()
        for size in self.case.canvas_sizes:
            records = _records(spec, size, DRAWS_PER_SIZE)
            bounds = self.case.bounds(spec.ops[0].values, size)
            checked = {
                key for keys in bounds for key in ((keys,) if isinstance(keys, str) else keys)
            }
            assert set(records[0]) == checked, "every record field needs a bound"
            for keys, bound in bounds.items():
                if isinstance(keys, str):
                    values = [record[keys] for record in records]
                else:
                    values = [tuple(record[key] for key in keys) for record in records]
                try:
                    bound.check(values)
                except AssertionError as error:
                    raise AssertionError(f"{keys} on a {size} canvas: {error}") from None

    def test_records_are_plain_and_rebuild_the_plan(self):
        """Records hold JSON values only, and applying them alone (after a JSON round trip)
        gives the very plan `make_plan` drew."""
        spec = self.spec()
        for sample_id in range(10):
            for size, orientation in (((97, 131), 1), ((240, 180), 6)):
                plan = make_plan(spec, 2, 1, sample_id, size, orientation)
                assert [name for name, _ in plan.draws] == [self.op_name]
                assert all(_is_plain(record) for _, record in plan.draws), plan.draws
                loaded = json.loads(json.dumps(plan.draws, allow_nan=False))
                rebuilt = plan_from_draws(
                    spec, sample_id, size, [tuple(draw) for draw in loaded], orientation
                )
                assert (
                    np.array_equal(rebuilt.warp, plan.warp)
                    and rebuilt.output_size == plan.output_size
                )
                assert (
                    rebuilt.source_window == plan.source_window
                    and rebuilt.erase_steps == plan.erase_steps
                )
                assert rebuilt.interpolation == plan.interpolation
                assert rebuilt.pixel_steps == plan.pixel_steps
                assert (rebuilt.color is None) == (plan.color is None)
                assert plan.color is None or np.array_equal(rebuilt.color, plan.color)

    @pytest.mark.parametrize("fill_mode", ["constant", "nearest"])
    def test_backends_agree_on_the_same_plan(
        self, sources, opencv_backend, dali_backend, fill_mode
    ):
        for op, tolerance in self.case.parity:
            spec = self.spec(op, fill_mode)
            for name, source in sources.items():
                for sample_id in range(2):
                    plan = plan_for(spec, source, sample_id)
                    expected = augmented(opencv_backend, source, plan)
                    actual = augmented(dali_backend, source, plan)
                    assert_close(expected, actual, tolerance, f"{op} {name} sample {sample_id}")

    def test_matches_an_independent_reference(self, sources, opencv_backend):
        assert self.case.references, "every op needs a reference"
        for reference in self.case.references:
            spec = self.spec(reference.op, reference.fill_mode)
            changed = 0
            for name in reference.images:
                source = sources[name]
                for sample_id in range(reference.samples):
                    plan = plan_for(spec, source, sample_id)
                    expected, mask = reference.function(
                        source.pixels, dict(plan.draws[0][1]), FILL_VALUE
                    )
                    actual = augmented(opencv_backend, source, plan)
                    what = f"{reference.function.__name__} {name} sample {sample_id} {plan.draws[0][1]}"
                    assert actual.shape == expected.shape, what
                    if mask is not None:
                        assert mask.mean() > 0.5, f"{what}: too few pixels compared"
                        actual, expected = actual[mask], expected[mask]
                    assert_close(actual, expected, reference.tolerance, what)
                    changed += expected.shape != source.pixels.shape or not np.array_equal(
                        expected, source.pixels
                    )
            assert changed, (
                f"{reference.op}: the reference never changed an image (a vacuous check)"
            )


def class_name(op_name: str) -> str:
    return "Test" + "".join(part.capitalize() for part in op_name.split("_"))


for _op_name, _case in CASES.items():
    globals()[class_name(_op_name)] = type(
        class_name(_op_name),
        (OpChecks,),
        {"op_name": _op_name, "case": _case, "__doc__": OPS[_op_name].doc},
    )


def test_every_registered_op_has_a_test_class():
    """An op registered without an entry in CASES (so without a class, bounds and reference),
    or an entry for an op that is gone, fails here."""
    assert sorted(CASES) == sorted(OPS)
    for op_name in OPS:
        assert issubclass(globals()[class_name(op_name)], OpChecks)
        assert CASES[op_name].references and all(
            next(iter(ref.op)) == op_name for ref in CASES[op_name].references
        )
        assert next(iter(CASES[op_name].op)) == op_name


def test_register_op_refuses_a_second_name_and_a_missing_half():
    """One op is one class with `draw` and `apply`, registered once."""
    registered = dict(OPS)

    class DrawOnly:
        """Draws, never applies."""

        @staticmethod
        def draw(params: dict[str, Any], u: Sequence[float], size: Size) -> dict[str, Any]:
            return {}

    class Complete(DrawOnly):
        """Draws and applies nothing."""

        @staticmethod
        def apply(record: dict[str, Any], canvas: Canvas) -> None:
            pass

    with pytest.raises(RuntimeError, match="already registered"):
        register_op("rotate", "geometry", uniforms=0, params=())(Complete)
    with pytest.raises(TypeError, match="lacks apply"):
        register_op("draw_only", "color", uniforms=0, params=())(DrawOnly)
    assert OPS == registered
