"""Per-pixel ops: posterize, solarize, invert, autocontrast, equalize, sharpness, Gaussian blur.

None of them is affine or linear in colour, so none joins the sample's one warp or one colour
matrix. Each appends exactly one `PixelStep` to the canvas per sample (an identity step when it
does not fire), so a spec always gives the same number of steps and a backend one graph for it;
backends run the steps in order on the uint8 image after the warp and the colour matrix, before
erasing. What each step computes is defined once, in `PixelStep`'s docstring.

Parameters follow torchvision's Random* transforms (RandomPosterize(bits, p), RandomSolarize
(threshold, p), RandomInvert(p), RandomAutocontrast(p), RandomEqualize(p),
RandomAdjustSharpness(factor, p), GaussianBlur(sigma)); sharpness and blur draw their number
uniformly from a range, as brightness does. Where the kernels differ from torchvision's:
equalize follows OpenCV's `equalizeHist` (as DALI's `equalize` does; torchvision follows PIL's
rounding: a few gray levels apart), and sharpness filters every pixel with a reflected border
and rounds once (torchvision keeps the 1-pixel frame and rounds the smoothed image first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from augserve.core.ops.canvas import (
    IDENTITY_STEP,
    SMOOTH_KERNEL,
    SMOOTH_KERNEL_SUM,
    Canvas,
    PixelStep,
)
from augserve.core.ops.registry import (
    CanvasSize,
    FloatParam,
    IntParam,
    Params,
    RangeParam,
    probability,
    register_op,
)
from augserve.core.ops.sampling import lerp

MAX_BITS = 8
# Solarize thresholds: a value >= threshold is inverted; 256 inverts none.
MAX_THRESHOLD = 256.0
MAX_SHARPNESS = 10.0
# Sigmas above this have radii (3 sigma) past small images' sides.
MAX_SIGMA = 5.0


class AppliedRecord(TypedDict):
    applied: bool  # whether the op fired for this sample


class PosterizeRecord(AppliedRecord):
    bits: int  # high bits kept, 0 to 8


class SolarizeRecord(AppliedRecord):
    threshold: float  # values >= threshold are inverted, 0 to 256


class SharpnessRecord(AppliedRecord):
    factor: float  # 0 smooths, 1 keeps, 2 sharpens


class BlurRecord(AppliedRecord):
    sigma: float  # pixels


# --- steps, shared with the policies ---------------------------------------------------------


def posterize_step(bits: int) -> PixelStep:
    return IDENTITY_STEP if bits >= MAX_BITS else PixelStep("posterize", int(bits))


def solarize_step(threshold: float) -> PixelStep:
    """Values >= `threshold` (any real number) are inverted: for integer values that is
    values >= ceil(threshold)."""
    level = max(0, math.ceil(threshold))
    return IDENTITY_STEP if level >= MAX_THRESHOLD else PixelStep("solarize", level)


INVERT_STEP = PixelStep("solarize", 0)
AUTOCONTRAST_STEP = PixelStep("autocontrast")
EQUALIZE_STEP = PixelStep("equalize")


def sharpness_step(factor: float) -> PixelStep:
    return IDENTITY_STEP if factor == 1.0 else PixelStep("sharpness", float(factor))


def blur_step(sigma: float) -> PixelStep:
    return IDENTITY_STEP if sigma <= 0.0 else PixelStep("blur", float(sigma))


def sharpness_kernel(factor: float) -> np.ndarray:
    """[3, 3] float32: factor * identity + (1 - factor) * SMOOTH_KERNEL / 13, the weights in
    float32 (both backends filter with exactly these numbers)."""
    smooth = np.array(SMOOTH_KERNEL, np.float32) / np.float32(SMOOTH_KERNEL_SUM)
    identity = np.zeros((3, 3), np.float32)
    identity[1, 1] = 1.0
    return np.float32(factor) * identity + np.float32(1.0 - factor) * smooth


def blur_radius(sigma: float) -> int:
    """The Gaussian's radius in pixels: ceil(3 sigma), as DALI's gaussian_blur takes it."""
    return max(1, math.ceil(3.0 * sigma))


def _add(canvas: Canvas, applied: bool, step: PixelStep) -> None:
    canvas.pixel_steps.append(step if applied else IDENTITY_STEP)


def _applied_draw(params: Params, u: Sequence[float], size: CanvasSize) -> AppliedRecord:
    return {"applied": u[0] < params["p"]}


def _p(default: float = 0.5) -> FloatParam:
    return probability("p", "Probability of applying the op to a sample.", default)


# --- the ops --------------------------------------------------------------------------------


@register_op(
    "posterize",
    "pixel",
    uniforms=1,
    params=(
        IntParam(name="bits", doc="High bits kept of each value (8 keeps all).", low=0, high=MAX_BITS, default_value=4),
        _p(),
    ),
)
class Posterize:
    """Keep the top `bits` bits of every value, with probability p (torchvision
    RandomPosterize)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> PosterizeRecord:
        return {"applied": u[0] < params["p"], "bits": params["bits"]}

    @staticmethod
    def apply(record: PosterizeRecord, canvas: Canvas) -> None:
        _add(canvas, record["applied"], posterize_step(record["bits"]))


@register_op(
    "solarize",
    "pixel",
    uniforms=1,
    params=(
        FloatParam(
            name="threshold",
            doc="Values at or above it are inverted (256 inverts none).",
            low=0.0,
            high=MAX_THRESHOLD,
            default_value=128.0,
        ),
        _p(),
    ),
)
class Solarize:
    """Invert every value at or above the threshold, with probability p (torchvision
    RandomSolarize)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> SolarizeRecord:
        return {"applied": u[0] < params["p"], "threshold": params["threshold"]}

    @staticmethod
    def apply(record: SolarizeRecord, canvas: Canvas) -> None:
        _add(canvas, record["applied"], solarize_step(record["threshold"]))


@register_op("invert", "pixel", uniforms=1, params=(_p(),))
class Invert:
    """Replace every value v by 255 - v, with probability p (torchvision RandomInvert)."""

    draw = staticmethod(_applied_draw)

    @staticmethod
    def apply(record: AppliedRecord, canvas: Canvas) -> None:
        _add(canvas, record["applied"], INVERT_STEP)


@register_op("autocontrast", "pixel", uniforms=1, params=(_p(),))
class Autocontrast:
    """Stretch each channel's darkest to brightest value onto 0..255, with probability p
    (torchvision RandomAutocontrast; integer arithmetic, truncating as torchvision and PIL)."""

    draw = staticmethod(_applied_draw)

    @staticmethod
    def apply(record: AppliedRecord, canvas: Canvas) -> None:
        _add(canvas, record["applied"], AUTOCONTRAST_STEP)


@register_op("equalize", "pixel", uniforms=1, params=(_p(),))
class Equalize:
    """Equalize each channel's histogram, with probability p (torchvision RandomEqualize; the
    lookup table of OpenCV's equalizeHist, as DALI's equalize computes it)."""

    draw = staticmethod(_applied_draw)

    @staticmethod
    def apply(record: AppliedRecord, canvas: Canvas) -> None:
        _add(canvas, record["applied"], EQUALIZE_STEP)


@register_op(
    "sharpness",
    "pixel",
    uniforms=2,
    params=(
        RangeParam(
            name="factor",
            doc="Sharpness factor, drawn uniformly (0 smooths, 1 keeps, 2 sharpens).",
            low=0.0,
            high=MAX_SHARPNESS,
            center=1.0,
        ),
        _p(),
    ),
)
class Sharpness:
    """Blend the image with its 3x3-smoothed self by the drawn factor, with probability p
    (torchvision RandomAdjustSharpness, PIL ImageEnhance.Sharpness)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> SharpnessRecord:
        return {"applied": u[0] < params["p"], "factor": lerp(params["factor"], u[1])}

    @staticmethod
    def apply(record: SharpnessRecord, canvas: Canvas) -> None:
        _add(canvas, record["applied"], sharpness_step(record["factor"]))


@register_op(
    "gaussian_blur",
    "pixel",
    uniforms=2,
    params=(
        RangeParam(
            name="sigma",
            doc="Standard deviation in pixels, drawn uniformly as [low, high] (radius 3 sigma).",
            low=0.0,
            high=MAX_SIGMA,
            center=0.0,
            default_value=(0.1, 2.0),
        ),
        _p(1.0),
    ),
)
class GaussianBlur:
    """Blur with a Gaussian of the drawn sigma, with probability p (torchvision GaussianBlur,
    its kernel size fixed by sigma: 2 ceil(3 sigma) + 1)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> BlurRecord:
        return {"applied": u[0] < params["p"], "sigma": lerp(params["sigma"], u[1])}

    @staticmethod
    def apply(record: BlurRecord, canvas: Canvas) -> None:
        _add(canvas, record["applied"], blur_step(record["sigma"]))
