"""Dotted paths into JSON-like values: `response.body`, `rows[0].id`."""

from __future__ import annotations

import re
from typing import Any

# ASCII digits, at most 18: int() takes them all and never fails.
_STEP = re.compile(r"([^.\[\]]+)|\[([0-9]{1,18})\]")

MISSING = object()
"""Returned by `lookup` when the path leads nowhere."""


def steps(path: str) -> list[str | int]:
    """`a.b[2].c` as ['a', 'b', 2, 'c']."""
    return [int(index) if index else name for name, index in _STEP.findall(path)]


def is_index(step: str) -> bool:
    """Whether `step` is a list index int() takes: ASCII digits ("²".isdigit() is true), at most 18."""
    return step.isascii() and step.isdigit() and len(step) <= 18


def lookup(value: Any, path: list[str | int] | tuple[str | int, ...]) -> Any:
    """The value at `path`, or MISSING."""
    for step in path:
        in_list = isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value)
        if in_list or (isinstance(step, str) and isinstance(value, dict) and step in value):
            value = value[step]
        elif isinstance(step, str) and is_index(step) and isinstance(value, list) and int(step) < len(value):
            value = value[int(step)]
        else:
            return MISSING
    return value
