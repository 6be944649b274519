"""The state that op plan functions edit while one sample's plan is drawn.

Coordinates are pixel coordinates with pixel centres at integers (OpenCV's convention): the
top-left pixel covers [-0.5, 0.5) and its centre is (0, 0). Geometry accumulates in one affine
map from source coordinates to canvas coordinates; colour accumulates in one affine map on RGB
values in [0, 255]. Pixel steps (posterize, equalize, sharpness, ...) are neither affine nor
linear: they are kept in order and run on the uint8 image after the warp and the colour matrix,
before erasing. Erase rectangles are in output (final canvas) coordinates.

Both maps are tuples of plain Python floats, not numpy arrays: a plan is drawn per sample in a
Python thread, and on 2x3 and 3x4 matrices numpy's per-call overhead cost several times the
arithmetic itself. `make_plan` turns them into arrays once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A 2x2 linear map as rows: ((a, b), (d, e)) maps (x, y) to (a*x + b*y, d*x + e*y).
Linear2 = tuple[tuple[float, float], tuple[float, float]]
# A 2D affine map as the two rows of its 2x3 matrix (OpenCV's warp layout):
# ((a, b, c), (d, e, f)) maps (x, y) to (a*x + b*y + c, d*x + e*y + f).
Affine = tuple[tuple[float, float, float], tuple[float, float, float]]
IDENTITY_AFFINE: Affine = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))

# A 3x3 linear map on RGB as rows: output channel i is row[0]*R + row[1]*G + row[2]*B.
ColorWeights = tuple[float, float, float]
ColorLinear = tuple[ColorWeights, ColorWeights, ColorWeights]
ColorOffset = tuple[float, float, float]
# An affine colour map as the three rows of its 3x4 matrix: output channel i is
# row[0]*R + row[1]*G + row[2]*B + row[3].
ColorRow = tuple[float, float, float, float]
ColorAffine = tuple[ColorRow, ColorRow, ColorRow]
IDENTITY_COLOR: ColorAffine = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0))


def compose(after: Affine, before: Affine) -> Affine:
    """The affine map that applies `before`, then `after` (the product after @ before)."""
    (a, b, c), (d, e, f) = after
    (p, q, r), (s, t, u) = before
    return (
        (a * p + b * s, a * q + b * t, a * r + b * u + c),
        (d * p + e * s, d * q + e * t, d * r + e * u + f),
    )


def invert(affine: Affine) -> Affine:
    """The inverse map; ZeroDivisionError when the linear part is singular."""
    (a, b, c), (d, e, f) = affine
    determinant = a * e - b * d
    inverse_a, inverse_b = e / determinant, -b / determinant
    inverse_d, inverse_e = -d / determinant, a / determinant
    return (
        (inverse_a, inverse_b, -(inverse_a * c + inverse_b * f)),
        (inverse_d, inverse_e, -(inverse_d * c + inverse_e * f)),
    )


@dataclass(frozen=True)
class EraseStep:
    """Rectangles one erase op fills with `value`; each is (top, left, height, width) in pixels."""

    value: int
    rectangles: tuple[tuple[int, int, int, int], ...]


# Kinds of pixel step, as `PixelStep.kind` names them (see its docstring).
PIXEL_KINDS = ("identity", "posterize", "solarize", "autocontrast", "equalize", "sharpness", "blur")
# The smoothing kernel of sharpness (PIL's ImageFilter.SMOOTH, torchvision's adjust_sharpness).
SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
SMOOTH_KERNEL_SUM = 13.0


@dataclass(frozen=True)
class PixelStep:
    """One step of the per-pixel stage, on [H, W, 3] uint8 RGB, each channel alike.

    - identity: nothing (an op's place in the stage that it did not use for this sample);
    - posterize: keep the `amount` (0 to 8) high bits of every value;
    - solarize: every value >= `amount` (an integer, 0 to 256) becomes 255 - value (0 inverts
      every value, 256 none);
    - autocontrast: each channel's [min, max] stretched onto [0, 255] as
      floor(255 (v - min) / (max - min)); a channel of one value is kept;
    - equalize: each channel's histogram equalized as OpenCV's `equalizeHist` does;
    - sharpness: the 3x3 filter `amount` * identity + (1 - amount) * SMOOTH_KERNEL / 13
      (a blend of the image with its smoothed self: 0 smooths, 1 keeps, 2 sharpens), border
      pixels reflected (reflect-101), rounded and clamped;
    - blur: a Gaussian of sigma `amount` pixels, radius ceil(3 sigma), border reflected.

    A spec always gives the same number of steps (each op its fixed count), so backends build
    one graph per count; a kind's parameters are in `amount` alone.
    """

    kind: str
    amount: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PIXEL_KINDS:
            raise ValueError(f"pixel step kind {self.kind!r} is not one of {PIXEL_KINDS}")


IDENTITY_STEP = PixelStep("identity")


@dataclass
class Canvas:
    """The canvas a sample is being drawn on: its size and the transforms so far.

    `forward` maps source coordinates to canvas coordinates; `color` maps source RGB to canvas
    RGB (see `Affine` and `ColorAffine`).
    """

    height: int
    width: int
    forward: Affine = IDENTITY_AFFINE
    color: ColorAffine = IDENTITY_COLOR
    erase_steps: list[EraseStep] = field(default_factory=list)
    pixel_steps: list[PixelStep] = field(default_factory=list)
    interpolation: str = "linear"

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the canvas centre."""
        return ((self.width - 1) / 2.0, (self.height - 1) / 2.0)

    def transform(self, matrix: Affine, size: tuple[int, int] | None = None) -> None:
        """Compose a map from current canvas coordinates to new ones; `size` is (h, w)."""
        self.forward = compose(matrix, self.forward)
        if size is not None:
            self.height, self.width = size

    def about_center(self, linear: Linear2) -> None:
        """Apply a 2x2 linear map about the canvas centre, keeping the canvas size."""
        cx, cy = (self.width - 1) / 2.0, (self.height - 1) / 2.0
        (a, b), (d, e) = linear
        # The centre maps to itself: offset = centre - linear @ centre. (`compose` directly, not
        # `transform`: one call less in every sample's plan.)
        matrix = ((a, b, cx - (a * cx + b * cy)), (d, e, cy - (d * cx + e * cy)))
        self.forward = compose(matrix, self.forward)

    def crop_and_scale(
        self, top: float, left: float, height: float, width: float, size: tuple[int, int]
    ) -> None:
        """Map the window (top, left, height, width) of the canvas onto a new canvas of `size`.

        Uses the half-pixel convention of OpenCV's resize and torchvision, so a window of the
        same size as `size` is an exact pixel copy.
        """
        out_h, out_w = size
        scale_x, scale_y = out_w / width, out_h / height
        matrix = (
            (scale_x, 0.0, (0.5 - left) * scale_x - 0.5),
            (0.0, scale_y, (0.5 - top) * scale_y - 0.5),
        )
        self.forward = compose(matrix, self.forward)
        self.height, self.width = out_h, out_w

    def recolor(self, linear: ColorLinear, offset: ColorOffset = (0.0, 0.0, 0.0)) -> None:
        """Compose the colour map RGB -> linear @ RGB + offset (RGB in [0, 255])."""
        # Rows of the map so far: each of the current R, G, B in terms of the source R, G, B and
        # 1. Unpacked once: indexing them in every product cost a third of the op.
        red, green, blue = self.color
        red_r, red_g, red_b, red_1 = red
        green_r, green_g, green_b, green_1 = green
        blue_r, blue_g, blue_b, blue_1 = blue

        def row(weights: ColorWeights, shift: float) -> ColorRow:
            red_weight, green_weight, blue_weight = weights
            return (
                red_weight * red_r + green_weight * green_r + blue_weight * blue_r,
                red_weight * red_g + green_weight * green_g + blue_weight * blue_g,
                red_weight * red_b + green_weight * green_b + blue_weight * blue_b,
                red_weight * red_1 + green_weight * green_1 + blue_weight * blue_1 + shift,
            )

        self.color = (
            row(linear[0], offset[0]),
            row(linear[1], offset[1]),
            row(linear[2], offset[2]),
        )
