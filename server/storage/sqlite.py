"""The embedded store: one SQLite file in WAL mode, with group commit.

SQLite calls block, so each connection lives on its own thread: one writer
(SQLite allows one writer at a time anyway) and one reader, which WAL lets
run beside the writer. Writes are queued and every write queued while the
previous transaction ran is committed in the next one (group commit): many
executions finishing together cost one fsync-free WAL commit, not one each.
Each write runs in its own SAVEPOINT, so one failing write never takes the
others in its batch down with it (group_commit.commit_unless_one_fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from flowport.server.storage.group_commit import ConnectionThread, GroupWriter, QueryTiming, commit_unless_one_fails
from flowport.server.storage.migrate import Migration, bundled, migrate
from flowport.server.storage.sql_store import SqlStore
from flowport.server.storage.tables import Connection

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    conn.execute("PRAGMA busy_timeout = 5000")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a commit survives a process crash; only an OS crash
        # can lose the last transactions, never corrupt the file.
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _run_batch(conn: sqlite3.Connection, ops: list[Op]) -> list[tuple[bool, Any]]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        return commit_unless_one_fails(conn, ops, conn.execute, _run_isolated)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _run_isolated(conn: sqlite3.Connection, ops: list[Op]) -> list[tuple[bool, Any]]:
    """The batch again, each op in its own SAVEPOINT, after one of them failed."""
    results: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for op in ops:
            conn.execute("SAVEPOINT op")
            try:
                value = op(conn)
            except Exception as exc:  # noqa: BLE001 - handed to that op's caller
                conn.execute("ROLLBACK TO op")
                results.append((False, exc))
            else:
                results.append((True, value))
            conn.execute("RELEASE op")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


class SqliteStore(SqlStore):
    """Store on a SQLite file; create with `await SqliteStore.open(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: ConnectionThread[sqlite3.Connection] = ConnectionThread("flowport-sqlite-w", "write")
        self._reader: ConnectionThread[sqlite3.Connection] = ConnectionThread("flowport-sqlite-r")
        self._group = GroupWriter(self._writer, _run_batch)
        self._inline: sqlite3.Connection | None = None
        # The connection of primary-key reads on the calling thread (`_lookup`).
        self._inline_timing = QueryTiming("read")

    @classmethod
    async def open(cls, path: Path, migrations: list[Migration] | None = None) -> SqliteStore:
        """Open (creating if needed) and migrate the database at `path`."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 here, not by SQLite (0644 less the umask): its -wal and
        # -shm files take the database file's mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        store = cls(path)
        steps = bundled() if migrations is None else migrations
        # Migrated through SQLAlchemy (Alembic's operations), before the
        # store's own connections open.
        await asyncio.get_running_loop().run_in_executor(None, migrate, f"sqlite:///{path}", steps, str(path))
        await store._writer.open(lambda: _connect(path, readonly=False))
        await store._reader.open(lambda: _connect(path, readonly=True))
        store._inline = _connect(path, readonly=True)
        return store

    async def close(self) -> None:
        await self._group.drain()
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        await self._reader.close(sqlite3.Connection.close)
        await self._writer.close(sqlite3.Connection.close)

    async def ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _read(self, op: Callable[[Connection], T]) -> T:
        return await self._reader.run(op)

    async def _lookup(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        # On the calling thread: a primary-key read in WAL mode takes
        # microseconds and never waits for the writer, less than a hop to a
        # thread and back costs.
        assert self._inline is not None, "store is closed"
        started = time.perf_counter()
        row: tuple[Any, ...] | None = self._inline.execute(sql, args).fetchone()
        self._inline_timing.done(time.perf_counter() - started)
        return row

    def timings(self) -> list[QueryTiming]:
        return [self._writer.timing, self._reader.timing, self._inline_timing]
