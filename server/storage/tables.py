"""The two primitives a table mixin needs from the store it is mixed into."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

T = TypeVar("T")


class Tables:
    """Base of the per-resource mixins of SqliteStore."""

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` inside a write transaction (grouped with concurrent writes)."""
        raise NotImplementedError

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` on the read connection's thread (scans, lists)."""
        raise NotImplementedError

    def _lookup(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        """One row by key, read on the calling thread.

        A primary-key read in WAL mode takes microseconds and never waits for
        the writer, which is less than a hop to a thread and back costs.
        """
        raise NotImplementedError

    def _write_soon(self, op: Callable[[sqlite3.Connection], object]) -> None:
        """Queue a write without waiting for it; a later awaited write commits it too."""
        raise NotImplementedError


def micros(ts: Timestamp) -> int:
    """A protobuf Timestamp as integer microseconds since the epoch."""
    return ts.seconds * 1_000_000 + ts.nanos // 1000
