"""Whole numbers in event JSON: `google.protobuf.Struct` holds every number as a
double, and protobuf's C++ printer (Envoy's `GET /events`) prints a whole one
as an integer. Webhook bodies and `/ws` frames print them the same way."""

from __future__ import annotations

from typing import Any, Final

MAX_EXACT: Final = 2**53  # doubles hold every integer up to here


def whole_numbers(value: Any) -> Any:
    """`value` with its whole doubles (within MAX_EXACT) as ints, at any depth."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value
