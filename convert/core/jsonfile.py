"""Small JSON files whose shape PocketLM relies on, read and checked in one place.

A shape is a type or a tuple of types (`isinstance`, with `bool` never an `int`), a dict of
field shapes (an object; a field whose name ends in `?` may be absent, other fields may be
present), or `Each(shape)` (an object whose every value has `shape`). A file that is not
UTF-8 JSON of its shape raises `MalformedJSON` naming the file and the first field at fault;
`OSError` (missing, unreadable) passes through for the caller to judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NONE = type(None)
OPTIONAL_STRING = (str, NONE)


@dataclass(frozen=True)
class Each:
    """An object of any keys whose every value has `shape`."""

    shape: Shape


Shape = type | tuple[type, ...] | dict[str, "Shape"] | Each


class MalformedJSON(ValueError):
    """A JSON file that does not parse, or not into the shape PocketLM expects."""


KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}


def _kind(value: Any) -> str:
    return "null" if value is None else KINDS.get(type(value), type(value).__name__)


def _names(shape: type | tuple[type, ...]) -> str:
    types = shape if isinstance(shape, tuple) else (shape,)
    return " or ".join("null" if t is NONE else KINDS.get(t, t.__name__) for t in types)


def problem(value: Any, shape: Shape, where: str = "") -> str | None:
    """Why `value` does not have `shape` (the first field at fault), or None if it does."""
    at = f"{where}: " if where else ""
    if isinstance(shape, Each):
        if not isinstance(value, dict):
            return f"{at}expected an object, found {_kind(value)}"
        for key, item in value.items():
            found = problem(item, shape.shape, f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{at}expected an object, found {_kind(value)}"
        for name, field_shape in shape.items():
            key = name.removesuffix("?")
            if key not in value:
                if name.endswith("?"):
                    continue
                return f"{where + '.' if where else ''}{key} is missing"
            found = problem(value[key], field_shape, f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    types = shape if isinstance(shape, tuple) else (shape,)
    if isinstance(value, bool) and bool not in types:
        return f"{at}expected {_names(shape)}, found a boolean"
    if not isinstance(value, types):
        return f"{at}expected {_names(shape)}, found {_kind(value)}"
    return None


def read_json(path: Path, shape: Shape) -> Any:
    """The JSON in `path`, checked against `shape`; MalformedJSON if it is not that."""
    data = Path(path).read_bytes()
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MalformedJSON(f"{path}: not valid JSON ({type(e).__name__})") from None
    found = problem(value, shape)
    if found:
        raise MalformedJSON(f"{path}: {found}")
    return value
