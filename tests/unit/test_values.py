"""Struct and Python values convert both ways as protobuf's own Struct.update does, and large ones
are converted in turns, the event loop running other calls between them."""

from __future__ import annotations

import asyncio
import enum
import json
from collections import OrderedDict
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from flowport.server.engine import values
from flowport.server.engine.values import (
    TooDeep,
    TooLarge,
    python_to_struct,
    python_to_struct_in_turns,
    struct_to_python,
    struct_to_python_in_turns,
)

pytestmark = pytest.mark.timeout(120)

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=40,
)
_objects = st.dictionaries(st.text(max_size=5), _json, max_size=6)


def _reference(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def _as_read(data: Any) -> Any:
    """`data` as a Struct gives it back: every number a double, integral ones within 2**53 as int."""
    if isinstance(data, dict):
        return {key: _as_read(item) for key, item in data.items()}
    if isinstance(data, list | tuple):
        return [_as_read(item) for item in data]
    if isinstance(data, int | float) and not isinstance(data, bool):
        number = float(data)
        return int(number) if number.is_integer() and abs(number) <= 2**53 else number
    return data


@settings(max_examples=300, deadline=None)
@given(_objects)
def test_both_ways_as_protobuf_does(data: dict[str, Any]) -> None:
    struct = python_to_struct(data)
    assert struct == _reference(data)
    assert struct_to_python(struct) == _as_read(data)


def _large(count: int) -> dict[str, Any]:
    """About `count` values, nested, of every kind: past the one-turn fast paths."""
    row = {"id": 1, "name": "ünï", "ok": True, "none": None, "tags": ["a", [], {}], "score": 2.5}
    return {"rows": [dict(row, id=n) for n in range(count // 10)], "empty": {}, "flat": list(range(count // 10))}


async def test_large_values_convert_in_turns_to_the_same_result() -> None:
    data = _large(100_000)
    struct = await python_to_struct_in_turns(data)
    assert struct == _reference(data)
    assert struct.ByteSize() > 2 * values.VALUES_PER_TURN
    assert await struct_to_python_in_turns(struct) == struct_to_python(struct) == _as_read(data)


async def test_other_calls_run_between_turns() -> None:
    """A million values (4 MiB of `[[],[],…]` in a request) hold the event loop for one turn at a
    time: a task ready all along runs between every two turns."""
    ticks = 0
    done = False

    async def ticking() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(ticking())
    await asyncio.sleep(0)
    data = {"lists": [[] for _ in range(1_000_000)]}
    turns = 1_000_000 // values.VALUES_PER_TURN
    start = ticks
    struct = await python_to_struct_in_turns(data)
    built = ticks - start
    start = ticks
    read = await struct_to_python_in_turns(struct)
    read_ticks = ticks - start
    done = True
    await ticker
    assert read == data
    assert built >= turns and read_ticks >= turns, (built, read_ticks, turns)


async def test_depth_and_bytes_are_bounded_as_the_struct_grows() -> None:
    nested: Any = "leaf"
    for _ in range(5):
        nested = [nested]
    await python_to_struct_in_turns({"n": nested}, most_depth=6)
    with pytest.raises(TooDeep):
        await python_to_struct_in_turns({"n": nested}, most_depth=5)
    # A list held a million times by reference: stopped at the bound, not built whole.
    shared = list(range(1000))
    with pytest.raises(TooLarge):
        await python_to_struct_in_turns({str(n): shared for n in range(1_000_000)}, most_bytes=2**20)
    # The count is a lower bound: a Struct just under the bound is built.
    exact = {"s": "x" * 1000, "n": [1.5] * 100, "b": [True, None, {}, []]}
    size = python_to_struct(exact).ByteSize()
    assert (await python_to_struct_in_turns(exact, most_bytes=size)).ByteSize() == size


class _Level(enum.IntEnum):
    HIGH = 3


class _Name(str, enum.Enum):  # noqa: UP042 (a StrEnum's str() is its value; this one's is its name)
    A = "a"


def test_json_kinds_by_subclass_and_what_is_not_json() -> None:
    struct = python_to_struct({"level": _Level.HIGH, "name": _Name.A, "map": OrderedDict(x=(1, 2))})
    assert struct_to_python(struct) == {"level": 3, "name": "a", "map": {"x": [1, 2]}}
    assert json.loads(json.dumps(struct_to_python(struct))) == struct_to_python(struct)
    with pytest.raises(ValueError, match="Unexpected type bytes"):
        python_to_struct({"b": b"raw"})
    with pytest.raises(TypeError, match="object key is int"):
        python_to_struct({"m": {1: "x"}})
    with pytest.raises(ValueError, match="too large for a JSON number"):
        python_to_struct({"n": 10**400})
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(TooDeep):  # a ValueError: callers' "not JSON"
        python_to_struct({"c": cycle})
