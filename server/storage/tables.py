"""What a table mixin needs from the store it is mixed into.

The mixins hold the SQL, written once for both engines: `?` placeholders
(the PostgreSQL connection turns them into its own), standard SQL, and the
few engine differences behind `self.dialect`. Writes run as functions of a
`Connection` on the store's writer thread, inside a transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from flowport.server.storage.quotas import TenantQuotas

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]


class Cursor(Protocol):
    """The part of a DB-API cursor the mixins use."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The part of a DB-API connection the mixins use (sqlite3.Connection is one)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


class Tables:
    """Base of the per-resource mixins of the stores."""

    dialect: ClassVar[Dialect] = "sqlite"
    # What one tenant may keep (the server sets them from its settings when it opens the store).
    quotas: TenantQuotas = TenantQuotas()

    async def _write(self, op: Callable[[Connection], T]) -> T:
        """Run `op` inside a write transaction (grouped with concurrent writes)."""
        raise NotImplementedError

    async def _read(self, op: Callable[[Connection], T]) -> T:
        """Run `op` on a read connection (scans, lists)."""
        raise NotImplementedError

    async def _lookup(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        """One row by key (SQLite reads it on the calling thread: microseconds)."""
        raise NotImplementedError

    def _write_soon(self, op: Callable[[Connection], object]) -> None:
        """Queue a write without waiting for it; a later awaited write commits it too."""
        raise NotImplementedError

    def _greatest(self) -> str:
        """The SQL function of the larger of two values (MAX is an aggregate on PostgreSQL)."""
        return "GREATEST" if self.dialect == "postgresql" else "MAX"


def micros(ts: Timestamp) -> int:
    """A protobuf Timestamp as integer microseconds since the epoch."""
    return ts.seconds * 1_000_000 + ts.nanos // 1000
