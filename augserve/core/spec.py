"""Augmentation specs: an ordered list of registered ops plus the fill of uncovered pixels.

A spec is what a user asks for. Geometry and colour ops come first (they compose into one
warp and one colour matrix), then per-pixel ops and policies (run in order after both), then
erasing ops (on the final image). It loads from and dumps to YAML and JSON (and Keras
`ImageDataGenerator` keyword arguments); every op and parameter is validated by the op registry,
and an unknown key or out-of-range value is a `SpecError` naming the field and what is allowed.

YAML form::

    fill_mode: constant        # constant | nearest (repeat the border pixel)
    fill_value: 0              # 0..255, for fill_mode constant
    ops:
      - rotate: {degrees: 20}
      - flip: {horizontal: 0.5}
      - random_resized_crop: {size: 224, scale: [0.5, 1.0]}
      - brightness: {factor: [0.8, 1.2]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from augserve.core.errors import SpecError
from augserve.core.ops import OPS, OpDef, get_op
from augserve.core.ops.registry import MAX_SIDE

FILL_MODES = ("constant", "nearest")
MAX_OPS = 32
SPEC_KEYS = ("ops", "fill_mode", "fill_value")


@dataclass(frozen=True)
class OpSpec:
    """One op of a spec with every parameter resolved (defaults filled in, ranges as tuples)."""

    name: str
    params: tuple[tuple[str, Any], ...]

    @property
    def definition(self) -> OpDef:
        return OPS[self.name]

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    @classmethod
    def parse(cls, field_path: str, name: Any, given: Mapping[str, Any] | None) -> OpSpec:
        definition = get_op(field_path, name)
        resolved = definition.parse_params(f"{field_path}.{name}", given)
        return cls(name, tuple(resolved.items()))

    def to_dict(self) -> dict[str, Any]:
        definition = self.definition
        return {self.name: {key: definition.param(key).dump(value) for key, value in self.params}}


@dataclass(frozen=True)
class AugmentSpec:
    """A validated augmentation spec. Construct with `from_dict` (or YAML/JSON/Keras)."""

    ops: tuple[OpSpec, ...] = ()
    fill_mode: str = "constant"
    fill_value: int = 0
    uniform_count: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.fill_mode not in FILL_MODES:
            raise SpecError("fill_mode", f"expected one of {list(FILL_MODES)}, got {self.fill_mode!r}")
        if (
            not isinstance(self.fill_value, int)
            or isinstance(self.fill_value, bool)
            or not 0 <= self.fill_value <= 255
        ):
            raise SpecError("fill_value", f"expected an integer in [0, 255], got {self.fill_value!r}")
        if len(self.ops) > MAX_OPS:
            raise SpecError("ops", f"{len(self.ops)} ops is over the limit of {MAX_OPS}")
        seen_erase = False
        first_pixel_op = None
        for index, op in enumerate(self.ops):
            category = op.definition.category
            if category == "erase":
                seen_erase = True
            elif seen_erase:
                raise SpecError(
                    f"ops[{index}].{op.name}",
                    "erasing ops act on the final image and must come after every other op",
                )
            if category in ("pixel", "policy"):
                first_pixel_op = first_pixel_op or op.name
            elif category in ("geometry", "color") and first_pixel_op is not None:
                raise SpecError(
                    f"ops[{index}].{op.name}",
                    "geometry and colour ops join the one warp and colour matrix, which run before "
                    f"the per-pixel stage: list them before {first_pixel_op}",
                )
        object.__setattr__(self, "uniform_count", sum(op.definition.uniforms for op in self.ops))

    @property
    def fixed_output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it follows the input size."""
        size = None
        for op in self.ops:
            definition = op.definition
            if definition.fixes_size:
                size = op.values["size"]
            elif definition.name == "resize_shorter_side":
                size = None
        return size

    # --- plain data ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AugmentSpec:
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise SpecError("spec", f"expected a mapping with keys {list(SPEC_KEYS)}, got {type(data).__name__}")
        for key in data:
            if key not in SPEC_KEYS:
                raise SpecError(str(key), f"unknown spec key; known: {list(SPEC_KEYS)}")
        raw_ops = data.get("ops") or []
        if not isinstance(raw_ops, list):
            raise SpecError("ops", "expected a list of ops")
        if len(raw_ops) > MAX_OPS:
            raise SpecError("ops", f"{len(raw_ops)} ops is over the limit of {MAX_OPS}")
        ops = []
        for index, entry in enumerate(raw_ops):
            field_path = f"ops[{index}]"
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise SpecError(field_path, "expected a single-key mapping {op_name: {parameters}}")
            ((name, given),) = entry.items()
            ops.append(OpSpec.parse(field_path, name, given))
        return cls(
            ops=tuple(ops),
            fill_mode=data.get("fill_mode", "constant"),
            fill_value=data.get("fill_value", 0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "fill_mode": self.fill_mode,
            "fill_value": self.fill_value,
            "ops": [op.to_dict() for op in self.ops],
        }

    @classmethod
    def from_yaml(cls, text: str) -> AugmentSpec:
        import yaml  # imported here: a client that never reads YAML needs no PyYAML

        from augserve.core.yamlio import load_yaml

        try:
            data = load_yaml(text)
        except yaml.YAMLError as error:
            raise SpecError("spec", f"not valid YAML: {error}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_json(cls, text: str) -> AugmentSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError("spec", f"not valid JSON: {error}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_keras(cls, **kwargs: Any) -> AugmentSpec:
        """Build a spec from Keras `ImageDataGenerator` keyword arguments (see keras.py)."""
        from augserve.core.keras import spec_dict_from_keras

        return cls.from_dict(spec_dict_from_keras(kwargs))


def load_spec_file(path: str) -> AugmentSpec:
    """Load a spec from a .yaml/.yml or .json file."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        return AugmentSpec.from_json(text)
    return AugmentSpec.from_yaml(text)


def eval_spec(size: tuple[int, int], resize_ratio: float = 256 / 224) -> AugmentSpec:
    """The usual evaluation transform: resize the shorter side, then centre-crop to `size`."""
    shorter = min(MAX_SIDE, int(round(min(size) * resize_ratio)))
    return AugmentSpec.from_dict(
        {
            "ops": [
                {"resize_shorter_side": {"size": shorter}},
                {"crop": {"size": list(size), "mode": "center"}},
            ]
        }
    )
