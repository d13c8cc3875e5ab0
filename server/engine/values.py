"""Between google.protobuf.Struct and plain Python values.

Struct stores every number as a double, so `{"n": 3}` comes back as 3.0;
user code doing `range(n)` would then fail. Integral doubles within the
exactly-representable range come back as int.

A conversion walks every value in Python, about a microsecond each, and the
values of one execution (its inputs, a node's outputs) may number millions
within their byte bounds: 4 MiB of `[[],[],…]` is a million lists. The
`*_in_turns` converters do the same walk a turn of `VALUES_PER_TURN` values
at a time, letting the event loop run other calls between turns, so one
tenant's large values delay the others' calls by a turn, not by seconds.
Values that fit in one turn are converted without yielding.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, Final

from google.protobuf import struct_pb2

_EXACT = 2**53

# Values converted between two yields to the event loop: a few milliseconds.
VALUES_PER_TURN: Final = 4096

# Lower bounds of a value's bytes in a serialized Struct (see `_Builder`): a
# list item's tag and length, a map entry's tag, length, key tag and length
# and value tag and length; a Value's own tag and length, and a number's 8.
_LIST_ITEM: Final = 2
_MAP_ENTRY: Final = 6
_VALUE: Final = 2
_NUMBER: Final = 9


# Objects and lists nested in a value converted to a Struct, unless a caller bounds it lower:
# protobuf parses at most 100 nested messages anyway, and a value holding itself (a cycle) stops.
MAX_NESTING: Final = 100


class TooDeep(ValueError):
    """Containers nest deeper than the conversion allows (or hold themselves)."""


class TooLarge(ValueError):
    """The Struct being built is already past the bytes the conversion allows."""


class _Reader:
    """A Struct's values read into Python a turn at a time: containers are made when first met and
    filled from a stack of (entries, container), so a turn may stop in the middle of one."""

    def __init__(self, struct: struct_pb2.Struct) -> None:
        self.result: dict[str, Any] = {}
        self._pending: list[tuple[Iterator[Any], dict[str, Any] | list[Any]]] = [
            (iter(struct.fields.items()), self.result)
        ]

    def turn(self, budget: int) -> bool:
        """Convert about `budget` values; whether the whole Struct is done."""
        pending = self._pending
        while pending:
            entries, into = pending[-1]
            height = len(pending)
            # A container met is filled before the rest of its parent (the stack stays as deep as
            # the nesting); its place in the parent is taken when it is met.
            if isinstance(into, dict):
                for key, value in entries:
                    into[key] = self._convert(value)
                    budget -= 1
                    if budget <= 0 or len(pending) > height:
                        break
                else:
                    pending.pop()
            else:
                for value in entries:
                    into.append(self._convert(value))
                    budget -= 1
                    if budget <= 0 or len(pending) > height:
                        break
                else:
                    pending.pop()
            if budget <= 0:
                break
        return not pending

    def _convert(self, value: struct_pb2.Value) -> Any:
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            return value.string_value
        if kind == "number_value":
            number = value.number_value
            return int(number) if number.is_integer() and -_EXACT <= number <= _EXACT else number
        if kind == "struct_value":
            made: dict[str, Any] = {}
            self._pending.append((iter(value.struct_value.fields.items()), made))
            return made
        if kind == "list_value":
            items: list[Any] = []
            self._pending.append((iter(value.list_value.values), items))
            return items
        if kind == "bool_value":
            return value.bool_value
        return None


class _Builder:
    """A Struct built from Python values a turn at a time, as `_Reader` reads one.

    `most_depth` bounds nesting (the top dict is depth 1) and `most_bytes`
    the Struct's serialized size, through a lower bound counted as it grows
    (each value's tags and lengths, a number's 8 bytes, a string's or key's
    characters): values held many times by reference (a TransformNode
    mapping many keys to one list) are small in memory and may be gigabytes
    as a Struct, and their build stops once the count passes the bound.
    """

    def __init__(self, data: dict[str, Any], into: struct_pb2.Struct, most_depth: int, most_bytes: int) -> None:
        self._most_depth = most_depth
        self._most_bytes = most_bytes
        self.size = 0
        self._pending: list[tuple[Iterator[Any], struct_pb2.Struct | struct_pb2.ListValue, int]] = []
        self._open(iter(data.items()), into, 1)

    def _open(self, entries: Iterator[Any], into: struct_pb2.Struct | struct_pb2.ListValue, depth: int) -> None:
        self._check_depth(depth)
        self._pending.append((entries, into, depth))

    def _check_depth(self, depth: int) -> None:
        """TooDeep for a container at `depth` (checked for empty ones too, which are not opened)."""
        if depth > self._most_depth:
            raise TooDeep(f"deeper than {self._most_depth} objects and lists")

    def turn(self, budget: int) -> bool:
        """Add about `budget` values; whether all are in. Raises TooDeep, TooLarge, and TypeError or
        ValueError for a value that is not JSON."""
        pending = self._pending
        size, most = self.size, self._most_bytes
        while pending:
            entries, into, depth = pending[-1]
            height = len(pending)
            # The bound is checked at each value: a string held many times by reference is copied
            # into the Struct each time it is met.
            if isinstance(into, struct_pb2.Struct):
                fields = into.fields
                for key, item in entries:
                    if not isinstance(key, str):
                        raise TypeError(f"an object key is {type(key).__name__}, not a string")
                    size += _MAP_ENTRY + len(key) + self._set(fields[key], item, depth)
                    if size > most:
                        raise TooLarge(f"more than {most} bytes")
                    budget -= 1
                    if budget <= 0 or len(pending) > height:
                        break
                else:
                    pending.pop()
            else:
                values = into.values
                for item in entries:
                    size += _LIST_ITEM + self._set(values.add(), item, depth)
                    if size > most:
                        raise TooLarge(f"more than {most} bytes")
                    budget -= 1
                    if budget <= 0 or len(pending) > height:
                        break
                else:
                    pending.pop()
            if budget <= 0:
                break
        self.size = size
        return not pending

    def _set(self, value: struct_pb2.Value, item: Any, depth: int) -> int:
        """Set `value` to `item` (a container is filled later); a lower bound of its bytes."""
        kind = type(item)
        if kind is str:
            value.string_value = item
            return _VALUE + len(item)
        if kind is float or kind is int:
            try:
                value.number_value = item
            except OverflowError:
                raise ValueError("a number is too large for a JSON number") from None
            return _NUMBER
        if kind is dict:
            struct = value.struct_value
            if item:
                self._open(iter(item.items()), struct, depth + 1)
            else:
                self._check_depth(depth + 1)
                struct.SetInParent()
            return _VALUE
        if kind is list or kind is tuple:
            items = value.list_value
            if item:
                self._open(iter(item), items, depth + 1)
            else:
                self._check_depth(depth + 1)
                items.SetInParent()
            return _VALUE
        if item is None:
            value.null_value = struct_pb2.NULL_VALUE
            return _VALUE
        if kind is bool:
            value.bool_value = item
            return _VALUE
        # Subclasses (an IntEnum, an OrderedDict…) as their JSON kind.
        if isinstance(item, str):
            value.string_value = item  # its own characters, not its str() (a str Enum's name)
            return _VALUE + len(item)
        if isinstance(item, int | float):
            return self._set(value, int(item) if isinstance(item, int) else float(item), depth)
        if isinstance(item, dict):
            return self._set(value, dict(item), depth)
        if isinstance(item, list | tuple):
            return self._set(value, list(item), depth)
        raise ValueError(f"Unexpected type {kind.__name__}, not a JSON value")


_UNBOUNDED: Final = 2**62


async def _other_calls() -> None:
    """Let the event loop run what is ready (other calls) before the next turn."""
    await asyncio.sleep(0)


def _value_to_python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and -_EXACT <= number <= _EXACT else number
    if kind == "struct_value":
        return {key: _value_to_python(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_value_to_python(item) for item in value.list_value.values]
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict, integral numbers as int, in one go (for values bounded small)."""
    # Recursion, a third faster than `_Reader` for the few values of nearly every call.
    return {key: _value_to_python(value) for key, value in struct.fields.items()}


def one_turn(struct: struct_pb2.Struct) -> bool:
    """Whether `struct` is read in one turn: each value takes 2 bytes or more serialized."""
    return struct.ByteSize() <= 2 * VALUES_PER_TURN


async def struct_to_python_in_turns(struct: struct_pb2.Struct) -> dict[str, Any]:
    """As `struct_to_python`, yielding to the event loop between turns (module docstring)."""
    return struct_to_python(struct) if one_turn(struct) else await read_in_turns(struct)


async def read_in_turns(struct: struct_pb2.Struct) -> dict[str, Any]:
    """`struct_to_python_in_turns` for a Struct already known not to fit in one turn (`one_turn`)."""
    reader = _Reader(struct)
    while not reader.turn(VALUES_PER_TURN):
        await _other_calls()
    return reader.result


def python_to_struct(data: dict[str, Any], into: struct_pb2.Struct | None = None) -> struct_pb2.Struct:
    """A JSON-like dict as a Struct, in one go (for values bounded small); TypeError or ValueError
    for a value that is not JSON (TooDeep past MAX_NESTING levels)."""
    struct = struct_pb2.Struct() if into is None else into
    _Builder(data, struct, MAX_NESTING, _UNBOUNDED).turn(_UNBOUNDED)
    return struct


async def python_to_struct_in_turns(
    data: dict[str, Any], *, most_depth: int = MAX_NESTING, most_bytes: int = _UNBOUNDED
) -> struct_pb2.Struct:
    """As `python_to_struct`, yielding between turns (module docstring); TooDeep past `most_depth`
    levels of objects and lists (`data` is the first; MAX_NESTING unless lower), TooLarge once the
    Struct is known to be past `most_bytes` serialized (`_Builder`). Partly built when it raises:
    the caller drops it."""
    struct = struct_pb2.Struct()
    builder = _Builder(data, struct, most_depth, most_bytes)
    while not builder.turn(VALUES_PER_TURN):
        await _other_calls()
    return struct
