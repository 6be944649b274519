"""Configuration models on pydantic: frozen dataclasses that refuse unknown keys, whose every
validation error is a `SpecError` naming the dotted field, and the command-line flags of
every field, generated from the model.

A config class is declared once, with `@config_dataclass`; its fields' types carry the rules
(``Annotated[Integer, Field(ge=1)]``, ``Literal[...]``, `one_of(registry)`), so a YAML file, a
generated flag (``--optimizer.learning-rate``), a short alias (``--lr``) and
``--set optimizer.learning_rate=...`` reach the same field and are validated by the same
model. Command-line text becomes a value by one rule, `ConfigField.parse`: a text field takes
the text as it is, any other field reads it as YAML (`augserve.core.yamlio`), as a config file
would.

Needs pydantic, which the `server` and `train` extras install; the client never imports this.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import (
    AfterValidator, AllowInfNan, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError, create_model,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from augserve.core.errors import SpecError
from augserve.core.yamlio import load_yaml

ConfigType = TypeVar("ConfigType")

# Unknown keys are errors; instances given for a nested section are taken as they are (they
# were validated when built).
MODEL_CONFIG = ConfigDict(extra="forbid", revalidate_instances="never")


def _whole_float_to_int(value: Any) -> Any:
    # YAML 1.2 reads 1e9 as a float: a whole one is the integer it names.
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Value types. Strict: text is never a number, a number never a boolean.
Integer = Annotated[int, BeforeValidator(_whole_float_to_int), Strict()]
Number = Annotated[float, Strict(), AllowInfNan(False)]  # an integer is taken as a float
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
PositiveInteger = Annotated[Integer, Field(ge=1)]
NonNegativeInteger = Annotated[Integer, Field(ge=0)]
NonNegativeNumber = Annotated[Number, Field(ge=0.0)]
Port = Annotated[Integer, Field(ge=0, le=65535)]  # 0: any free port


def one_of(names: Collection[str]) -> AfterValidator:
    """A validator of text that must be one of `names`, read when a value is validated (a
    registry that grows after this is declared is seen whole)."""

    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"expected one of {sorted(names)}, got {value!r}")
        return value

    return AfterValidator(check)


def config_dataclass(cls: type[ConfigType]) -> type[ConfigType]:
    """`cls` as a frozen pydantic dataclass that refuses unknown keys, whose constructor
    raises `SpecError` (field named as in the class, e.g. ``learning_rate``) instead of
    pydantic's ValidationError; `dataclasses.replace` validates through it too."""
    model = pydantic_dataclass(cls, frozen=True, config=MODEL_CONFIG)
    names = [item.name for item in dataclasses.fields(model)]
    validating_init = model.__init__

    @functools.wraps(validating_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names) or set(names[: len(args)]) & set(kwargs):
            raise TypeError(f"{model.__name__}() takes the fields {names}, each once")
        try:
            validating_init(self, **dict(zip(names, args)), **kwargs)  # keywords: errors name fields
        except ValidationError as error:
            raise spec_error(error, model, "") from None

    model.__init__ = __init__  # type: ignore[method-assign]
    return model


class ConfigModel:
    """Plain data in and out for a config dataclass; errors name fields under `config_name`."""

    config_name = "config"

    @classmethod
    def from_dict(cls: type[ConfigType], data: Mapping[str, Any] | None) -> ConfigType:
        """The config from plain data (parsed YAML/JSON): missing keys take their defaults,
        lists become tuples; an unknown key or a bad value is a `SpecError` naming its dotted
        field, e.g. ``optimizer.learning_rate``."""
        return from_data(cls, data, cls.config_name)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) that `from_dict` reads back; safe for yaml.safe_dump."""
        return _adapter(type(self)).dump_python(self, mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def plain_dataclass(cls: type[ConfigType]) -> Any:
    """The type of a field holding `cls`, a plain (stdlib) dataclass of numbers, text and
    booleans kept where this module is not used: its values are validated with the types
    above (``int`` as `Integer`, ...) and unknown keys refused before `cls` is built (its own
    ``__post_init__`` checks then run). None stands for the defaults."""
    typed = {int: Integer, float: Number, bool: Flag, str: Text}
    hints = get_type_hints(cls)
    fields = {item.name: (typed.get(hints[item.name], hints[item.name]), _default_of(item)) for item in dataclasses.fields(cls)}
    values = create_model(cls.__name__, __config__=MODEL_CONFIG, **fields)  # type: ignore[call-overload]

    def build(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        return cls(**dict(values.model_validate({} if value is None else value)))

    return Annotated[cls, BeforeValidator(build)]


def _default_of(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return Field(default_factory=item.default_factory)
    return ... if item.default is dataclasses.MISSING else item.default  # ...: required


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def from_data(cls: type[ConfigType], data: Any, prefix: str) -> ConfigType:
    """Validate plain data as `cls`; errors as `SpecError` with fields under `prefix`."""
    try:
        return _adapter(cls).validate_python({} if data is None else data)
    except ValidationError as error:
        raise spec_error(error, cls, prefix) from None


# --- errors ------------------------------------------------------------------------------------

MESSAGES = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "literal_error": "expected {expected}",
    "greater_than_equal": "expected a value >= {ge}",
    "greater_than": "expected a value > {gt}",
    "less_than_equal": "expected a value <= {le}",
    "less_than": "expected a value < {lt}",
    "too_short": "expected at least {min_length} item(s)",
    "too_long": "expected at most {max_length} item(s)",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "dataclass_type": "expected a mapping",
    "model_type": "expected a mapping",
}


def dotted_path(prefix: str, location: tuple[Any, ...]) -> str:
    """("data", "eval_group_epochs", 2) under "" -> "data.eval_group_epochs[2]"."""
    path = prefix
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":  # a mapping key's own error: the key is already the last part
            path = f"{path}.{part}" if path else str(part)
    return path


def spec_error(error: ValidationError, root: type, prefix: str) -> SpecError:
    """The first error of a validation of `root` as a SpecError naming its dotted field."""
    first = error.errors()[0]
    location, kind, context = tuple(first["loc"]), first["type"], first.get("ctx") or {}
    cause = context.get("error")
    if isinstance(cause, SpecError):  # a rule across fields, or a plain dataclass's own check
        path = dotted_path(prefix, location)
        field = cause.field if not path else f"{path}{'' if cause.field.startswith('[') else '.'}{cause.field}"
        return SpecError(field, cause.message)
    field = dotted_path(prefix, location) or "config"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        owner = type_at(root, location[:-1])
        known = sorted(field_names(owner)) if owner is not None else []
        return SpecError(field, f"unknown key; known: {known}")
    if kind == "missing":
        return SpecError(field, "required")
    if cause is not None:
        return SpecError(field, str(cause))
    text = MESSAGES[kind].format(**context) if kind in MESSAGES else first["msg"][:1].lower() + first["msg"][1:]
    return SpecError(field, f"{text}, got {first['input']!r}")


# --- walking a model ---------------------------------------------------------------------------


def core_type(hint: Any) -> Any:
    """`hint` without Annotated metadata and without an optional None."""
    while True:
        origin = get_origin(hint)
        if origin is Annotated:
            hint = get_args(hint)[0]
        elif origin in (Union, types.UnionType) and type(None) in get_args(hint):
            members = [member for member in get_args(hint) if member is not type(None)]
            if len(members) != 1:
                return hint
            hint = members[0]
        else:
            return hint


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls, include_extras=True)
    return {item.name: hints[item.name] for item in dataclasses.fields(cls)}


def field_names(cls: type) -> list[str]:
    return list(field_hints(cls)) if _is_section(cls) else []


def type_at(root: type, location: tuple[Any, ...]) -> Any:
    """The type found at `location` (keys, indexes) below `root`; None where there is none."""
    hint: Any = root
    for part in location:
        hint = core_type(hint)
        origin, arguments = get_origin(hint), get_args(hint)
        if _is_section(hint) and part in field_hints(hint):
            hint = field_hints(hint)[part]
        elif origin in (dict, Mapping) and arguments:
            hint = arguments[1]
        elif origin in (tuple, list) and arguments:
            hint = arguments[0]
        else:
            return None
    return core_type(hint)


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One field at the bottom of a config model, named by its dotted path."""

    path: str  # "optimizer.learning_rate"
    hint: Any  # its type, Annotated metadata included
    default: Any
    description: str = ""

    @property
    def flag(self) -> str:
        """The generated flag: the dotted path with dashes, ``--optimizer.learning-rate``."""
        return "--" + self.path.replace("_", "-")

    @property
    def dest(self) -> str:
        """Its attribute of the parsed arguments: the path (``args.port``, ``limits.max_sessions``)."""
        return self.path

    @property
    def takes_text(self) -> bool:
        core = core_type(self.hint)
        return core is str or (get_origin(core) is Literal and all(isinstance(item, str) for item in get_args(core)))

    @property
    def metavar(self) -> str:
        core = core_type(self.hint)
        if get_origin(core) is Literal:
            return "{" + ",".join(str(item) for item in get_args(core)) + "}"
        origin = get_origin(core) or core
        names = {str: "TEXT", int: "INTEGER", float: "NUMBER", bool: "true|false", tuple: "LIST", list: "LIST", dict: "MAPPING"}
        return names.get(origin, "YAML")

    def parse(self, text: str) -> Any:
        """The value of command-line `text`: the text itself for a text field, else YAML."""
        if self.takes_text:
            return text
        try:
            return load_yaml(text)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or error
            raise SpecError(self.path, f"{text!r} is not a YAML value ({problem})") from None

    def help(self) -> str:
        default = self.default
        shown = yaml.safe_dump(list(default) if isinstance(default, tuple) else default, default_flow_style=True)
        text = f"{self.description} " if self.description else ""
        return f"{text}(default: {shown.strip().removesuffix('...').strip()})".replace("%", "%%")


def config_fields(cls: type, prefix: str = "") -> Iterator[ConfigField]:
    """Every field at the bottom of `cls`, sections walked into (a mapping is one field)."""
    pydantic_fields = getattr(cls, "__pydantic_fields__", {})
    for item in dataclasses.fields(cls):
        hint = field_hints(cls)[item.name]
        path = f"{prefix}{item.name}"
        if _is_section(core_type(hint)):
            yield from config_fields(core_type(hint), f"{path}.")
            continue
        info = pydantic_fields.get(item.name)
        if info is not None:
            default, description = info.get_default(call_default_factory=True), info.description or ""
        else:
            factory = item.default_factory
            default = factory() if factory is not dataclasses.MISSING else item.default  # type: ignore[misc]
            description = ""
        yield ConfigField(path, hint, None if default is dataclasses.MISSING else default, description)


# --- plain data and the command line -----------------------------------------------------------


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data["a"]["b"] = value for dotted "a.b" (creating sections as needed). A number indexes
    a list that is already there: "data.spec.ops.1.rand_augment.magnitude" sets the magnitude
    of the spec's second op."""
    *path, last = dotted.split(".")
    target: Any = data
    for key in path:
        if isinstance(target, list):
            target = target[_list_index(dotted, target, key)]
        else:
            target = target.setdefault(key, {})
        if not isinstance(target, (dict, list)):
            raise SpecError(dotted, f"{key} is not a section")
    if isinstance(target, list):
        target[_list_index(dotted, target, last)] = value
    else:
        target[last] = value


def _list_index(dotted: str, items: list[Any], key: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise SpecError(dotted, f"{key!r} is not an index of a list of {len(items)}")
    return int(key)


def read_config_file(path: str | None) -> dict[str, Any]:
    """The mapping in a YAML config file ({} for None or an empty file)."""
    if path is None:
        return {}
    with open(path, encoding="utf-8") as handle:
        data = load_yaml(handle)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError("config", f"{path} must hold a mapping, got {type(data).__name__}")
    return data


class ConfigFlags:
    """The command line of a config model: a flag per field (`ConfigField.flag`), the short
    `aliases` (flag -> dotted path) beside them, and ``--set PATH=VALUE`` for any field,
    all parsed by `ConfigField.parse` into plain data that the model then validates.

    `changes` (dotted path -> ConfigField attributes) give a command's own default, or help
    for the fields of a plain dataclass, which has no descriptions of its own."""

    def __init__(
        self, root: type, aliases: Mapping[str, str] | None = None, changes: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        self.fields = {item.path: item for item in config_fields(root)}
        for path, change in (changes or {}).items():
            self.fields[path] = dataclasses.replace(self.fields[path], **change)
        self.aliases = dict(aliases or {})
        unknown = sorted(set(self.aliases.values()) - set(self.fields))
        if unknown:
            raise ValueError(f"aliases of fields that {root.__name__} does not have: {unknown}")

    def add_to(self, parser: argparse.ArgumentParser, title: Callable[[str], str] = lambda section: section) -> dict[str, Any]:
        """Add every field's flag, in one argument group per section (named by `title`);
        returns the groups by section ("" for top-level fields)."""
        groups: dict[str, Any] = {}
        for item in self.fields.values():
            section = item.path.rpartition(".")[0]
            if section not in groups:
                groups[section] = parser.add_argument_group(title(section)) if section else parser
            aliases = [flag for flag, path in self.aliases.items() if path == item.path]
            groups[section].add_argument(item.flag, *aliases, dest=item.dest, metavar=item.metavar, help=item.help())
        return groups

    def apply(self, data: dict[str, Any], args: argparse.Namespace) -> None:
        """Set into `data` every field whose flag was given."""
        for item in self.fields.values():
            text = getattr(args, item.dest, None)
            if text is not None:
                set_dotted(data, item.path, item.parse(text))

    def assignment(self, text: str) -> tuple[str, Any]:
        """(dotted path, value) of one ``--set PATH=VALUE``. A path below a field (into a
        mapping such as ``data.spec.ops.1...``) or beside them is read as YAML; the model
        refuses what it does not have."""
        dotted, separator, value = text.partition("=")
        if not separator:
            raise SpecError("--set", f"expected SECTION.FIELD=VALUE, got {text!r}")
        field = self.fields.get(dotted) or ConfigField(dotted, Any, None)
        return dotted, field.parse(value)

    def apply_assignments(self, data: dict[str, Any], assignments: list[str]) -> None:
        for text in assignments:
            set_dotted(data, *self.assignment(text))
