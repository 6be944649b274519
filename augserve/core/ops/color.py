"""Colour ops. Each is a linear (affine) map of RGB values in [0, 255]; they compose into the
sample's one colour matrix, applied once after the warp. Values are clamped to [0, 255] only at
the end, not between ops (the price of one pass). Matrices are tuples of rows of floats (see
`augserve.core.ops.canvas`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from augserve.core.ops.canvas import Canvas, ColorLinear
from augserve.core.ops.registry import CanvasSize, Params, RangeParam, probability, register_op
from augserve.core.ops.sampling import uniform_draw

# ITU-R BT.601 luma weights, as torchvision and PIL use for grayscale.
LUMA = (0.299, 0.587, 0.114)
MID_GRAY = 127.5
# RGB -> YIQ; hue rotation is a rotation of the I/Q plane.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


class FactorRecord(TypedDict):
    factor: float  # the drawn multiplier (1 keeps the image)


class HueRecord(TypedDict):
    angle: float  # degrees of rotation in the YIQ chroma plane


class GrayscaleRecord(TypedDict):
    applied: bool


def _scaling(factor: float) -> ColorLinear:
    """factor times the 3x3 identity."""
    return ((factor, 0.0, 0.0), (0.0, factor, 0.0), (0.0, 0.0, factor))


def _factor(name: str, doc: str) -> RangeParam:
    return RangeParam(name=name, doc=doc, low=0.0, high=100.0, center=1.0)


@register_op(
    "brightness",
    "color",
    uniforms=1,
    params=(_factor("factor", "Multiplier of every channel, drawn uniformly (1 keeps)."),),
)
class Brightness:
    """Scale all channels (as torchvision and Keras brightness_range)."""

    draw = staticmethod(uniform_draw("factor", "factor"))

    @staticmethod
    def apply(record: FactorRecord, canvas: Canvas) -> None:
        canvas.recolor(_scaling(record["factor"]))


@register_op(
    "contrast",
    "color",
    uniforms=1,
    params=(_factor("factor", "Contrast multiplier about mid-gray, drawn uniformly (1 keeps)."),),
)
class Contrast:
    """Scale distances from mid-gray 127.5. (torchvision pivots on each image's mean gray, which
    depends on pixels; a fixed pivot keeps the op a pure function of the plan.)"""

    draw = staticmethod(uniform_draw("factor", "factor"))

    @staticmethod
    def apply(record: FactorRecord, canvas: Canvas) -> None:
        factor = record["factor"]
        offset = (1.0 - factor) * MID_GRAY
        canvas.recolor(_scaling(factor), (offset, offset, offset))


@register_op(
    "saturation",
    "color",
    uniforms=1,
    params=(_factor("factor", "Saturation multiplier, drawn uniformly (0 is gray, 1 keeps)."),),
)
class Saturation:
    """Blend each pixel with its own luma (as torchvision)."""

    draw = staticmethod(uniform_draw("factor", "factor"))

    @staticmethod
    def apply(record: FactorRecord, canvas: Canvas) -> None:
        factor = record["factor"]
        # Each channel becomes factor * itself + (1 - factor) * luma.
        gray_share = 1.0 - factor
        luma_r, luma_g, luma_b = gray_share * LUMA[0], gray_share * LUMA[1], gray_share * LUMA[2]
        canvas.recolor(
            (
                (factor + luma_r, luma_g, luma_b),
                (luma_r, factor + luma_g, luma_b),
                (luma_r, luma_g, factor + luma_b),
            )
        )


@register_op(
    "hue",
    "color",
    uniforms=1,
    params=(
        RangeParam(
            name="degrees",
            doc="Hue rotation range in degrees, drawn uniformly (180 is the opposite hue).",
            low=-180.0,
            high=180.0,
            center=0.0,
        ),
    ),
)
class Hue:
    """Rotate hue in the YIQ chroma plane, which keeps luma (a linear stand-in for HSV hue)."""

    draw = staticmethod(uniform_draw("degrees", "angle"))

    @staticmethod
    def apply(record: HueRecord, canvas: Canvas) -> None:
        angle = math.radians(record["angle"])
        cos, sin = math.cos(angle), math.sin(angle)
        rotation = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
        red, green, blue = (YIQ_TO_RGB @ rotation @ RGB_TO_YIQ).tolist()
        canvas.recolor((tuple(red), tuple(green), tuple(blue)))


@register_op(
    "grayscale",
    "color",
    uniforms=1,
    params=(probability("p", "Probability of turning the image gray.", 0.1),),
)
class Grayscale:
    """Replace all three channels with luma, with probability p (output stays 3-channel)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> GrayscaleRecord:
        return {"applied": u[0] < params["p"]}

    @staticmethod
    def apply(record: GrayscaleRecord, canvas: Canvas) -> None:
        if record["applied"]:
            canvas.recolor((LUMA, LUMA, LUMA))
