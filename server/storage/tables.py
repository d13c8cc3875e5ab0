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

    # -- per-tenant totals kept by triggers, sharded on PostgreSQL (migrations 22 and 23) --

    async def _tenant_total(self, table: str, tenant: str) -> int:
        """`tenant`'s total in `table` (the sum of its shards), as of the last commit."""
        row = await self._lookup(f"SELECT sum(bytes) FROM {table} WHERE tenant=?", (tenant,))  # noqa: S608 - fixed names
        return 0 if row is None or row[0] is None else int(row[0])

    async def _tenants_over(self, table: str, limit: int) -> list[str]:
        """The tenants whose total in `table` is more than `limit`."""
        sql = f"SELECT tenant FROM {table} GROUP BY tenant HAVING sum(bytes) > ?"  # noqa: S608 - fixed names
        return await self._read(lambda conn: [str(row[0]) for row in conn.execute(sql, (limit,)).fetchall()])

    async def _fold_shards(self, table: str) -> None:
        """Fold the shards of PostgreSQL connections gone into shard 0 (fold_shards)."""
        if self.dialect == "postgresql":
            sql = fold_shards(table)
            await self._write(lambda conn: conn.execute(sql))

    def _write_soon(
        self, op: Callable[[Connection], object], done: Callable[[BaseException | None], None] | None = None
    ) -> None:
        """Queue a write without waiting for it; a later awaited write commits it too. `done`, if
        given, hears how it went (None: committed) instead of a failure being logged."""
        raise NotImplementedError

    def _greatest(self) -> str:
        """The SQL function of the larger of two values (MAX is an aggregate on PostgreSQL)."""
        return "GREATEST" if self.dialect == "postgresql" else "MAX"


def within_budget(table: str, alias: str, keys: Sequence[str], order: Sequence[tuple[str, str]], where: str) -> str:
    """SQL of the bodies of `table`'s rows matching `where`, in `order`, at most LIMIT (its first
    parameter after `where`'s) and no more than a page takes: rows stop at the first whose
    bodies, with those before it, pass the byte budget (the next parameter), that row included
    and at least two, so `pagination.page` still sees there is more. Only the rows kept are read
    whole; the others' sizes come from `length(body)`, which neither engine reads the value for.
    Without it, a page of 1000 executions of 12 MiB each was read into memory to answer 4 MiB.

    `keys` join back to the table (its primary key); `order` is (column, ASC or DESC) pairs.
    """
    columns = list(dict.fromkeys([*keys, *(column for column, _ in order)]))
    picked = ", ".join(f"{alias}.{column} AS {column}" for column in columns)
    by = ", ".join(f"{column} {direction}" for column, direction in order)
    by_source = ", ".join(f"{alias}.{column} {direction}" for column, direction in order)
    on = " AND ".join(f"t.{key} = p.{key}" for key in keys)
    return (
        f"SELECT t.body FROM {table} t JOIN (SELECT {', '.join(keys)},"  # noqa: S608 - fixed fragments
        f" sum(size) OVER (ORDER BY {by} ROWS UNBOUNDED PRECEDING) - size AS before,"
        f" row_number() OVER (ORDER BY {by}) AS n"
        f" FROM (SELECT {picked}, length({alias}.body) AS size FROM {table} {alias} WHERE {where}"
        f" ORDER BY {by_source} LIMIT ?) l) p ON {on} WHERE p.before <= ? OR p.n <= 2 ORDER BY p.n"
    )


def micros(ts: Timestamp) -> int:
    """A protobuf Timestamp as integer microseconds since the epoch."""
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def fold_shards(table: str) -> str:
    """The statement that folds the rows of PostgreSQL connections gone into shard 0, in a table of
    per-tenant totals that each connection adds to under its backend pid (migrations 22 and 23):
    without it those rows would pile up over restarts."""
    return (
        f"WITH gone AS (DELETE FROM {table} WHERE shard <> 0"  # noqa: S608 - a fixed table name
        " AND shard NOT IN (SELECT pid FROM pg_stat_activity) RETURNING tenant, bytes)"
        f" INSERT INTO {table} (tenant, shard, bytes) SELECT tenant, 0, sum(bytes) FROM gone"
        f" GROUP BY tenant ON CONFLICT (tenant, shard) DO UPDATE SET bytes = {table}.bytes + excluded.bytes"
    )
