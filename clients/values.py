"""Struct values (an execution's inputs and outputs) as plain Python values.

A `google.protobuf.Struct` holds every number as a double, so `{"n": 42}`
comes back as `{"n": 42.0}` from `json_format.MessageToDict`; the REST API
prints it as `42`. `plain()` gives what the REST API shows: whole numbers
that a double holds exactly (below 2**53) as `int`, the rest as they are.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

Structured = struct_pb2.Struct | struct_pb2.Value | struct_pb2.ListValue


def plain(value: Structured | Any) -> Any:
    """`value` (a Struct, Value or ListValue, or what MessageToDict made of one) as dicts, lists,
    strings, bools, None, ints for whole numbers and floats for the rest."""
    if isinstance(value, Structured):
        value = json_format.MessageToDict(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value
