"""Turning uniform numbers in [0, 1) into integer offsets and boxes (shared by crops and erasing)
and into the one number of single-range ops."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

BOX_ATTEMPTS = 10
UNIFORMS_PER_BOX = 4 * BOX_ATTEMPTS


def lerp(bounds: tuple[float, float], u: float) -> float:
    """The point at fraction `u` of the interval `bounds`: a uniform draw when u is uniform."""
    return bounds[0] + (bounds[1] - bounds[0]) * u


def uniform_draw(
    param: str, field: str
) -> Callable[[Mapping[str, Any], Sequence[float], tuple[int, int]], dict[str, float]]:
    """The `draw` of an op that takes one number uniformly from its range parameter `param`
    with its one uniform, and records it as `field` (e.g. rotate's degrees as its angle)."""

    def draw(
        params: Mapping[str, Any], u: Sequence[float], size: tuple[int, int]
    ) -> dict[str, float]:
        return {field: lerp(params[param], u[0])}

    return draw


def random_offset(u: float, room: int) -> int:
    """An integer in [0, room], uniformly (as randint(0, room + 1)); room must be >= 0."""
    return min(int(u * (room + 1)), room)


def random_box(
    u: Sequence[float],
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    strictly_inside: bool,
) -> tuple[int, int, int, int] | None:
    """Draw a box (top, left, box_height, box_width) covering a `scale` fraction of the area
    with width/height aspect in `ratio` (drawn log-uniformly), as torchvision does.

    Consumes UNIFORMS_PER_BOX numbers: BOX_ATTEMPTS tries of 4. Returns None when no try fits.
    `strictly_inside` requires the box to be smaller than the area on both sides (erasing).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(BOX_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = u[4 * attempt : 4 * attempt + 4]
        target_area = area * lerp(scale, u_area)
        aspect = math.exp(lerp(log_ratio, u_ratio))
        box_width = int(round(math.sqrt(target_area * aspect)))
        box_height = int(round(math.sqrt(target_area / aspect)))
        if strictly_inside:
            fits = box_height < height and box_width < width
        else:
            fits = box_height <= height and box_width <= width
        if box_height > 0 and box_width > 0 and fits:
            top = random_offset(u_top, height - box_height)
            left = random_offset(u_left, width - box_width)
            return top, left, box_height, box_width
    return None
