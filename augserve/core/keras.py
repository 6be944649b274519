"""Keras `ImageDataGenerator` keyword arguments as an augserve spec.

Supported: rotation_range, width_shift_range, height_shift_range, zoom_range, shear_range,
horizontal_flip, vertical_flip, brightness_range, fill_mode ('constant' or 'nearest', Keras'
default) and cval. Ops follow Keras' order: rotate, shift, shear, zoom, flip, brightness.
Anything else is rejected by name, never ignored.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

from augserve.core.errors import SpecError

SUPPORTED = (
    "rotation_range",
    "width_shift_range",
    "height_shift_range",
    "zoom_range",
    "shear_range",
    "horizontal_flip",
    "vertical_flip",
    "brightness_range",
    "fill_mode",
    "cval",
)
# Arguments Keras has that augserve does not do, and why.
UNSUPPORTED = {
    "featurewise_center": "dataset statistics are not computed; normalize in the trainer",
    "samplewise_center": "normalization happens in the trainer (augserve streams uint8)",
    "featurewise_std_normalization": "dataset statistics are not computed; normalize in the trainer",
    "samplewise_std_normalization": "normalization happens in the trainer (augserve streams uint8)",
    "zca_whitening": "not supported",
    "zca_epsilon": "not supported",
    "channel_shift_range": "not supported (use brightness, contrast, saturation or hue)",
    "rescale": "augserve streams uint8; the trainer rescales",
    "preprocessing_function": "arbitrary Python functions cannot run in the server",
    "data_format": "batches are always channels-last uint8 [N, H, W, 3]",
    "validation_split": "choose the split when opening a session",
    "interpolation_order": "use the interpolation parameter of resize",
    "dtype": "batches are always uint8",
}


def _half_width(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
        raise SpecError(name, f"expected a number >= 0, got {value!r}")
    return float(value)


def _shift_fraction(name: str, value: Any) -> float:
    fraction = _half_width(name, value)
    if fraction >= 1:
        raise SpecError(
            name, f"{fraction} is a shift in pixels; augserve takes fractions of the size in [0, 1)"
        )
    return fraction


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(name, f"expected true or false, got {value!r}")
    return value


def spec_dict_from_keras(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Translate keyword arguments to the plain-data form of an `AugmentSpec`."""
    for name in kwargs:
        if name in UNSUPPORTED:
            raise SpecError(name, f"unsupported ImageDataGenerator argument: {UNSUPPORTED[name]}")
        if name not in SUPPORTED:
            raise SpecError(name, f"unknown ImageDataGenerator argument; supported: {list(SUPPORTED)}")
    ops: list[dict[str, Any]] = []
    if kwargs.get("rotation_range"):
        ops.append({"rotate": {"degrees": _half_width("rotation_range", kwargs["rotation_range"])}})
    shift_x = _shift_fraction("width_shift_range", kwargs.get("width_shift_range", 0.0))
    shift_y = _shift_fraction("height_shift_range", kwargs.get("height_shift_range", 0.0))
    if shift_x or shift_y:
        ops.append({"shift": {"x": shift_x, "y": shift_y}})
    if kwargs.get("shear_range"):
        ops.append({"shear": {"degrees": _half_width("shear_range", kwargs["shear_range"])}})
    if "zoom_range" in kwargs:
        zoom = kwargs["zoom_range"]
        if isinstance(zoom, numbers.Real) and not isinstance(zoom, bool):
            low, high = 1.0 - float(zoom), 1.0 + float(zoom)
        elif isinstance(zoom, (list, tuple)) and len(zoom) == 2:
            low, high = float(zoom[0]), float(zoom[1])
        else:
            raise SpecError("zoom_range", f"expected a number or [low, high], got {zoom!r}")
        if not 0 < low <= high:
            raise SpecError("zoom_range", f"needs 0 < low <= high, got [{low}, {high}]")
        if (low, high) != (1.0, 1.0):
            # Keras draws z per axis and samples the source at z * x: content scales by 1 / z.
            ops.append({"zoom": {"range": [1.0 / high, 1.0 / low], "independent": True}})
    horizontal = _flag("horizontal_flip", kwargs.get("horizontal_flip", False))
    vertical = _flag("vertical_flip", kwargs.get("vertical_flip", False))
    if horizontal or vertical:
        ops.append({"flip": {"horizontal": 0.5 if horizontal else 0.0, "vertical": 0.5 if vertical else 0.0}})
    if kwargs.get("brightness_range") is not None:
        ops.append({"brightness": {"factor": list(kwargs["brightness_range"])}})
    fill_mode = kwargs.get("fill_mode", "nearest")
    if fill_mode not in ("constant", "nearest"):
        raise SpecError("fill_mode", f"{fill_mode!r} is not supported; use 'constant' or 'nearest'")
    cval = kwargs.get("cval", 0)
    if not isinstance(cval, numbers.Real) or isinstance(cval, bool) or not float(cval).is_integer():
        raise SpecError("cval", f"expected an integer in [0, 255], got {cval!r}")
    return {"ops": ops, "fill_mode": fill_mode, "fill_value": int(cval)}
