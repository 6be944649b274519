"""Augmentation ops. Importing this package registers every op in `OPS`."""

from augserve.core.ops import color, erase, geometry, pixel, policies  # noqa: F401  (registration)
from augserve.core.ops.canvas import Canvas, EraseStep, PixelStep
from augserve.core.ops.registry import OPS, OpDef, Param, get_op

__all__ = ["OPS", "Canvas", "EraseStep", "PixelStep", "OpDef", "Param", "get_op"]
