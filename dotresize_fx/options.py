"""Pass options from text (`prune:mlp=0.2,importance=activation`) to a checked config dataclass.

Every field of a pass config is typed; a value is accepted only if it fits the type (a `Literal` lists its
choices), and an unknown key is named with the keys that exist. Nothing is silently coerced to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from .errors import DotResizeError

_TRUE, _FALSE = {True, 1, "1", "true", "yes"}, {False, 0, "0", "false", "no"}


def build_config(cls, options: dict, where: str, **given):
    """`cls(**given, **options)` with every option checked against the field's type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)} - set(given)
    values = {}
    for key, value in options.items():
        if key not in fields:
            raise DotResizeError(f"{where}: unknown option {key!r}; options are {', '.join(sorted(fields))}")
        values[key] = coerce(hints[key], value, f"{where} {key}")
    return cls(**given, **values)


def coerce(tp, value, where: str):
    """`value` as type `tp` (Literal, bool, int, float, str, or X | None), or a DotResizeError naming the choices."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if value not in args:
            raise DotResizeError(f"{where}={value!r} is not a choice: use one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return coerce(inner[0], value, where)
    if tp is bool:
        key = value.lower() if isinstance(value, str) else value
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
        raise DotResizeError(f"{where}={value!r}: use 1 or 0 (true or false)")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise DotResizeError(f"{where}={value!r}: expected a {getattr(tp, '__name__', tp)}")


def choices(cls, name: str) -> tuple:
    """The choices of a config's Literal field (for CLI flags and docs)."""
    return typing.get_args(typing.get_type_hints(cls)[name])
