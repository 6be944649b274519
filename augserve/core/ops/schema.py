"""The op registry as plain data: what a client needs to write a valid spec without learning
the vocabulary from error messages.

`registry_schema()` describes every registered op and parameter, `spec_schema()` the spec-level
keys; both are pure functions of the registry (and of `augserve.core.spec`), so what a server
describes is what it validates. `augserve/rpc/schema.py` turns them into DescribeOps messages.

This module is not imported by `augserve.core.ops` itself (it needs `augserve.core.spec`, which
needs the ops): import it where a schema is wanted.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any, Literal

from augserve.core.ops import OPS
from augserve.core.ops.registry import (
    MAX_SIDE,
    BoolParam,
    ChoiceParam,
    FloatParam,
    IntParam,
    OpDef,
    Param,
    RangeParam,
    SizeParam,
)
from augserve.core.spec import FILL_MODES, MAX_OPS, AugmentSpec

ParamKind = Literal["float", "int", "range", "size", "bool", "choice"]
Unit = Literal["degrees", "fraction", "pixels", "probability", ""]

# Exact classes, not isinstance: a new Param subclass must say how it is described (a
# subclass of IntParam with other parsing rules is not simply an "int").
PARAM_KINDS: dict[type[Param], ParamKind] = {
    FloatParam: "float",
    IntParam: "int",
    RangeParam: "range",
    SizeParam: "size",
    BoolParam: "bool",
    ChoiceParam: "choice",
}

# The registry states units in the parameters' docs ("Angle range in degrees", "as a fraction
# of the width", "Probability of ..."); the first pattern that matches names the unit. "in
# pixels" rather than "pixels": "Fill value of erased pixels" is an intensity, not a length.
DOC_UNITS: tuple[tuple[re.Pattern[str], Unit], ...] = (
    (re.compile(r"\bin degrees\b", re.IGNORECASE), "degrees"),
    (re.compile(r"\bin pixels\b", re.IGNORECASE), "pixels"),
    (re.compile(r"\bfraction\b", re.IGNORECASE), "fraction"),
    (re.compile(r"^probability\b", re.IGNORECASE), "probability"),
)

# The spec-level fill value is one uint8 for every channel; AugmentSpec checks [0, 255]
# (tests/test_contract.py checks these bounds against its validation).
FILL_VALUE_RANGE = (0, 255)


@dataclass(frozen=True)
class ParamSchema:
    """One parameter as a client sees it.

    `low`/`high` bound the value (float, int), both ends of the interval (range) or each side
    (size, in pixels); None for bool and choice. `default` is the value an op without the
    parameter gets, as the registry holds it (tuples for range and size), None when required.
    `center` is what a single number x spreads around for a range ([center - x, center + x]).
    `summary` is the rule in words (`Param.describe()`, as error messages state it).
    """

    name: str
    kind: ParamKind
    doc: str
    unit: Unit
    summary: str
    low: float | None
    high: float | None
    default: Any
    choices: tuple[str, ...] = ()
    center: float | None = None

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class OpSchema:
    """One registered op: `fixes_size` when its `size` parameter is the output [height, width]
    for every input; `params` in declaration order."""

    name: str
    category: str
    doc: str
    fixes_size: bool
    params: tuple[ParamSchema, ...]


@dataclass(frozen=True)
class SpecSchema:
    """The keys of a spec besides `ops` (fill_mode, fill_value) and the most ops it may hold."""

    keys: tuple[ParamSchema, ...]
    max_ops: int


def param_kind(param: Param) -> ParamKind:
    try:
        return PARAM_KINDS[type(param)]
    except KeyError:
        raise TypeError(f"parameter {param.name!r}: no schema kind for {type(param).__name__}") from None


def param_unit(param: Param) -> Unit:
    """The unit of `param`'s numbers: a size is in pixels by its type; otherwise what its doc
    says, or "" (multipliers, aspect ratios, counts, choices)."""
    if isinstance(param, SizeParam):
        return "pixels"
    for pattern, unit in DOC_UNITS:
        if pattern.search(param.doc):
            return unit
    return ""


def param_bounds(param: Param) -> tuple[float | None, float | None]:
    """(low, high), inclusive; (None, None) where the type has no numeric bounds."""
    if isinstance(param, SizeParam):
        return 1, MAX_SIDE
    if isinstance(param, (FloatParam, IntParam, RangeParam)):
        return param.low, param.high
    return None, None


def param_schema(param: Param) -> ParamSchema:
    low, high = param_bounds(param)
    return ParamSchema(
        name=param.name,
        kind=param_kind(param),
        doc=param.doc,
        unit=param_unit(param),
        summary=param.describe(),
        low=low,
        high=high,
        default=param.default,
        choices=param.choices if isinstance(param, ChoiceParam) else (),
        center=param.center if isinstance(param, RangeParam) else None,
    )


def op_schema(definition: OpDef) -> OpSchema:
    """`doc` without the class docstring's indentation of continuation lines."""
    return OpSchema(
        name=definition.name,
        category=definition.category,
        doc=inspect.cleandoc(definition.doc),
        fixes_size=definition.fixes_size,
        params=tuple(param_schema(param) for param in definition.params),
    )


def registry_schema() -> list[OpSchema]:
    """Every registered op, sorted by name (as error messages list them)."""
    return [op_schema(OPS[name]) for name in sorted(OPS)]


def spec_schema() -> SpecSchema:
    """fill_mode and fill_value with AugmentSpec's own defaults, and MAX_OPS."""
    defaults = {field.name: field.default for field in dataclasses.fields(AugmentSpec)}
    fill_mode = ChoiceParam(
        name="fill_mode",
        doc="Pixels the warp uncovers: constant takes fill_value, nearest repeats the border pixel.",
        choices=FILL_MODES,
        default_value=defaults["fill_mode"],
    )
    fill_value = IntParam(
        name="fill_value",
        doc="Value of every channel of uncovered pixels under fill_mode constant.",
        low=FILL_VALUE_RANGE[0],
        high=FILL_VALUE_RANGE[1],
        default_value=defaults["fill_value"],
    )
    return SpecSchema(keys=(param_schema(fill_mode), param_schema(fill_value)), max_ops=MAX_OPS)
