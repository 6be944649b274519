"""Geometric ops. Each composes into the sample's one affine map; none touches pixels.

Angles are in degrees, positive counter-clockwise as seen on screen (torchvision, Keras, PIL).
Pixels a transform uncovers take the spec's fill (`fill_mode`, `fill_value`). Windows
(top, left, height, width) are in pixels of the canvas the op sees; sizes are (height, width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

from augserve.core.ops.canvas import Canvas
from augserve.core.ops.registry import (
    MAX_SIDE,
    BoolParam,
    CanvasSize,
    ChoiceParam,
    IntParam,
    Params,
    RangeParam,
    SizeParam,
    probability,
    register_op,
)
from augserve.core.ops.sampling import (
    UNIFORMS_PER_BOX,
    lerp,
    random_box,
    random_offset,
    uniform_draw,
)

INTERPOLATIONS = ("linear", "nearest")


class AngleRecord(TypedDict):
    angle: float  # degrees


class FlipRecord(TypedDict):
    horizontal: bool  # mirrored left-right
    vertical: bool  # mirrored top-bottom


class ShiftRecord(TypedDict):
    dx: float  # pixels, positive is right
    dy: float  # pixels, positive is down


class ZoomRecord(TypedDict):
    scale_x: float  # content scale factors; > 1 enlarges
    scale_y: float


class WindowRecord(TypedDict):
    top: int  # the window of the canvas taken, in pixels (may reach outside it)
    left: int
    height: int
    width: int


class ResizedWindowRecord(WindowRecord):
    size: tuple[int, int]  # (height, width) the window is scaled to
    interpolation: str


class ResizeRecord(TypedDict):
    size: tuple[int, int]  # (height, width) the whole canvas is scaled to
    interpolation: str


def _interpolation(default: str = "linear") -> ChoiceParam:
    return ChoiceParam(
        name="interpolation",
        doc="Sampling of the sample's one warp (the last op that names one decides).",
        choices=INTERPOLATIONS,
        default_value=default,
    )


def _size(doc: str) -> SizeParam:
    return SizeParam(name="size", doc=doc)


def _apply_resize(record: ResizeRecord, canvas: Canvas) -> None:
    """Scale the whole canvas to `record["size"]`."""
    canvas.interpolation = record["interpolation"]
    canvas.crop_and_scale(0, 0, canvas.height, canvas.width, record["size"])


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
class Rotate:
    """Rotate about the canvas centre, keeping the canvas size (corners take the fill)."""

    draw = staticmethod(uniform_draw("degrees", "angle"))

    @staticmethod
    def apply(record: AngleRecord, canvas: Canvas) -> None:
        angle = math.radians(record["angle"])
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
class Flip:
    """Mirror left-right and/or top-bottom, each with its own probability."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> FlipRecord:
        return {"horizontal": u[0] < params["horizontal"], "vertical": u[1] < params["vertical"]}

    @staticmethod
    def apply(record: FlipRecord, canvas: Canvas) -> None:
        sx = -1.0 if record["horizontal"] else 1.0
        sy = -1.0 if record["vertical"] else 1.0
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
class Shift:
    """Translate by fractions of the canvas size (sub-pixel; positive is right and down)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> ShiftRecord:
        height, width = size
        return {"dx": lerp(params["x"], u[0]) * width, "dy": lerp(params["y"], u[1]) * height}

    @staticmethod
    def apply(record: ShiftRecord, canvas: Canvas) -> None:
        canvas.transform(((1.0, 0.0, record["dx"]), (0.0, 1.0, record["dy"])))


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
class Zoom:
    """Scale about the canvas centre, keeping the canvas size."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> ZoomRecord:
        scale_x = lerp(params["range"], u[0])
        scale_y = lerp(params["range"], u[1]) if params["independent"] else scale_x
        return {"scale_x": scale_x, "scale_y": scale_y}

    @staticmethod
    def apply(record: ZoomRecord, canvas: Canvas) -> None:
        canvas.about_center(((record["scale_x"], 0.0), (0.0, record["scale_y"])))


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
class Shear:
    """Shear horizontally about the canvas centre: x moves by tan(angle) * (y - centre)."""

    draw = staticmethod(uniform_draw("degrees", "angle"))

    @staticmethod
    def apply(record: AngleRecord, canvas: Canvas) -> None:
        slope = math.tan(math.radians(record["angle"]))
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
class Crop:
    """Take a window of `size` at integer offsets (an exact pixel copy); a window larger than
    the canvas is centred and its margin takes the fill."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> WindowRecord:
        crop_h, crop_w = params["size"]
        room_h, room_w = size[0] - crop_h, size[1] - crop_w
        random_mode = params["mode"] == "random"
        top = random_offset(u[0], room_h) if random_mode and room_h >= 0 else room_h // 2
        left = random_offset(u[1], room_w) if random_mode and room_w >= 0 else room_w // 2
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    @staticmethod
    def apply(record: WindowRecord, canvas: Canvas) -> None:
        height, width = record["height"], record["width"]
        canvas.crop_and_scale(record["top"], record["left"], height, width, (height, width))


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
class RandomResizedCrop:
    """Take a window of random area and aspect (10 tries, as torchvision), scaled to `size`;
    when no try fits, the largest centred window within the ratio bounds."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> ResizedWindowRecord:
        height, width = size
        box = random_box(u, height, width, params["scale"], params["ratio"], strictly_inside=False)
        if box is None:
            aspect = width / height
            low, high = params["ratio"]
            if aspect < low:
                box_w = width
                box_h = max(1, int(round(box_w / low)))
            elif aspect > high:
                box_h = height
                box_w = max(1, int(round(box_h * high)))
            else:
                box_h, box_w = height, width
            box = ((height - box_h) // 2, (width - box_w) // 2, box_h, box_w)
        top, left, box_h, box_w = box
        return {
            "top": top,
            "left": left,
            "height": box_h,
            "width": box_w,
            "size": params["size"],
            "interpolation": params["interpolation"],
        }

    @staticmethod
    def apply(record: ResizedWindowRecord, canvas: Canvas) -> None:
        canvas.interpolation = record["interpolation"]
        canvas.crop_and_scale(
            record["top"], record["left"], record["height"], record["width"], record["size"]
        )


@register_op(
    "resize",
    "geometry",
    uniforms=0,
    fixes_size=True,
    params=(_size("Output [height, width] in pixels."), _interpolation()),
)
class Resize:
    """Scale the whole canvas to `size` (the aspect ratio may change)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> ResizeRecord:
        return {"size": params["size"], "interpolation": params["interpolation"]}

    apply = staticmethod(_apply_resize)


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
class ResizeShorterSide:
    """Scale keeping the aspect ratio so the shorter side is `size` (follow with a crop to get
    one output size for every image, as in the usual eval transform)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> ResizeRecord:
        height, width = size
        scale = params["size"] / min(height, width)
        output_size = (
            max(1, min(MAX_SIDE, int(round(height * scale)))),
            max(1, min(MAX_SIDE, int(round(width * scale)))),
        )
        return {"size": output_size, "interpolation": params["interpolation"]}

    apply = staticmethod(_apply_resize)
