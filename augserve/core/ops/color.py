"""Colour ops. Each is a linear (affine) map of RGB values in [0, 255]; they compose into the
sample's one colour matrix, applied once after the warp. Values are clamped to [0, 255] only at
the end, not between ops (the price of one pass). Matrices are tuples of rows of floats (see
`augserve.core.ops.canvas`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from augserve.core.ops.canvas import Canvas, ColorLinear
from augserve.core.ops.registry import RangeParam, probability, register_op
from augserve.core.ops.sampling import lerp

# ITU-R BT.601 luma weights, as torchvision and PIL use for grayscale.
LUMA = (0.299, 0.587, 0.114)
MID_GRAY = 127.5
# RGB -> YIQ; hue rotation is a rotation of the I/Q plane.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


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
def brightness(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Scale all channels (as torchvision and Keras brightness_range)."""
    canvas.recolor(_scaling(lerp(params["factor"], u[0])))


@register_op(
    "contrast",
    "color",
    uniforms=1,
    params=(_factor("factor", "Contrast multiplier about mid-gray, drawn uniformly (1 keeps)."),),
)
def contrast(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Scale distances from mid-gray 127.5. (torchvision pivots on each image's mean gray, which
    depends on pixels; a fixed pivot keeps the op a pure function of the plan.)"""
    factor = lerp(params["factor"], u[0])
    offset = (1.0 - factor) * MID_GRAY
    canvas.recolor(_scaling(factor), (offset, offset, offset))


@register_op(
    "saturation",
    "color",
    uniforms=1,
    params=(_factor("factor", "Saturation multiplier, drawn uniformly (0 is gray, 1 keeps)."),),
)
def saturation(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Blend each pixel with its own luma (as torchvision)."""
    factor = lerp(params["factor"], u[0])
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
def hue(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Rotate hue in the YIQ chroma plane, which keeps luma (a linear stand-in for HSV hue)."""
    angle = math.radians(lerp(params["degrees"], u[0]))
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
def grayscale(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Replace all three channels with luma, with probability p (output stays 3-channel)."""
    if u[0] < params["p"]:
        canvas.recolor((LUMA, LUMA, LUMA))
