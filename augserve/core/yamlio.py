"""The one YAML reader of augserve: safe loading, with numbers read as YAML 1.2 reads them.

PyYAML follows YAML 1.1, where `1e-4` (no dot) and `1E5` are strings, not floats: a learning
rate or penalty written that way in a config file, a `--set` override or a sweep space would
be refused as "expected a number". This loader adds YAML 1.2's float forms and is what every
config, spec and override goes through, so a number means the same wherever it is typed.
"""

from __future__ import annotations

import re
from typing import IO, Any

import yaml

# YAML 1.2 core schema floats (with an exponent, or a dot), and its infinities and NaN.
FLOAT_PATTERN = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class NumberLoader(yaml.SafeLoader):
    """SafeLoader whose plain scalars that look like YAML 1.2 numbers are numbers."""


# Replace the float resolvers, keep every other implicit type of the safe loader.
NumberLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for first_character in "-+.0123456789":
    NumberLoader.yaml_implicit_resolvers.setdefault(first_character, [])
    # Integers first, as before; what is left of the numbers is a float.
    NumberLoader.yaml_implicit_resolvers[first_character].append(("tag:yaml.org,2002:float", FLOAT_PATTERN))


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node)
    lowered = text.lower().lstrip("+")
    if lowered in (".inf", "-.inf"):
        return float("-inf") if lowered.startswith("-") else float("inf")
    if lowered == ".nan":
        return float("nan")
    return float(text.replace("_", ""))


NumberLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml(source: str | IO[str]) -> Any:
    """Parse YAML text (or a text stream) safely; `1e-4`, `2E3` and `.5` are floats."""
    return yaml.load(source, Loader=NumberLoader)  # noqa: S506 - a SafeLoader subclass
