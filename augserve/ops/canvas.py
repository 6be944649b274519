"""The state that op plan functions edit while one sample's plan is drawn.

Coordinates are pixel coordinates with pixel centres at integers (OpenCV's convention): the
top-left pixel covers [-0.5, 0.5) and its centre is (0, 0). Geometry accumulates in one 3x3
matrix from source coordinates to canvas coordinates; colour accumulates in one 4x4 affine
matrix on RGB values in [0, 255]. Erase rectangles are in output (final canvas) coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class EraseStep:
    """Rectangles one erase op fills with `value`; each is (top, left, height, width) in pixels."""

    value: int
    rectangles: tuple[tuple[int, int, int, int], ...]


@dataclass
class Canvas:
    """The canvas a sample is being drawn on: its size and the transforms so far."""

    height: int
    width: int
    forward: np.ndarray = field(default_factory=lambda: np.eye(3))
    color: np.ndarray = field(default_factory=lambda: np.eye(4))
    erase_steps: list[EraseStep] = field(default_factory=list)
    interpolation: str = "linear"

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the canvas centre."""
        return ((self.width - 1) / 2.0, (self.height - 1) / 2.0)

    def transform(self, matrix: np.ndarray, size: tuple[int, int] | None = None) -> None:
        """Compose a 3x3 map from current canvas coordinates to new ones; `size` is (h, w)."""
        self.forward = matrix @ self.forward
        if size is not None:
            self.height, self.width = size

    def about_center(self, linear: np.ndarray) -> None:
        """Apply a 2x2 linear map about the canvas centre, keeping the canvas size."""
        cx, cy = self.center
        matrix = np.eye(3)
        matrix[:2, :2] = linear
        matrix[:2, 2] = np.array([cx, cy]) - linear @ np.array([cx, cy])
        self.transform(matrix)

    def crop_and_scale(
        self, top: float, left: float, height: float, width: float, size: tuple[int, int]
    ) -> None:
        """Map the window (top, left, height, width) of the canvas onto a new canvas of `size`.

        Uses the half-pixel convention of OpenCV's resize and torchvision, so a window of the
        same size as `size` is an exact pixel copy.
        """
        out_h, out_w = size
        scale_x, scale_y = out_w / width, out_h / height
        matrix = np.array(
            [
                [scale_x, 0.0, (0.5 - left) * scale_x - 0.5],
                [0.0, scale_y, (0.5 - top) * scale_y - 0.5],
                [0.0, 0.0, 1.0],
            ]
        )
        self.transform(matrix, size)

    def recolor(self, matrix: np.ndarray) -> None:
        """Compose a 4x4 affine colour map (RGB in [0, 255], homogeneous)."""
        self.color = matrix @ self.color
