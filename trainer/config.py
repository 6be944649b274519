"""Config plumbing shared by every trainer config: plain data in and out, field-named checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, TypeVar

from augserve.core.errors import SpecError

ConfigType = TypeVar("ConfigType")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_choice(field: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise SpecError(field, f"expected one of {list(choices)}, got {value!r}")
    return value


def check_number(
    field: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a float within the interval; `*_open` excludes that end."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if not _is_number(value) or math.isnan(value):
        raise SpecError(field, f"expected a number in {interval}, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise SpecError(field, f"{value} is outside the allowed range {interval}")
    return float(value)


def check_integer(field: str, value: Any, *, low: int = 0, high: int | None = None) -> int:
    allowed = f"[{low}, {'inf' if high is None else high}]"
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(field, f"expected an integer in {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise SpecError(field, f"{value} is outside the allowed range {allowed}")
    return value


def check_integer_tuple(
    field: str, value: Any, *, low: int = 1, length: int | None = None
) -> tuple[int, ...]:
    """A non-empty tuple (a list is accepted and converted) of integers >= `low`."""
    wanted = f"{'a non-empty' if length is None else f'{length}'} list of integers >= {low}"
    if (
        not isinstance(value, (tuple, list))
        or not value
        or (length is not None and len(value) != length)
    ):
        raise SpecError(field, f"expected {wanted}, got {value!r}")
    for index, item in enumerate(value):
        check_integer(f"{field}[{index}]", item, low=low)
    return tuple(value)


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(field, f"expected true or false, got {value!r}")
    return value


def config_from_dict(
    cls: type[ConfigType], data: Mapping[str, Any] | None, prefix: str
) -> ConfigType:
    """Build the frozen config dataclass `cls` from plain data (parsed YAML/JSON).

    Missing keys take the defaults; an unknown key is a `SpecError` (a ValueError) naming it as
    ``prefix.key`` and listing the known keys; lists become tuples. Errors raised by
    `__post_init__` are re-raised with their field prefixed, e.g. ``optimizer.learning_rate``.
    """
    data = {} if data is None else data
    known = [item.name for item in dataclasses.fields(cls) if item.init]  # type: ignore[arg-type]
    if not isinstance(data, Mapping):
        raise SpecError(prefix, f"expected a mapping with keys {known}, got {type(data).__name__}")
    unknown = [str(key) for key in data if key not in known]
    if unknown:
        raise SpecError(f"{prefix}.{unknown[0]}", f"unknown key(s) {unknown}; known: {known}")
    values = {
        key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
    }
    try:
        return cls(**values)
    except SpecError as error:
        raise SpecError(f"{prefix}.{error.field}", error.message) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain data (tuples as lists) that `config_from_dict` reads back; safe for yaml.safe_dump."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
    }


Item = TypeVar("Item")


def registrar(kind: str, table: dict[str, Item], reserved_prefix: str = "") -> Callable[[str], Callable[[Item], Item]]:
    """A decorator factory that registers into `table`; a name can be registered once (and
    none may start with `reserved_prefix`)."""

    def register_name(name: str) -> Callable[[Item], Item]:
        def register(item: Item) -> Item:
            if name in table or (reserved_prefix and name.startswith(reserved_prefix)):
                raise ValueError(f"{kind} {name!r} is already registered or reserved")
            table[name] = item
            return item

        return register

    return register_name
