"""The op registry: the one definition of every augmentation op.

An op is a name, a category, its typed parameters (default, bounds, docstring) and two halves,
as torchvision v2's `make_params` / `transform` and albumentations' `get_params` / `apply`:

- `draw(params, u, size) -> record` turns the op's resolved parameters, its fixed number of
  uniform random numbers in [0, 1) and the canvas size (height, width) into a record: a plain
  dict of Python numbers, booleans, strings and tuples (JSON-serialisable) holding everything
  the op decided for one sample.
- `apply(record, canvas)` edits the `Canvas` from the record alone, deterministically.

A class may also have `check(field, params)`, which validates a rule between its resolved
parameters (e.g. rand_augment's magnitude below its bins) and raises `SpecError` naming `field`.

Categories: "geometry" (the one warp), "color" (the one colour matrix), "pixel" (a step of the
per-pixel stage after both), "policy" (draws which geometry, colour and pixel steps a sample
gets: RandAugment, TrivialAugment, AutoAugment) and "erase" (the final image).

Spec validation, YAML/JSON, the proto conversion and both backends all go through this registry;
nothing else defines an op, and a name cannot be registered twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from augserve.core.errors import SpecError
from augserve.core.ops.canvas import Canvas

Category = Literal["geometry", "color", "pixel", "policy", "erase"]
# An op's resolved parameters (name -> value, as `OpDef.parse_params` returns them).
Params = Mapping[str, Any]
# (height, width) of the canvas in pixels when the op runs.
CanvasSize = tuple[int, int]
# What `draw` decided for one sample: JSON-serialisable plain values only.
Record = Mapping[str, Any]
DrawFunction = Callable[[Params, Sequence[float], CanvasSize], Record]
ApplyFunction = Callable[[Any, Canvas], None]
# check(field, resolved params): SpecError when parameters break a rule between them.
CheckFunction = Callable[[str, Params], None]
OpClass = TypeVar("OpClass", bound=type)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class Param:
    """One typed parameter of an op. `parse` validates user input; `dump` writes it back."""

    name: str
    doc: str

    @property
    def default(self) -> Any:
        raise NotImplementedError

    def parse(self, field: str, value: Any) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class FloatParam(Param):
    low: float
    high: float
    default_value: float

    @property
    def default(self) -> float:
        return self.default_value

    def parse(self, field: str, value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise SpecError(field, f"expected a number in [{self.low}, {self.high}], got {value!r}")
        if not self.low <= value <= self.high:
            raise SpecError(field, f"{value} is outside the allowed range [{self.low}, {self.high}]")
        return float(value)

    def describe(self) -> str:
        return f"number in [{self.low}, {self.high}]"


@dataclass(frozen=True, kw_only=True)
class IntParam(Param):
    low: int
    high: int
    default_value: int

    @property
    def default(self) -> int:
        return self.default_value

    def parse(self, field: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(field, f"expected an integer in [{self.low}, {self.high}], got {value!r}")
        if not self.low <= value <= self.high:
            raise SpecError(field, f"{value} is outside the allowed range [{self.low}, {self.high}]")
        return value

    def describe(self) -> str:
        return f"integer in [{self.low}, {self.high}]"


@dataclass(frozen=True, kw_only=True)
class RangeParam(Param):
    """A [lo, hi] interval to draw from uniformly; a single number x means [center-x, center+x]."""

    low: float
    high: float
    center: float
    default_value: tuple[float, float] | None = None

    @property
    def default(self) -> tuple[float, float] | None:
        return self.default_value

    def parse(self, field: str, value: Any) -> tuple[float, float]:
        if _is_number(value):
            if value < 0:
                raise SpecError(field, f"a single number is a half-width and must be >= 0, got {value}")
            value = (self.center - value, self.center + value)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(_is_number(v) and math.isfinite(v) for v in value)
        ):
            raise SpecError(field, f"expected [low, high] within [{self.low}, {self.high}], got {value!r}")
        lo, hi = float(value[0]), float(value[1])
        if lo > hi:
            raise SpecError(field, f"low {lo} is greater than high {hi}")
        if lo < self.low or hi > self.high:
            raise SpecError(field, f"[{lo}, {hi}] is outside the allowed range [{self.low}, {self.high}]")
        return (lo, hi)

    def describe(self) -> str:
        return f"[low, high] within [{self.low}, {self.high}] (or x for [{self.center}-x, {self.center}+x])"


MAX_SIDE = 8192


@dataclass(frozen=True, kw_only=True)
class SizeParam(Param):
    """An output size [height, width] in pixels; a single number n means [n, n]."""

    default_value: tuple[int, int] | None = None

    @property
    def default(self) -> tuple[int, int] | None:
        return self.default_value

    def parse(self, field: str, value: Any) -> tuple[int, int]:
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise SpecError(field, f"expected [height, width] in pixels (1 to {MAX_SIDE}), got {value!r}")
        if not all(1 <= v <= MAX_SIDE for v in value):
            raise SpecError(field, f"{list(value)} is outside the allowed range [1, {MAX_SIDE}] pixels")
        return (int(value[0]), int(value[1]))

    def describe(self) -> str:
        return f"[height, width] in pixels, 1 to {MAX_SIDE} (or n for [n, n])"


@dataclass(frozen=True, kw_only=True)
class BoolParam(Param):
    default_value: bool

    @property
    def default(self) -> bool:
        return self.default_value

    def parse(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise SpecError(field, f"expected true or false, got {value!r}")
        return value

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True, kw_only=True)
class ChoiceParam(Param):
    choices: tuple[str, ...]
    default_value: str

    @property
    def default(self) -> str:
        return self.default_value

    def parse(self, field: str, value: Any) -> str:
        if value not in self.choices:
            raise SpecError(field, f"expected one of {list(self.choices)}, got {value!r}")
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)


def probability(name: str, doc: str, default: float) -> FloatParam:
    return FloatParam(name=name, doc=doc, low=0.0, high=1.0, default_value=default)


@dataclass(frozen=True)
class OpDef:
    """The definition of one op. `draw` consumes exactly `uniforms` numbers in [0, 1)."""

    name: str
    category: Category
    params: tuple[Param, ...]
    uniforms: int
    draw: DrawFunction
    apply: ApplyFunction
    doc: str
    fixes_size: bool
    check: CheckFunction | None = None

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(name)

    def parse_params(self, field: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validate `given` against this op's parameters; unknown and missing keys are errors."""
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            raise SpecError(field, f"expected a mapping of parameters, got {type(given).__name__}")
        known = {param.name for param in self.params}
        for key in given:
            if key not in known:
                raise SpecError(f"{field}.{key}", f"unknown parameter of {self.name}; known: {sorted(known)}")
        resolved: dict[str, Any] = {}
        for param in self.params:
            if param.name in given:
                resolved[param.name] = param.parse(f"{field}.{param.name}", given[param.name])
            elif param.default is None:
                raise SpecError(f"{field}.{param.name}", f"required ({param.describe()})")
            else:
                resolved[param.name] = param.default
        if self.check is not None:
            self.check(field, resolved)
        return resolved


OPS: dict[str, OpDef] = {}


def register_op(
    name: str,
    category: Category,
    *,
    uniforms: int,
    params: tuple[Param, ...],
    fixes_size: bool = False,
) -> Callable[[OpClass], OpClass]:
    """Register the decorated class as op `name`; its docstring documents the op.

    The class holds the op's two halves as static methods, `draw(params, u, size) -> record`
    and `apply(record, canvas)`, and optionally `check(field, params)` (see the module
    docstring); it is returned unchanged.
    `fixes_size` marks ops whose `size` parameter is the canvas size after them for every input.
    """

    def decorate(op_class: OpClass) -> OpClass:
        if name in OPS:
            raise RuntimeError(f"op {name!r} is already registered")
        halves = {half: getattr(op_class, half, None) for half in ("draw", "apply")}
        missing = [half for half, function in halves.items() if not callable(function)]
        if missing:
            raise TypeError(f"op {name!r} ({op_class.__name__}) lacks {' and '.join(missing)}")
        doc = (op_class.__doc__ or "").strip()
        draw, apply = halves["draw"], halves["apply"]
        check = getattr(op_class, "check", None)
        OPS[name] = OpDef(name, category, params, uniforms, draw, apply, doc, fixes_size, check)
        return op_class

    return decorate


def get_op(field: str, name: Any) -> OpDef:
    if not isinstance(name, str) or name not in OPS:
        raise SpecError(field, f"unknown op {name!r}; known ops: {sorted(OPS)}")
    return OPS[name]
