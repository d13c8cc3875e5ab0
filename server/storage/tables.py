"""The two primitives a table mixin needs from the store it is mixed into."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

T = TypeVar("T")


class Tables:
    """Base of the per-resource mixins of SqliteStore."""

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` inside a write transaction (grouped with concurrent writes)."""
        raise NotImplementedError

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` on the read connection."""
        raise NotImplementedError


def micros(ts: Timestamp) -> int:
    """A protobuf Timestamp as integer microseconds since the epoch."""
    return ts.seconds * 1_000_000 + ts.nanos // 1000
