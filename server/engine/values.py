"""Between google.protobuf.Struct and plain Python values.

Struct stores every number as a double, so `{"n": 3}` comes back as 3.0;
user code doing `range(n)` would then fail. Integral doubles within the
exactly-representable range come back as int.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

_EXACT = 2**53


def value_to_python(value: struct_pb2.Value) -> Any:
    """One Value as a JSON-like Python value."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and -_EXACT <= number <= _EXACT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    if kind == "list_value":
        return [value_to_python(v) for v in value.list_value.values]
    return None


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict, integral numbers as int."""
    return {key: value_to_python(value) for key, value in struct.fields.items()}


def python_to_struct(data: dict[str, Any], into: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """A JSON-like dict as a Struct (non-JSON values raise TypeError/ValueError)."""
    struct = struct_pb2.Struct() if into is None else into
    struct.update(data)
    return struct
