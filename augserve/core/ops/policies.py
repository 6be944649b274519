"""Augmentation policies as ops: RandAugment, TrivialAugment (wide) and AutoAugment.

Op sets, magnitude tables and drawing rules are torchvision's (`torchvision.transforms.v2`,
_auto_augment.py, as of torchvision 0.28; the sub-policies of AutoAugment are its
`_get_policies`). A policy draws, per sample and from its fixed count of uniforms, which
sub-ops run with what signed magnitude, records that (with torchvision's sub-op names), and
applies each sub-op where augserve keeps that kind of work:

- ShearX, ShearY, TranslateX, TranslateY and Rotate compose into the sample's one warp;
- Brightness, Color (saturation) and Contrast into its one colour matrix;
- Posterize, Solarize, Invert, AutoContrast, Equalize and Sharpness become pixel steps, in the
  drawn order. RandAugment keeps `num_ops` steps, TrivialAugment one, AutoAugment two (identity
  where the drawn sub-op is not a pixel sub-op or did not fire).

Differences from torchvision, by design:
- order: every geometric and linear colour sub-op acts before every pixel sub-op, whatever the
  drawn order (RandAugment's [Equalize, Rotate] equalizes after rotating, so the histogram
  includes the fill; [Posterize, Brightness] brightens, then posterizes);
- one resampling: the geometric sub-ops are sampled once, with the warp's interpolation (the
  spec's crop or resize decides; torchvision resamples each sub-op, NEAREST by default); the
  fill is the spec's (torchvision's default is 0);
- Contrast pivots on mid-gray 127.5, not on the image's mean gray (augserve's `contrast`), and
  colour values are clamped once, after the colour matrix, not after each sub-op;
- Equalize and Sharpness are augserve's kernels (OpenCV's equalizeHist table; one reflected
  3x3 filter: see augserve.core.ops.pixel);
- magnitudes are computed in float64 (torchvision's linspace is float32: equal to 1e-5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypedDict

from augserve.core.errors import SpecError
from augserve.core.ops.canvas import IDENTITY_STEP, Canvas, PixelStep
from augserve.core.ops.color import Brightness, Contrast, Saturation
from augserve.core.ops.geometry import Rotate
from augserve.core.ops.pixel import (
    AUTOCONTRAST_STEP,
    EQUALIZE_STEP,
    INVERT_STEP,
    posterize_step,
    sharpness_step,
    solarize_step,
)
from augserve.core.ops.registry import CanvasSize, ChoiceParam, IntParam, Params, register_op

MAX_POLICY_OPS = 8  # rand_augment's num_ops (each a pixel step in the DALI graph)
MAX_BINS = 101
AUTO_AUGMENT_BINS = 10  # torchvision's AutoAugment magnitude levels


# --- magnitude tables: (bins, canvas height, canvas width) -> magnitudes, or None ----------------

MagnitudeTable = Callable[[int, int, int], tuple[float, ...]]


def _linspace(start: float, end: float) -> MagnitudeTable:
    """torch.linspace(start, end, bins)."""

    def table(bins: int, height: int, width: int) -> tuple[float, ...]:
        return tuple(start + (end - start) * index / (bins - 1) for index in range(bins))

    return table


def _of_width(fraction: float) -> MagnitudeTable:
    """torch.linspace(0, fraction * width, bins): TranslateX, in pixels."""
    return lambda bins, height, width: _linspace(0.0, fraction * width)(bins, height, width)


def _of_height(fraction: float) -> MagnitudeTable:
    return lambda bins, height, width: _linspace(0.0, fraction * height)(bins, height, width)


def _posterize_bits(span: int) -> MagnitudeTable:
    """(8 - arange(bins) / ((bins - 1) / span)).round(): bits kept, 8 down to 8 - span (round
    half to even, as torch.round and Python's round)."""

    def table(bins: int, height: int, width: int) -> tuple[float, ...]:
        return tuple(float(round(8 - index / ((bins - 1) / span))) for index in range(bins))

    return table


class SubOp(NamedTuple):
    """One sub-op of a policy's op set: its magnitudes (None: it takes none) and whether a
    drawn sign negates them."""

    magnitudes: MagnitudeTable | None
    signed: bool


# RandAugment's set, in torchvision's order (a drawn index names the same sub-op there).
RAND_AUGMENT_SPACE: dict[str, SubOp] = {
    "Identity": SubOp(None, False),
    "ShearX": SubOp(_linspace(0.0, 0.3), True),
    "ShearY": SubOp(_linspace(0.0, 0.3), True),
    "TranslateX": SubOp(_of_width(150.0 / 331.0), True),
    "TranslateY": SubOp(_of_height(150.0 / 331.0), True),
    "Rotate": SubOp(_linspace(0.0, 30.0), True),
    "Brightness": SubOp(_linspace(0.0, 0.9), True),
    "Color": SubOp(_linspace(0.0, 0.9), True),
    "Contrast": SubOp(_linspace(0.0, 0.9), True),
    "Sharpness": SubOp(_linspace(0.0, 0.9), True),
    "Posterize": SubOp(_posterize_bits(4), False),
    "Solarize": SubOp(_linspace(255.0, 0.0), False),
    "AutoContrast": SubOp(None, False),
    "Equalize": SubOp(None, False),
}

TRIVIAL_AUGMENT_WIDE_SPACE: dict[str, SubOp] = {
    "Identity": SubOp(None, False),
    "ShearX": SubOp(_linspace(0.0, 0.99), True),
    "ShearY": SubOp(_linspace(0.0, 0.99), True),
    "TranslateX": SubOp(_linspace(0.0, 32.0), True),
    "TranslateY": SubOp(_linspace(0.0, 32.0), True),
    "Rotate": SubOp(_linspace(0.0, 135.0), True),
    "Brightness": SubOp(_linspace(0.0, 0.99), True),
    "Color": SubOp(_linspace(0.0, 0.99), True),
    "Contrast": SubOp(_linspace(0.0, 0.99), True),
    "Sharpness": SubOp(_linspace(0.0, 0.99), True),
    "Posterize": SubOp(_posterize_bits(6), False),
    "Solarize": SubOp(_linspace(255.0, 0.0), False),
    "AutoContrast": SubOp(None, False),
    "Equalize": SubOp(None, False),
}

# AutoAugment's set: RandAugment's without Identity, with Invert.
AUTO_AUGMENT_SPACE: dict[str, SubOp] = {
    **{name: sub_op for name, sub_op in RAND_AUGMENT_SPACE.items() if name != "Identity"},
    "Invert": SubOp(None, False),
}

# (sub-op, probability, magnitude index or None) pairs, torchvision's AutoAugmentPolicy tables.
SubPolicy = tuple[tuple[str, float, int | None], tuple[str, float, int | None]]
AUTO_AUGMENT_POLICIES: dict[str, tuple[SubPolicy, ...]] = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


@functools.lru_cache(maxsize=4096)
def _table(table: MagnitudeTable, bins: int, height: int, width: int) -> tuple[float, ...]:
    # Plans are drawn one sample at a time: building a table per draw cost a third of a
    # policy's draw.
    return table(bins, height, width)


def magnitudes_of(space: dict[str, SubOp], name: str, bins: int, size: CanvasSize) -> tuple[float, ...] | None:
    """The unsigned magnitudes of sub-op `name` for `bins` levels on a canvas of `size`
    (height, width), or None when it takes none."""
    table = space[name].magnitudes
    return None if table is None else _table(table, bins, size[0], size[1])


def _choice(u: float, count: int) -> int:
    """An index in [0, count) from a uniform u in [0, 1) (as randint(count))."""
    return min(int(u * count), count - 1)


def _signed(space: dict[str, SubOp], name: str, magnitude: float, u_sign: float) -> float:
    """Negated with probability 1/2 where the sub-op is signed (torchvision: rand() <= 0.5)."""
    return -magnitude if space[name].signed and u_sign < 0.5 else magnitude


# --- applying a drawn sub-op -----------------------------------------------------------------

# Each sub-op edits the canvas (geometry, colour) and returns its pixel step (identity if none).
SubOpApply = Callable[[float, Canvas], PixelStep]


def _shear_x(magnitude: float, canvas: Canvas) -> PixelStep:
    # torchvision: affine(shear=[degrees(atan(m)), 0], center=[0, 0]): x' = x - m (y - c) about
    # the image's top-left corner, c = -0.5 in pixel-centre coordinates.
    canvas.transform(((1.0, -magnitude, -0.5 * magnitude), (0.0, 1.0, 0.0)))
    return IDENTITY_STEP


def _shear_y(magnitude: float, canvas: Canvas) -> PixelStep:
    canvas.transform(((1.0, 0.0, 0.0), (-magnitude, 1.0, -0.5 * magnitude)))
    return IDENTITY_STEP


def _translate_x(magnitude: float, canvas: Canvas) -> PixelStep:
    # torchvision: translate=[int(magnitude), 0], whole pixels (towards zero); + moves right.
    canvas.transform(((1.0, 0.0, float(int(magnitude))), (0.0, 1.0, 0.0)))
    return IDENTITY_STEP


def _translate_y(magnitude: float, canvas: Canvas) -> PixelStep:
    canvas.transform(((1.0, 0.0, 0.0), (0.0, 1.0, float(int(magnitude)))))
    return IDENTITY_STEP


def _rotate(magnitude: float, canvas: Canvas) -> PixelStep:
    Rotate.apply({"angle": magnitude}, canvas)
    return IDENTITY_STEP


def _recolor(op: type) -> SubOpApply:
    """A linear colour sub-op: augserve's op with factor 1 + magnitude (torchvision's
    adjust_* with 1 + magnitude)."""

    def apply(magnitude: float, canvas: Canvas) -> PixelStep:
        op.apply({"factor": 1.0 + magnitude}, canvas)
        return IDENTITY_STEP

    return apply


SUB_OPS: dict[str, SubOpApply] = {
    "Identity": lambda magnitude, canvas: IDENTITY_STEP,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Brightness": _recolor(Brightness),
    "Color": _recolor(Saturation),
    "Contrast": _recolor(Contrast),
    "Sharpness": lambda magnitude, canvas: sharpness_step(1.0 + magnitude),
    "Posterize": lambda magnitude, canvas: posterize_step(int(magnitude)),
    "Solarize": lambda magnitude, canvas: solarize_step(magnitude),
    "AutoContrast": lambda magnitude, canvas: AUTOCONTRAST_STEP,
    "Equalize": lambda magnitude, canvas: EQUALIZE_STEP,
    "Invert": lambda magnitude, canvas: INVERT_STEP,
}

# The sub-ops that are pixel steps (the others never add one).
PIXEL_SUB_OPS = frozenset({"Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert"})


def apply_sub_op(name: str, magnitude: float, canvas: Canvas) -> None:
    """Apply one drawn sub-op, adding exactly one pixel step (identity if it is not a pixel
    sub-op)."""
    canvas.pixel_steps.append(SUB_OPS[name](magnitude, canvas))


# --- the ops ---------------------------------------------------------------------------------


class RandAugmentRecord(TypedDict):
    ops: tuple[str, ...]  # torchvision's sub-op names, in order (num_ops of them)
    magnitudes: tuple[float, ...]  # each one's signed magnitude (0.0 for those without)


class TrivialAugmentRecord(TypedDict):
    op: str
    magnitude: float


class AutoAugmentRecord(TypedDict):
    sub_policy: int  # index into the policy's table
    ops: tuple[str, str]  # the sub-policy's two sub-ops
    applied: tuple[bool, bool]  # whether each fired (with its probability)
    magnitudes: tuple[float, float]  # signed magnitudes (0.0 for those without, or not fired)


def _bins(default: int = 31) -> IntParam:
    return IntParam(
        name="bins",
        doc="Magnitude levels of each sub-op (torchvision num_magnitude_bins).",
        low=2,
        high=MAX_BINS,
        default_value=default,
    )


@register_op(
    "rand_augment",
    "policy",
    uniforms=2 * MAX_POLICY_OPS,
    params=(
        IntParam(
            name="num_ops",
            doc="Sub-ops applied to each sample, each drawn uniformly from 14 (torchvision num_ops).",
            low=0,
            high=MAX_POLICY_OPS,
            default_value=2,
        ),
        IntParam(
            name="magnitude",
            doc="Level of every sub-op's magnitude, 0 to bins - 1 (torchvision magnitude).",
            low=0,
            high=MAX_BINS - 1,
            default_value=9,
        ),
        _bins(),
    ),
)
class RandAugment:
    """RandAugment (Cubuk et al. 2019) as torchvision's RandAugment(num_ops, magnitude,
    num_magnitude_bins): each of num_ops sub-ops drawn uniformly from Identity, ShearX/Y,
    TranslateX/Y, Rotate, Brightness, Color, Contrast, Sharpness, Posterize, Solarize,
    AutoContrast and Equalize, at the one magnitude level, signed at random where the sub-op is.
    Geometric and colour sub-ops join the warp and the colour matrix, so they act before the
    pixel sub-ops (augserve.core.ops.policies lists the differences)."""

    @staticmethod
    def check(field: str, params: Params) -> None:
        if params["magnitude"] >= params["bins"]:
            raise SpecError(
                f"{field}.magnitude",
                f"{params['magnitude']} must be below bins ({params['bins']}): a level of the table",
            )

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> RandAugmentRecord:
        names = tuple(RAND_AUGMENT_SPACE)
        ops, magnitudes = [], []
        for index in range(params["num_ops"]):
            name = names[_choice(u[2 * index], len(names))]
            table = magnitudes_of(RAND_AUGMENT_SPACE, name, params["bins"], size)
            magnitude = 0.0 if table is None else table[params["magnitude"]]
            ops.append(name)
            magnitudes.append(_signed(RAND_AUGMENT_SPACE, name, magnitude, u[2 * index + 1]))
        return {"ops": tuple(ops), "magnitudes": tuple(magnitudes)}

    @staticmethod
    def apply(record: RandAugmentRecord, canvas: Canvas) -> None:
        for name, magnitude in zip(record["ops"], record["magnitudes"]):
            apply_sub_op(name, magnitude, canvas)


@register_op("trivial_augment_wide", "policy", uniforms=3, params=(_bins(),))
class TrivialAugmentWide:
    """TrivialAugment (Müller and Hutter 2021) as torchvision's TrivialAugmentWide: one sub-op
    drawn uniformly from RandAugment's 14 with the wide magnitude ranges, its magnitude level
    drawn uniformly from the bins, signed at random where the sub-op is."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> TrivialAugmentRecord:
        names = tuple(TRIVIAL_AUGMENT_WIDE_SPACE)
        name = names[_choice(u[0], len(names))]
        table = magnitudes_of(TRIVIAL_AUGMENT_WIDE_SPACE, name, params["bins"], size)
        magnitude = 0.0 if table is None else table[_choice(u[1], params["bins"])]
        return {"op": name, "magnitude": _signed(TRIVIAL_AUGMENT_WIDE_SPACE, name, magnitude, u[2])}

    @staticmethod
    def apply(record: TrivialAugmentRecord, canvas: Canvas) -> None:
        apply_sub_op(record["op"], record["magnitude"], canvas)


@register_op(
    "auto_augment",
    "policy",
    uniforms=5,
    params=(
        ChoiceParam(
            name="policy",
            doc="The learned policy (torchvision AutoAugmentPolicy): its 25 sub-policies.",
            choices=tuple(AUTO_AUGMENT_POLICIES),
            default_value="imagenet",
        ),
    ),
)
class AutoAugment:
    """AutoAugment (Cubuk et al. 2018) as torchvision's AutoAugment(policy): one of the
    policy's 25 sub-policies drawn uniformly; each of its two sub-ops fires with its
    probability, at its magnitude level of 10, signed at random where the sub-op is."""

    @staticmethod
    def draw(params: Params, u: Sequence[float], size: CanvasSize) -> AutoAugmentRecord:
        policies = AUTO_AUGMENT_POLICIES[params["policy"]]
        index = _choice(u[0], len(policies))
        ops, applied, magnitudes = [], [], []
        for position, (name, probability, level) in enumerate(policies[index]):
            fired = u[1 + position] < probability
            table = magnitudes_of(AUTO_AUGMENT_SPACE, name, AUTO_AUGMENT_BINS, size)
            magnitude = 0.0
            if fired and table is not None and level is not None:
                magnitude = _signed(AUTO_AUGMENT_SPACE, name, table[level], u[3 + position])
            ops.append(name)
            applied.append(fired)
            magnitudes.append(magnitude)
        return {
            "sub_policy": index,
            "ops": tuple(ops),
            "applied": tuple(applied),
            "magnitudes": tuple(magnitudes),
        }

    @staticmethod
    def apply(record: AutoAugmentRecord, canvas: Canvas) -> None:
        for name, fired, magnitude in zip(record["ops"], record["applied"], record["magnitudes"]):
            if fired:
                apply_sub_op(name, magnitude, canvas)
            else:
                canvas.pixel_steps.append(IDENTITY_STEP)
