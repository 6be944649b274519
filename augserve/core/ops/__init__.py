"""Augmentation ops. Importing this package registers every op in `OPS`."""

from augserve.core.ops import color, erase, geometry  # noqa: F401  (registration side effect)
from augserve.core.ops.canvas import Canvas, EraseStep
from augserve.core.ops.registry import OPS, OpDef, Param, get_op

__all__ = ["OPS", "Canvas", "EraseStep", "OpDef", "Param", "get_op"]
