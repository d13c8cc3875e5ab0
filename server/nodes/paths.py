"""Dotted paths into JSON-like values: `response.body`, `rows[0].id`."""

from __future__ import annotations

import re
from typing import Any

_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")

MISSING = object()
"""Returned by `lookup` when the path leads nowhere."""


def steps(path: str) -> list[str | int]:
    """`a.b[2].c` as ['a', 'b', 2, 'c']."""
    return [int(index) if index else name for name, index in _STEP.findall(path)]


def lookup(value: Any, path: list[str | int] | tuple[str | int, ...]) -> Any:
    """The value at `path`, or MISSING."""
    for step in path:
        in_list = isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value)
        if in_list or (isinstance(step, str) and isinstance(value, dict) and step in value):
            value = value[step]
        elif isinstance(step, str) and step.isdigit() and isinstance(value, list) and int(step) < len(value):
            value = value[int(step)]
        else:
            return MISSING
    return value
