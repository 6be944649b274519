"""Geometric ops. Each composes into the sample's one affine map; none touches pixels.

Angles are in degrees, positive counter-clockwise as seen on screen (torchvision, Keras, PIL).
Pixels a transform uncovers take the spec's fill (`fill_mode`, `fill_value`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from augserve.core.ops.canvas import Canvas
from augserve.core.ops.registry import (
    BoolParam,
    ChoiceParam,
    IntParam,
    MAX_SIDE,
    RangeParam,
    SizeParam,
    probability,
    register_op,
)
from augserve.core.ops.sampling import UNIFORMS_PER_BOX, lerp, random_box, random_offset

INTERPOLATIONS = ("linear", "nearest")


def _interpolation(default: str = "linear") -> ChoiceParam:
    return ChoiceParam(
        name="interpolation",
        doc="Sampling of the sample's one warp (the last op that names one decides).",
        choices=INTERPOLATIONS,
        default_value=default,
    )


def _size(doc: str) -> SizeParam:
    return SizeParam(name="size", doc=doc)


@register_op(
    "rotate",
    "geometry",
    uniforms=1,
    params=(
        RangeParam(
            name="degrees",
            doc="Angle range in degrees, drawn uniformly; positive is counter-clockwise.",
            low=-360.0,
            high=360.0,
            center=0.0,
        ),
    ),
)
def rotate(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Rotate about the canvas centre, keeping the canvas size (corners take the fill)."""
    angle = math.radians(lerp(params["degrees"], u[0]))
    cos, sin = math.cos(angle), math.sin(angle)
    # With y pointing down, this matrix turns content counter-clockwise on screen.
    canvas.about_center(((cos, sin), (-sin, cos)))


@register_op(
    "flip",
    "geometry",
    uniforms=2,
    params=(
        probability("horizontal", "Probability of mirroring left-right.", 0.5),
        probability("vertical", "Probability of mirroring top-bottom.", 0.0),
    ),
)
def flip(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Mirror left-right and/or top-bottom, each with its own probability."""
    sx = -1.0 if u[0] < params["horizontal"] else 1.0
    sy = -1.0 if u[1] < params["vertical"] else 1.0
    canvas.about_center(((sx, 0.0), (0.0, sy)))


@register_op(
    "shift",
    "geometry",
    uniforms=2,
    params=(
        RangeParam(
            name="x",
            doc="Horizontal shift as a fraction of the width (Keras width_shift_range).",
            low=-1.0,
            high=1.0,
            center=0.0,
            default_value=(0.0, 0.0),
        ),
        RangeParam(
            name="y",
            doc="Vertical shift as a fraction of the height (Keras height_shift_range).",
            low=-1.0,
            high=1.0,
            center=0.0,
            default_value=(0.0, 0.0),
        ),
    ),
)
def shift(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Translate by fractions of the canvas size (sub-pixel; positive is right and down)."""
    shift_x = lerp(params["x"], u[0]) * canvas.width
    shift_y = lerp(params["y"], u[1]) * canvas.height
    canvas.transform(((1.0, 0.0, shift_x), (0.0, 1.0, shift_y)))


@register_op(
    "zoom",
    "geometry",
    uniforms=2,
    params=(
        RangeParam(
            name="range",
            doc="Scale factor of the content, drawn uniformly; > 1 enlarges (zooms in).",
            low=0.05,
            high=20.0,
            center=1.0,
        ),
        BoolParam(
            name="independent",
            doc="Draw the horizontal and vertical factors separately (Keras does).",
            default_value=False,
        ),
    ),
)
def zoom(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Scale about the canvas centre, keeping the canvas size."""
    scale_x = lerp(params["range"], u[0])
    scale_y = lerp(params["range"], u[1]) if params["independent"] else scale_x
    canvas.about_center(((scale_x, 0.0), (0.0, scale_y)))


@register_op(
    "shear",
    "geometry",
    uniforms=1,
    params=(
        RangeParam(
            name="degrees",
            doc="Shear angle range in degrees (Keras shear_range), drawn uniformly.",
            low=-80.0,
            high=80.0,
            center=0.0,
        ),
    ),
)
def shear(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Shear horizontally about the canvas centre: x moves by tan(angle) * (y - centre)."""
    slope = math.tan(math.radians(lerp(params["degrees"], u[0])))
    canvas.about_center(((1.0, slope), (0.0, 1.0)))


@register_op(
    "crop",
    "geometry",
    uniforms=2,
    fixes_size=True,
    params=(
        _size("Output [height, width] in pixels."),
        ChoiceParam(
            name="mode",
            doc="random: a uniformly placed window; center: the middle window.",
            choices=("random", "center"),
            default_value="random",
        ),
    ),
)
def crop(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Take a window of `size` at integer offsets (an exact pixel copy); a window larger than
    the canvas is centred and its margin takes the fill."""
    crop_h, crop_w = params["size"]
    room_h, room_w = canvas.height - crop_h, canvas.width - crop_w
    if params["mode"] == "random" and room_h >= 0:
        top = random_offset(u[0], room_h)
    else:
        top = room_h // 2
    if params["mode"] == "random" and room_w >= 0:
        left = random_offset(u[1], room_w)
    else:
        left = room_w // 2
    canvas.crop_and_scale(top, left, crop_h, crop_w, (crop_h, crop_w))


@register_op(
    "random_resized_crop",
    "geometry",
    uniforms=UNIFORMS_PER_BOX,
    fixes_size=True,
    params=(
        _size("Output [height, width] in pixels."),
        RangeParam(
            name="scale",
            doc="Fraction of the canvas area the window covers, drawn uniformly.",
            low=0.0,
            high=1.0,
            center=0.5,
            default_value=(0.08, 1.0),
        ),
        RangeParam(
            name="ratio",
            doc="Window aspect ratio (width / height), drawn log-uniformly.",
            low=0.05,
            high=20.0,
            center=1.0,
            default_value=(3.0 / 4.0, 4.0 / 3.0),
        ),
        _interpolation(),
    ),
)
def random_resized_crop(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Take a window of random area and aspect (10 tries, as torchvision), scaled to `size`;
    when no try fits, the largest centred window within the ratio bounds."""
    box = random_box(
        u, canvas.height, canvas.width, params["scale"], params["ratio"], strictly_inside=False
    )
    if box is None:
        aspect = canvas.width / canvas.height
        low, high = params["ratio"]
        if aspect < low:
            box_w = canvas.width
            box_h = max(1, int(round(box_w / low)))
        elif aspect > high:
            box_h = canvas.height
            box_w = max(1, int(round(box_h * high)))
        else:
            box_h, box_w = canvas.height, canvas.width
        box = ((canvas.height - box_h) // 2, (canvas.width - box_w) // 2, box_h, box_w)
    top, left, box_h, box_w = box
    canvas.interpolation = params["interpolation"]
    canvas.crop_and_scale(top, left, box_h, box_w, params["size"])


@register_op(
    "resize",
    "geometry",
    uniforms=0,
    fixes_size=True,
    params=(_size("Output [height, width] in pixels."), _interpolation()),
)
def resize(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Scale the whole canvas to `size` (the aspect ratio may change)."""
    canvas.interpolation = params["interpolation"]
    canvas.crop_and_scale(0, 0, canvas.height, canvas.width, params["size"])


@register_op(
    "resize_shorter_side",
    "geometry",
    uniforms=0,
    params=(
        IntParam(
            name="size",
            doc="Length in pixels of the shorter side after scaling.",
            low=1,
            high=MAX_SIDE,
            default_value=256,
        ),
        _interpolation(),
    ),
)
def resize_shorter_side(params: Mapping[str, Any], u: Sequence[float], canvas: Canvas) -> None:
    """Scale keeping the aspect ratio so the shorter side is `size` (follow with a crop to get
    one output size for every image, as in the usual eval transform)."""
    scale = params["size"] / min(canvas.height, canvas.width)
    size = (
        max(1, min(MAX_SIDE, int(round(canvas.height * scale)))),
        max(1, min(MAX_SIDE, int(round(canvas.width * scale)))),
    )
    canvas.interpolation = params["interpolation"]
    canvas.crop_and_scale(0, 0, canvas.height, canvas.width, size)
