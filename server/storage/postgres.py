"""The shared store: PostgreSQL, for several flowport processes at once.

The same table mixins as the SQLite store, over psycopg connections, each
on its own thread as with SQLite: one writer with group commit (every
process has its own; PostgreSQL's row locks order them) and a small pool of
readers for lists and lookups, which must not block the event loop on a
network round trip.

The mixins' SQL uses `?` placeholders; `PgConnection` turns them into
psycopg's `%s` once per statement text.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import pq

from flowport.server.storage.group_commit import ConnectionThread, GroupWriter, QueryTiming, commit_unless_one_fails
from flowport.server.storage.migrate import Migration, bundled, migrate
from flowport.server.storage.sql_store import SqlStore
from flowport.server.storage.tables import Connection, Cursor
from flowport.server.storage.workflow_cache import WorkflowCache

T = TypeVar("T")
READERS = 4


@functools.lru_cache(maxsize=1024)
def _placeholders(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (a literal `%` doubled first).

    The mixins' SQL never has a `?` inside a string literal, which this
    would break; a test runs every statement on both engines.
    """
    return sql.replace("%", "%%").replace("?", "%s")


class PgConnection:
    """A psycopg connection with the sqlite3-like surface the mixins use."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.raw = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        cursor: Cursor = self.raw.execute(_placeholders(sql), tuple(parameters))
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor:
        cursor = self.raw.cursor()
        cursor.executemany(_placeholders(sql), [tuple(p) for p in parameters])
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


# Seconds a new connection may take (psycopg's connect_timeout).
CONNECT_TIMEOUT = 5


def _broken(conn: PgConnection) -> bool:
    """Whether the connection is lost (the server went away, the network failed)."""
    return bool(conn.raw.closed or conn.raw.broken)


def _connect(url: str) -> PgConnection:
    # Autocommit at the driver: transactions are begun and ended explicitly
    # (one per write batch), and reads see the latest committed state.
    # A bounded wait: a thread reconnecting to a server that does not answer must not hang.
    return PgConnection(psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT))


def _run_batch(conn: PgConnection, ops: list[Callable[[PgConnection], Any]]) -> list[tuple[bool, Any]]:
    """Every op in one transaction, with no savepoint unless one op fails (then `_run_isolated`)."""
    conn.raw.execute("BEGIN")
    try:
        return commit_unless_one_fails(conn, ops, conn.raw.execute, _run_isolated)
    except BaseException:
        if conn.in_transaction:
            conn.raw.execute("ROLLBACK")
        raise


def _run_isolated(conn: PgConnection, ops: list[Callable[[PgConnection], Any]]) -> list[tuple[bool, Any]]:
    """Every op in one transaction, each in a savepoint (one failing op does not undo the others).

    Round trips are what a batch costs here: BEGIN goes with the first
    SAVEPOINT, and each RELEASE with the next SAVEPOINT, in one statement
    string each.
    """
    results: list[tuple[bool, Any]] = []
    conn.raw.execute("BEGIN; SAVEPOINT op")
    try:
        for n, op in enumerate(ops):
            if n:
                conn.raw.execute("RELEASE SAVEPOINT op; SAVEPOINT op")
            try:
                value = op(conn)
            except Exception as exc:  # noqa: BLE001 - handed to that op's caller
                conn.raw.execute("ROLLBACK TO SAVEPOINT op")
                results.append((False, exc))
            else:
                results.append((True, value))
        conn.raw.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def migration_url(url: str) -> str:
    """The SQLAlchemy URL of a postgresql:// database URL (the psycopg 3 driver)."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError(f"not a PostgreSQL URL: {scheme}://")
    return f"postgresql+psycopg://{rest}"


class PostgresStore(SqlStore):
    """Store on a PostgreSQL database; create with `await PostgresStore.open(url)`."""

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        # A PostgreSQL server restarts or drops connections: each thread connects again then.
        self._writer: ConnectionThread[PgConnection] = ConnectionThread("flowport-pg-w", "write", _broken)
        self._readers: list[ConnectionThread[PgConnection]] = [
            ConnectionThread(f"flowport-pg-r{n}", broken=_broken) for n in range(READERS)
        ]
        self._next_reader = itertools.cycle(self._readers)
        self._group = GroupWriter(self._writer, _run_batch)

    @classmethod
    async def open(
        cls, url: str, migrations: list[Migration] | None = None, *, keep_workflows: bool = True
    ) -> PostgresStore:
        """Connect to and migrate the database at `url` (postgresql://user@host:port/db).

        `keep_workflows`: keep workflow rows in memory, coherent with the other processes
        (workflow_cache.py); off only for a store that must not poll (tools, older schemas)."""
        store = cls(url)
        steps = bundled() if migrations is None else migrations
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, migrate, migration_url(url), steps, _shown(url))
        await store._writer.open(lambda: _connect(url), PgConnection.close)
        try:
            await asyncio.gather(*(reader.open(lambda: _connect(url), PgConnection.close) for reader in store._readers))
            # (A store opened on an older schema, in the migration tests, has no changes to poll.)
            if keep_workflows and any(step.name == "workflow_tenant_changes" for step in steps):
                cache = WorkflowCache(os.urandom(8).hex(), store._read)
                await cache.start()
                store._workflow_cache = cache
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._workflow_cache is not None:
            await self._workflow_cache.close()
        await self._group.drain()
        for thread in [*self._readers, self._writer]:
            await thread.close(PgConnection.close)

    async def ping(self) -> None:
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _read(self, op: Callable[[Connection], T]) -> T:
        return await next(self._next_reader).run(op)

    async def _lookup(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._read(lambda conn: conn.execute(sql, args).fetchone())
        return row

    def timings(self) -> list[QueryTiming]:
        return [self._writer.timing, *(reader.timing for reader in self._readers)]


def _shown(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{location}"
