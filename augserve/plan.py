"""Per-sample plans: a spec's randomness drawn once and turned into plain numbers.

Each sample's uniform random numbers come from a counter-based generator (Philox) keyed by
(seed, epoch, sample_id), so a plan depends on nothing else: not batch size, thread count,
backend or request order. Ops consume a fixed count of numbers each, in spec order, whether or
not they fire, so adding a sample or changing a probability never shifts another op's draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from augserve.errors import SpecError
from augserve.ops import Canvas, EraseStep
from augserve.spec import AugmentSpec

MAX_SEED = 2**64 - 1
MAX_EPOCH = 2**24 - 1
MAX_SAMPLE_ID = 2**40 - 1
# Bilinear sampling reads one pixel beyond a coordinate; one more guards rounding.
WINDOW_MARGIN = 2
# Nearest-neighbour scaling by whole factors puts source coordinates exactly between two
# pixels, where backends round differently (OpenCV in fixed point, DALI in float). Moving
# every coordinate by 1/64 pixel decides those ties the same way everywhere (upwards).
NEAREST_TIE_BREAK = 1.0 / 64.0


def uniforms(seed: int, epoch: int, sample_id: int, count: int) -> np.ndarray:
    """`count` float64 numbers in [0, 1) for this (seed, epoch, sample_id)."""
    if not 0 <= seed <= MAX_SEED:
        raise SpecError("seed", f"{seed} is outside [0, 2**64 - 1]")
    if not 0 <= epoch <= MAX_EPOCH:
        raise SpecError("epoch", f"{epoch} is outside [0, 2**24 - 1]")
    if not 0 <= sample_id <= MAX_SAMPLE_ID:
        raise SpecError("sample_id", f"{sample_id} is outside [0, 2**40 - 1]")
    key = np.array([seed, (epoch << 40) | sample_id], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key)).random(count)


def orientation_matrix(orientation: int, stored_size: tuple[int, int]) -> np.ndarray:
    """3x3 map from stored pixel coordinates to upright ones for an EXIF orientation (1..8)."""
    height, width = stored_size
    right, bottom = width - 1.0, height - 1.0
    # (x', y') as rows of [coefficient of x, coefficient of y, constant]
    table = {
        1: ((1, 0, 0), (0, 1, 0)),
        2: ((-1, 0, right), (0, 1, 0)),  # mirrored left-right
        3: ((-1, 0, right), (0, -1, bottom)),  # rotated 180
        4: ((1, 0, 0), (0, -1, bottom)),  # mirrored top-bottom
        5: ((0, 1, 0), (1, 0, 0)),  # transposed
        6: ((0, -1, bottom), (1, 0, 0)),  # needs 90 degrees clockwise
        7: ((0, -1, bottom), (-1, 0, right)),  # transversed
        8: ((0, 1, 0), (-1, 0, right)),  # needs 90 degrees counter-clockwise
    }
    matrix = np.eye(3)
    matrix[:2] = np.array(table[orientation], dtype=np.float64)
    return matrix


@dataclass(frozen=True, eq=False)
class SamplePlan:
    """Everything a backend needs to augment one sample, as plain numbers.

    Sizes are (height, width) in pixels; `source_size` is the image as stored, before its EXIF
    orientation, which the warp includes. `warp` maps output pixel coordinates to stored pixel
    coordinates (pixel centres at integers; OpenCV's WARP_INVERSE_MAP convention).
    `source_window` (x, y, width, height) is the part of the source the warp reads, clipped to
    the image. `color` is a 3x4 affine map on RGB in [0, 255], or None for identity.
    """

    sample_id: int
    source_size: tuple[int, int]
    output_size: tuple[int, int]
    warp: np.ndarray
    source_window: tuple[int, int, int, int]
    color: np.ndarray | None
    erase_steps: tuple[EraseStep, ...]
    interpolation: str
    fill_mode: str
    fill_value: int

    @property
    def is_pixel_copy(self) -> bool:
        """True when the warp is an integer translation: a plain copy, no interpolation."""
        linear = self.warp[:, :2]
        offsets = self.warp[:, 2]
        return bool(np.array_equal(linear, np.eye(2)) and np.all(offsets == np.round(offsets)))


def _source_window(inverse: np.ndarray, source_size: tuple[int, int], output_size: tuple[int, int]) -> tuple[int, int, int, int]:
    source_h, source_w = source_size
    out_h, out_w = output_size
    corners = np.array(
        [[-0.5, -0.5, 1.0], [out_w - 0.5, -0.5, 1.0], [-0.5, out_h - 0.5, 1.0], [out_w - 0.5, out_h - 0.5, 1.0]]
    )
    mapped = corners @ inverse.T
    x0 = max(0, math.floor(mapped[:, 0].min()) - WINDOW_MARGIN)
    y0 = max(0, math.floor(mapped[:, 1].min()) - WINDOW_MARGIN)
    x1 = min(source_w, math.ceil(mapped[:, 0].max()) + WINDOW_MARGIN + 1)
    y1 = min(source_h, math.ceil(mapped[:, 1].max()) + WINDOW_MARGIN + 1)
    if x1 <= x0 or y1 <= y0:
        # The output sees only fill; decode a single pixel to keep backends uniform.
        return (0, 0, 1, 1)
    return (x0, y0, x1 - x0, y1 - y0)


def make_plan(
    spec: AugmentSpec,
    seed: int,
    epoch: int,
    sample_id: int,
    source_size: tuple[int, int],
    orientation: int = 1,
) -> SamplePlan:
    """Draw the plan of one sample stored as `source_size` (height, width) pixels with EXIF
    `orientation`; ops see the upright image."""
    numbers = uniforms(seed, epoch, sample_id, spec.uniform_count)
    upright = source_size if orientation <= 4 else (source_size[1], source_size[0])
    canvas = Canvas(height=upright[0], width=upright[1], forward=orientation_matrix(orientation, source_size))
    offset = 0
    for op in spec.ops:
        definition = op.definition
        definition.plan(op.values, numbers[offset : offset + definition.uniforms], canvas)
        offset += definition.uniforms
    inverse = np.linalg.inv(canvas.forward)[:2]
    if canvas.interpolation == "nearest" and not np.allclose(inverse[:, :2], np.eye(2)):
        inverse[:, 2] += NEAREST_TIE_BREAK
    output_size = (canvas.height, canvas.width)
    color = None if np.allclose(canvas.color, np.eye(4)) else canvas.color[:3].astype(np.float32)
    return SamplePlan(
        sample_id=sample_id,
        source_size=source_size,
        output_size=output_size,
        warp=inverse,
        source_window=_source_window(inverse, source_size, output_size),
        color=color,
        erase_steps=tuple(canvas.erase_steps),
        interpolation=canvas.interpolation,
        fill_mode=spec.fill_mode,
        fill_value=spec.fill_value,
    )
