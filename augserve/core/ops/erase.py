"""Erasing ops: fill rectangles of the output with a constant. They act on the final canvas,
after the warp and the colour matrix, so a spec must list them after every other op."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from augserve.core.ops.canvas import Canvas, EraseStep
from augserve.core.ops.registry import (
    CanvasSize,
    IntParam,
    Params,
    RangeParam,
    SizeParam,
    probability,
    register_op,
)
from augserve.core.ops.sampling import UNIFORMS_PER_BOX, random_box, random_offset

MAX_CUTOUT_HOLES = 16


class EraseRecord(TypedDict):
    applied: bool  # whether the op fired (its rectangles may still be none: nothing fitted)
    value: int  # fill of every channel
    rectangles: tuple[tuple[int, int, int, int], ...]  # (top, left, height, width), pixels


def _apply_erase(record: EraseRecord, canvas: Canvas) -> None:
    # Tuples again, should the record have travelled through JSON (lists).
    rectangles = tuple(tuple(rectangle) for rectangle in record["rectangles"])
    canvas.erase_steps.append(EraseStep(record["value"], rectangles))


def _value() -> IntParam:
    return IntParam(name="value", doc="Fill value of erased pixels (all channels).", low=0, high=255, default_value=0)


@register_op(
    "random_erasing",
    "erase",
    uniforms=1 + UNIFORMS_PER_BOX,
    params=(
        probability("p", "Probability of erasing one rectangle.", 0.5),
        RangeParam(
            name="scale",
            doc="Fraction of the image area erased, drawn uniformly.",
            low=0.0,
            high=1.0,
            center=0.5,
            default_value=(0.02, 0.33),
        ),
        RangeParam(
            name="ratio",
            doc="Aspect ratio (width / height) of the rectangle, drawn log-uniformly.",
            low=0.05,
            high=20.0,
            center=1.0,
            default_value=(0.3, 3.3),
        ),
        _value(),
    ),
)
class RandomErasing:
    """Erase one rectangle of random area and aspect with probability p (Zhong et al., as
    torchvision RandomErasing with a constant value); nothing when 10 tries do not fit."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> EraseRecord:
        applied = u[0] < params["p"]
        box = None
        if applied:
            box = random_box(u[1:], *size, params["scale"], params["ratio"], strictly_inside=True)
        rectangles = () if box is None else (box,)
        return {"applied": applied, "value": params["value"], "rectangles": rectangles}

    apply = staticmethod(_apply_erase)


@register_op(
    "cutout",
    "erase",
    uniforms=1 + 2 * MAX_CUTOUT_HOLES,
    params=(
        probability("p", "Probability of cutting the holes.", 1.0),
        SizeParam(name="size", doc="Hole [height, width] in pixels."),
        IntParam(name="holes", doc="Number of holes.", low=1, high=MAX_CUTOUT_HOLES, default_value=1),
        _value(),
    ),
)
class Cutout:
    """Erase `holes` rectangles of `size` centred uniformly on the image, clipped at its edges
    (DeVries and Taylor)."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> EraseRecord:
        height, width = size
        applied = u[0] < params["p"]
        rectangles = []
        if applied:
            hole_h, hole_w = params["size"]
            for hole in range(params["holes"]):
                center_y = random_offset(u[1 + 2 * hole], height - 1)
                center_x = random_offset(u[2 + 2 * hole], width - 1)
                top, left = max(0, center_y - hole_h // 2), max(0, center_x - hole_w // 2)
                bottom = min(height, center_y - hole_h // 2 + hole_h)
                right = min(width, center_x - hole_w // 2 + hole_w)
                if bottom > top and right > left:
                    rectangles.append((top, left, bottom - top, right - left))
        return {"applied": applied, "value": params["value"], "rectangles": tuple(rectangles)}

    apply = staticmethod(_apply_erase)
