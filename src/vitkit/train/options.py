"""Typed options from untrusted text, for any dataclass of options (TrainConfig is the one today):
YAML read safely and bounded, one value checked (and gently converted) against its annotation, and
a bounded repr for the error messages that quote a value.
"""

from __future__ import annotations

import reprlib
import types
import typing
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# A recipe is a flat mapping of ~80 options. YAML aliases let a 1 KB file stand for an exponentially
# large value ("billion laughs"): PyYAML shares the aliased objects, but anything that walks or prints
# the value (dataclasses.asdict, repr in an error) expands it. So a recipe whose value tree, aliases
# expanded, has more nodes than this is refused before it is constructed.
MAX_RECIPE_NODES = 10_000
MAX_RECIPE_BYTES = 1 << 20


def load_yaml(text: str, path: Path) -> Any:
    import yaml

    if len(text) > MAX_RECIPE_BYTES:
        raise ConfigError(f"{path}: {len(text):,} bytes is not a training recipe (limit {MAX_RECIPE_BYTES:,})")

    class BoundedLoader(yaml.SafeLoader):
        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                n = expanded_nodes(node, {}, MAX_RECIPE_NODES + 1)
                if n > MAX_RECIPE_NODES:
                    raise ConfigError(f"{path}: the recipe expands to more than {MAX_RECIPE_NODES:,} values "
                                      f"(nested YAML aliases?); a training recipe is a flat list of options")
            return node

    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def expanded_nodes(node: Any, memo: dict[int, int], limit: int) -> int:
    """Node count of the tree with every alias expanded, computed on the (shared) graph in
    linear time (memoised per node; cycles count as over the limit)."""
    import yaml

    key = id(node)
    if key in memo:
        if memo[key] < 0:  # a recursive alias: infinite when expanded
            return limit
        return memo[key]
    memo[key] = -1
    n = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [c for kv in node.value for c in kv]
    else:
        children = []
    for c in children:
        n += expanded_nodes(c, memo, limit)
        if n >= limit:
            break
    memo[key] = min(n, limit)
    return memo[key]


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def short(value: Any) -> str:
    """A bounded repr for error messages: never print (or build) a whole huge value."""
    return _REPR.repr(value)


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check (and gently convert: '3' -> 3 from the command line, 1 -> 1.0) one field value."""
    tp = resolve_annotation(annotation)
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be {len(args)} values, got {short(value)}")
        return tuple(coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {short(value)}")
    if tp in (int, float):
        kind = "an int" if tp is int else "a number"
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be {kind}, got {short(value)}")
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be {kind}, got {short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {short(value)}")
    return value


def resolve_annotation(annotation: Any) -> Any:
    if isinstance(annotation, str):  # from __future__ annotations
        return eval(annotation, {"tuple": tuple, "int": int, "float": float, "str": str, "bool": bool})  # noqa: S307
    return annotation
