"""What every trainer config shares: registries of names, and the value types of its fields.

The configs themselves are `augserve.core.config` dataclasses (validated by pydantic, unknown
keys refused, errors naming the dotted field).
"""

from __future__ import annotations

from typing import Annotated, Callable, TypeVar

from pydantic import Field

from augserve.core.config import Integer
from augserve.core.plan import MAX_SEED

Seed = Annotated[Integer, Field(ge=0, le=MAX_SEED)]

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
