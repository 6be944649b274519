"""Per-sample plans: a spec's randomness drawn once and turned into plain numbers.

Each sample's uniform random numbers come from a counter-based generator (Philox) keyed by
(seed, epoch, sample_id), so a plan depends on nothing else: not batch size, thread count,
backend or request order. Ops consume a fixed count of numbers each, in spec order, whether or
not they fire, so adding a sample or changing a probability never shifts another op's draws.

Each op first draws a record (the plain numbers it decided, e.g. {"angle": 12.3}), then applies
it to the sample's canvas; a plan keeps its records (`SamplePlan.draws`), `explain_plan` shows
them and `plan_from_draws` rebuilds the plan from them alone.

A plan runs in three stages: one warp (every geometric op), one colour matrix (every linear
colour op), then the per-pixel steps (posterize, equalize, sharpness, ..., and what policies
drew) in order; erasing comes last.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from augserve.core.errors import SpecError
from augserve.core.ops import OPS, Canvas, EraseStep, PixelStep
from augserve.core.ops.canvas import IDENTITY_COLOR, Affine, ColorAffine, invert
from augserve.core.ops.registry import ApplyFunction, DrawFunction, Record
from augserve.core.spec import AugmentSpec

# The one bound on seeds: plans, the wire and the trainer all check against it (2**63 - 1 so a
# seed also fits a signed 64-bit integer, as torch and most clients hold one).
MAX_SEED = 2**63 - 1
MAX_EPOCH = 2**24 - 1
MAX_SAMPLE_ID = 2**40 - 1
# Bilinear sampling reads one pixel beyond a coordinate; one more guards rounding.
WINDOW_MARGIN = 2
# Nearest-neighbour scaling by whole factors puts source coordinates exactly between two
# pixels, where backends round differently (OpenCV in fixed point, DALI in float). Moving
# every coordinate by 1/64 pixel decides those ties the same way everywhere (upwards).
NEAREST_TIE_BREAK = 1.0 / 64.0
# A warp or colour map this close to the identity counts as the identity (np.allclose's default
# tolerances, which plans have always used: |value - identity| <= ABSOLUTE + RELATIVE *
# |identity|). A colour map that close moves no value in [0, 255] by 0.01, so it is skipped.
IDENTITY_RELATIVE_TOLERANCE = 1e-5
IDENTITY_ABSOLUTE_TOLERANCE = 1e-8

# What one op of a spec drew for one sample: (op name, record).
Draw = tuple[str, Record]


# A Philox generator as `Philox(key=key)` makes it: counter 0, an empty buffer (PHILOX_BUFFER_SIZE
# = 4 words left to draw before the next block), no half-used 32-bit word.
_PHILOX_FRESH_WORDS = (0, 0, 0, 0)
_PHILOX_BUFFER_SIZE = 4


class _PhiloxStream(threading.local):
    """This thread's Philox generator, re-keyed for every sample. Setting a key with a zero
    counter and an empty buffer (`Philox.state`) makes it the generator `Philox(key=key)` is,
    number for number (tests/test_plan_speed_equivalence.py), in about 1.3 us, where
    constructing one took about 5 us (`Philox(key=key)` itself 20: it first draws OS entropy for
    a seed sequence that the key then replaces). One per thread: plans are drawn on many."""

    def __init__(self) -> None:
        self.bit_generator = np.random.Philox(key=np.zeros(2, np.uint64))
        self.generator = np.random.Generator(self.bit_generator)


_philox = _PhiloxStream()


def uniforms(seed: int, epoch: int, sample_id: int, count: int) -> np.ndarray:
    """`count` float64 numbers in [0, 1) for this (seed, epoch, sample_id): the stream of
    `Generator(Philox(key=[seed, epoch << 40 | sample_id])).random(count)`."""
    if not 0 <= seed <= MAX_SEED:
        raise SpecError("seed", f"{seed} is outside [0, {MAX_SEED}]")
    if not 0 <= epoch <= MAX_EPOCH:
        raise SpecError("epoch", f"{epoch} is outside [0, 2**24 - 1]")
    if not 0 <= sample_id <= MAX_SAMPLE_ID:
        raise SpecError("sample_id", f"{sample_id} is outside [0, 2**40 - 1]")
    stream = _philox
    stream.bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": _PHILOX_FRESH_WORDS, "key": (seed, (epoch << 40) | sample_id)},
        "buffer": _PHILOX_FRESH_WORDS,
        "buffer_pos": _PHILOX_BUFFER_SIZE,
        "has_uint32": 0,
        "uinteger": 0,
    }
    return stream.generator.random(count)


def orientation_affine(orientation: int, stored_size: tuple[int, int]) -> Affine:
    """Map from stored pixel coordinates to upright ones for an EXIF orientation (1..8)."""
    height, width = stored_size
    right, bottom = width - 1.0, height - 1.0
    # (x', y') as rows of (coefficient of x, coefficient of y, constant)
    if orientation == 1:
        return ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    if orientation == 2:  # mirrored left-right
        return ((-1.0, 0.0, right), (0.0, 1.0, 0.0))
    if orientation == 3:  # rotated 180
        return ((-1.0, 0.0, right), (0.0, -1.0, bottom))
    if orientation == 4:  # mirrored top-bottom
        return ((1.0, 0.0, 0.0), (0.0, -1.0, bottom))
    if orientation == 5:  # transposed
        return ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    if orientation == 6:  # needs 90 degrees clockwise
        return ((0.0, -1.0, bottom), (1.0, 0.0, 0.0))
    if orientation == 7:  # transversed
        return ((0.0, -1.0, bottom), (-1.0, 0.0, right))
    if orientation == 8:  # needs 90 degrees counter-clockwise
        return ((0.0, 1.0, 0.0), (-1.0, 0.0, right))
    raise ValueError(f"EXIF orientation {orientation} is outside 1..8")


def _is_near_identity(rows: tuple[tuple[float, ...], ...]) -> bool:
    """Whether the matrix with these rows is within the identity tolerances of the identity (the
    leading square part is compared with the identity, any further columns with zero)."""
    for row_index, row in enumerate(rows):
        for column_index, value in enumerate(row):
            identity = 1.0 if row_index == column_index else 0.0
            tolerance = IDENTITY_ABSOLUTE_TOLERANCE + IDENTITY_RELATIVE_TOLERANCE * identity
            if not abs(value - identity) <= tolerance:
                return False
    return True


@dataclass(frozen=True, eq=False)
class SamplePlan:
    """Everything a backend needs to augment one sample, as plain numbers.

    Sizes are (height, width) in pixels; `source_size` is the image as stored, before its EXIF
    orientation, which the warp includes. `warp`, a [2, 3] float64 array, maps output pixel
    coordinates to stored pixel coordinates (pixel centres at integers; OpenCV's
    WARP_INVERSE_MAP convention). `source_window` (x, y, width, height) is the part of the
    source the warp reads, clipped to the image. `color` is a [3, 4] float32 affine map on RGB
    in [0, 255] (output channel i = color[i, :3] @ rgb + color[i, 3]), or None for identity.
    `draws` holds what each op of the spec drew, in spec order (backends do not read it).
    `pixel_steps` run in order after the colour matrix and before erasing; every plan of a spec
    has the same number of them (identity steps included).
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
    draws: tuple[Draw, ...] = ()
    pixel_steps: tuple[PixelStep, ...] = ()

    @property
    def is_pixel_copy(self) -> bool:
        """True when the warp is an integer translation: a plain copy, no interpolation."""
        linear = self.warp[:, :2]
        offsets = self.warp[:, 2]
        return bool(np.array_equal(linear, np.eye(2)) and np.all(offsets == np.round(offsets)))


def _source_window(
    warp: Affine, source_size: tuple[int, int], output_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    source_h, source_w = source_size
    out_h, out_w = output_size
    (a, b, c), (d, e, f) = warp
    # The outer edges of the output's corner pixels, mapped into the source: their least and
    # greatest x (and y). Each corner's x is (a * column + b * row) + c, the column and the row
    # each at one of its two edges, so the least is (least a * column + least b * row) + c,
    # exactly: rounding is monotonic, so no other corner's sum rounds below it. Four products
    # instead of sixteen, and no min or max over tuples (2.5 us of `make_plan`'s 60 before, 1.5
    # now). Each pair below is (least, greatest).
    left, right, top, bottom = -0.5, out_w - 0.5, -0.5, out_h - 0.5
    x_by_column = (a * left, a * right) if a >= 0 else (a * right, a * left)
    x_by_row = (b * top, b * bottom) if b >= 0 else (b * bottom, b * top)
    y_by_column = (d * left, d * right) if d >= 0 else (d * right, d * left)
    y_by_row = (e * top, e * bottom) if e >= 0 else (e * bottom, e * top)
    x0 = max(0, math.floor(x_by_column[0] + x_by_row[0] + c) - WINDOW_MARGIN)
    y0 = max(0, math.floor(y_by_column[0] + y_by_row[0] + f) - WINDOW_MARGIN)
    x1 = min(source_w, math.ceil(x_by_column[1] + x_by_row[1] + c) + WINDOW_MARGIN + 1)
    y1 = min(source_h, math.ceil(y_by_column[1] + y_by_row[1] + f) + WINDOW_MARGIN + 1)
    if x1 <= x0 or y1 <= y0:
        # The output sees only fill; decode a single pixel to keep backends uniform.
        return (0, 0, 1, 1)
    return (x0, y0, x1 - x0, y1 - y0)


def _color_array(color: ColorAffine) -> np.ndarray | None:
    """The [3, 4] float32 colour matrix of a plan, or None when `color` is (near) the identity."""
    if color == IDENTITY_COLOR or _is_near_identity(color):
        return None
    return np.array(color, dtype=np.float32)


def _upright_canvas(source_size: tuple[int, int], orientation: int) -> Canvas:
    """The canvas ops start from: the stored image turned upright by its EXIF orientation."""
    upright = source_size if orientation <= 4 else (source_size[1], source_size[0])
    return Canvas(
        height=upright[0], width=upright[1], forward=orientation_affine(orientation, source_size)
    )


def _finish_plan(
    spec: AugmentSpec,
    sample_id: int,
    source_size: tuple[int, int],
    canvas: Canvas,
    draws: tuple[Draw, ...],
) -> SamplePlan:
    """The plan of a canvas every op has been applied to."""
    (a, b, c), (d, e, f) = invert(canvas.forward)
    if canvas.interpolation == "nearest" and not _is_near_identity(((a, b), (d, e))):
        c += NEAREST_TIE_BREAK
        f += NEAREST_TIE_BREAK
    warp = ((a, b, c), (d, e, f))
    output_size = (canvas.height, canvas.width)
    return SamplePlan(
        sample_id=sample_id,
        source_size=source_size,
        output_size=output_size,
        warp=np.array(warp, dtype=np.float64),
        source_window=_source_window(warp, source_size, output_size),
        color=_color_array(canvas.color),
        erase_steps=tuple(canvas.erase_steps),
        interpolation=canvas.interpolation,
        fill_mode=spec.fill_mode,
        fill_value=spec.fill_value,
        draws=draws,
        pixel_steps=tuple(canvas.pixel_steps),
    )


def _tie_break_shift(warp: np.ndarray) -> float:
    """The shift `_finish_plan` gives a nearest-neighbour warp with this linear part."""
    return 0.0 if _is_near_identity(warp[:, :2]) else NEAREST_TIE_BREAK


def geometric_warp(plan: SamplePlan) -> np.ndarray:
    """The plan's [2, 3] warp without the nearest-neighbour tie-break shift: the map of the
    picture itself (for targets that move with it)."""
    warp = plan.warp.astype(np.float64, copy=True)
    if plan.interpolation == "nearest":
        warp[:, 2] -= _tie_break_shift(warp)
    return warp


def nearest_warp(plan: SamplePlan) -> np.ndarray:
    """The [2, 3] warp that nearest-neighbour sampling of this plan uses (a nearest plan's own
    warp; others get the same tie-break shift, for label maps beside their pixels)."""
    warp = plan.warp.astype(np.float64, copy=True)
    if plan.interpolation != "nearest":
        warp[:, 2] += _tie_break_shift(warp)
    return warp


# One op of a spec as `make_plan` runs it: (name, draw, apply, resolved parameters (read-only),
# index of its first uniform, index past its last).
_OpStep = tuple[str, DrawFunction, ApplyFunction, Mapping[str, Any], int, int]
_SPEC_STEPS_KEPT = 256
# Specs' steps by id(spec), each beside its spec (so a later spec that reuses a freed id is not
# taken for it, and none is freed while here). Only a cache: dict reads and writes are atomic,
# and a race at worst builds one spec's steps twice.
_spec_steps: dict[int, tuple[AugmentSpec, tuple[_OpStep, ...]]] = {}


def _steps(spec: AugmentSpec) -> tuple[_OpStep, ...]:
    """The ops of `spec` as `make_plan` runs them, looked up once per spec instead of once per
    sample (`OpSpec.values` builds a dict, `OpSpec.definition` looks the registry up)."""
    kept = _spec_steps.get(id(spec))
    if kept is not None and kept[0] is spec:
        return kept[1]
    listed = []
    offset = 0
    for op in spec.ops:
        definition = op.definition
        end = offset + definition.uniforms
        values = MappingProxyType(op.values)  # one mapping for every sample: none may change it
        listed.append((op.name, definition.draw, definition.apply, values, offset, end))
        offset = end
    steps = tuple(listed)
    if len(_spec_steps) >= _SPEC_STEPS_KEPT:
        _spec_steps.clear()
    _spec_steps[id(spec)] = (spec, steps)
    return steps


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
    # Ops get Python floats (the same values): arithmetic on numpy scalars would make every
    # op several times slower, and plans are drawn one sample at a time.
    numbers = uniforms(seed, epoch, sample_id, spec.uniform_count).tolist()
    canvas = _upright_canvas(source_size, orientation)
    draws: list[Draw] = []
    for name, draw, apply, values, start, end in _steps(spec):
        # An op draws from the canvas size alone, before it changes the canvas.
        record = draw(values, numbers[start:end], (canvas.height, canvas.width))
        apply(record, canvas)
        draws.append((name, record))
    return _finish_plan(spec, sample_id, source_size, canvas, tuple(draws))


def plan_from_draws(
    spec: AugmentSpec,
    sample_id: int,
    source_size: tuple[int, int],
    draws: Sequence[Draw],
    orientation: int = 1,
) -> SamplePlan:
    """The plan that applying recorded `draws` (one per op of `spec`, in order; records may have
    travelled through JSON) gives: `make_plan`'s own plan when they are its draws."""
    names = [name for name, _ in draws]
    expected = [op.name for op in spec.ops]
    if names != expected:
        raise ValueError(f"draws of ops {names} do not match the spec's ops {expected}")
    canvas = _upright_canvas(source_size, orientation)
    for name, record in draws:
        OPS[name].apply(record, canvas)
    return _finish_plan(spec, sample_id, source_size, canvas, tuple(draws))


def explain_plan(plan: SamplePlan) -> dict[str, Any]:
    """A JSON-serialisable account of a plan: sizes (height, width) in pixels, interpolation,
    and per op of the spec, in order, what it drew ({"op": name, "record": {...}})."""
    return {
        "sample_id": plan.sample_id,
        "source_size": list(plan.source_size),
        "output_size": list(plan.output_size),
        "interpolation": plan.interpolation,
        "draws": [{"op": name, "record": dict(record)} for name, record in plan.draws],
    }
