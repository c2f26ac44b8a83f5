"""The types of config dataclass fields, checked by name, for every config (SoftPromptConfig,
PrefixPromptConfig, HardPromptConfig, BoundConfig, SolverOptions, DriverOptions).

Two uses of one reading of the type hints:
- `check_field_types(config)`, from each config's `__post_init__`: a field of the wrong type is refused at
  construction, naming it (`max_steps must be an int, got '20'`), instead of failing later inside a comparison
  or a trace. Types are taken as they are: a bool is no int, an int is a number (a float field takes it).
- `convert(value, hint)`, for an experiment config's sections (experiment.py): also the command line's
  spellings — an int for a float, an int for text where only text is asked for, a list for a tuple.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

import numpy as np


class FieldTypeError(TypeError, ValueError):
    """A config field of the wrong type: a TypeError, and a ValueError like every other refused config value
    (the command line and the experiment's validation report those)."""


# What `convert` returns when a value is not of a member type.
MISMATCH = object()


def members(hint) -> tuple:
    """The alternatives of a union type hint (`int | None` -> (int, NoneType)); a plain hint alone."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def is_int(value) -> bool:
    """An int, numpy's included, and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def as_member(value, member, exact: bool, alternatives: tuple = ()):
    """`value` as the type `member` (one of a hint's `alternatives`), or MISMATCH. `exact`: only values of that
    type (an int counts as a float); otherwise also an int as text where no alternative is an int, and a list
    as a tuple."""
    if member is type(None):
        return None if value is None else MISMATCH
    if member is typing.Any:
        return value
    if member is bool:
        return bool(value) if isinstance(value, (bool, np.bool_)) else MISMATCH
    if member is int:
        return int(value) if is_int(value) else MISMATCH
    if member is float:
        return float(value) if is_int(value) or isinstance(value, (float, np.floating)) else MISMATCH
    if member is str:
        if isinstance(value, str):
            return value
        return str(value) if not exact and is_int(value) and int not in alternatives else MISMATCH
    if typing.get_origin(member) is tuple:
        return _as_tuple(value, typing.get_args(member), exact)
    if isinstance(member, type):
        return value if isinstance(value, member) else MISMATCH
    raise TypeError(f"config fields of type {member!r} are not supported")


def _as_tuple(value, args: tuple, exact: bool):
    if not isinstance(value, (tuple, list)) or (isinstance(value, list) and exact):
        return MISMATCH
    items = list(value)
    if len(args) == 2 and args[1] is Ellipsis:
        converted = [as_member(v, args[0], exact, (args[0],)) for v in items]
    elif len(args) == len(items):
        converted = [as_member(v, a, exact, (a,)) for v, a in zip(items, args)]
    else:
        return MISMATCH
    return MISMATCH if any(c is MISMATCH for c in converted) else tuple(converted)


def convert(value, hint):
    """`value` as the type hint `hint` asks for (exact types first, then the command line's spellings, see
    `as_member`), or MISMATCH."""
    alternatives = members(hint)
    for exact in (True, False):
        for member in alternatives:
            converted = as_member(value, member, exact, alternatives)
            if converted is not MISMATCH:
                return converted
    return MISMATCH


_NAMES = {type(None): "None", bool: "a bool", int: "an int", float: "a number", str: "a string"}
_PLURALS = {bool: "bools", int: "ints", float: "numbers", str: "strings"}


def describe(hint) -> str:
    """The type hint in words: `int | str | None` -> "an int, a string or None"."""
    names = [_describe_member(m) for m in members(hint)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _describe_member(member) -> str:
    if member in _NAMES:
        return _NAMES[member]
    if typing.get_origin(member) is tuple:
        args = typing.get_args(member)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_PLURALS.get(args[0], args[0].__name__)}"
        return f"a tuple ({', '.join(_describe_member(a) for a in args)})"
    return f"a {getattr(member, '__name__', str(member))}"


@functools.cache
def _field_hints(config_class) -> dict:
    hints = typing.get_type_hints(config_class)
    return {field.name: hints[field.name] for field in dataclasses.fields(config_class) if field.init}


def check_field_types(config) -> None:
    """Refuse, naming the field, a value of the wrong type in the dataclass `config` (FieldTypeError)."""
    for name, hint in _field_hints(type(config)).items():
        value = getattr(config, name)
        alternatives = members(hint)
        if not any(as_member(value, member, True, alternatives) is not MISMATCH for member in alternatives):
            raise FieldTypeError(f"{type(config).__name__}: {name} must be {describe(hint)}, got {value!r}")
