"""The embedded store: one SQLite file in WAL mode, with group commit.

SQLite calls block, so each connection lives on its own thread: one writer
(SQLite allows one writer at a time anyway) and one reader, which WAL lets
run beside the writer. Writes are queued and every write queued while the
previous transaction ran is committed in the next one (group commit): many
executions finishing together cost one fsync-free WAL commit, not one each.
Each write runs in its own SAVEPOINT, so one failing write never takes the
others in its batch down with it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from flowport.server.storage.api_keys import ApiKeyTables
from flowport.server.storage.audit import AuditTables
from flowport.server.storage.events import EventTables
from flowport.server.storage.executions import ExecutionTables
from flowport.server.storage.migrate import Migration, bundled, migrate
from flowport.server.storage.secrets import SecretTables
from flowport.server.storage.sessions import SessionTables
from flowport.server.storage.webhooks import WebhookTables
from flowport.server.storage.workflows import WorkflowTables

T = TypeVar("T")
log = logging.getLogger(__name__)
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


class _Thread:
    """A connection confined to one thread."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self.conn is not None, "store is closed"
            return fn(self.conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self, opener: Callable[[], sqlite3.Connection]) -> None:
        def set_conn() -> None:
            self.conn = opener()

        await asyncio.get_running_loop().run_in_executor(self._executor, set_conn)

    async def close(self) -> None:
        def close_conn() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close_conn)
        self._executor.shutdown(wait=True)


def _run_batch(conn: sqlite3.Connection, ops: list[Op]) -> list[tuple[bool, Any]]:
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


def _log_unretrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("a queued write failed: %s", future.exception())


class _GroupWriter:
    """Queues write operations and commits each batch in one transaction."""

    def __init__(self, thread: _Thread) -> None:
        self._thread = thread
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        self.writes = 0

    def enqueue(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `op`; the future resolves once its batch is committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return future

    async def submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self.enqueue(op)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self.batches += 1
                self.writes += len(batch)
                try:
                    ops = [op for op, _ in batch]
                    results = await self._thread.run(lambda conn, ops=ops: _run_batch(conn, ops))  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - the commit failed: every write in it failed
                    results = [(False, exc)] * len(batch)
                for (_, future), (ok, value) in zip(batch, results, strict=True):
                    if future.done():  # the caller was cancelled; the write stands
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
        finally:
            self._flusher = None

    async def drain(self) -> None:
        """Wait until every queued write is committed."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)


class SqliteStore(
    SessionTables,
    WorkflowTables,
    ExecutionTables,
    EventTables,
    WebhookTables,
    ApiKeyTables,
    AuditTables,
    SecretTables,
):
    """Store on a SQLite file; create with `await SqliteStore.open(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = _Thread("flowport-sqlite-w")
        self._reader = _Thread("flowport-sqlite-r")
        self._group = _GroupWriter(self._writer)
        self._inline: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, migrations: list[Migration] | None = None) -> SqliteStore:
        """Open (creating if needed) and migrate the database at `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
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
        await self._reader.close()
        await self._writer.close()

    async def ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self._group.submit(op)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self._reader.run(op)

    def _lookup(self, sql: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        assert self._inline is not None, "store is closed"
        row: tuple[Any, ...] | None = self._inline.execute(sql, args).fetchone()
        return row

    def _write_soon(self, op: Callable[[sqlite3.Connection], object]) -> None:
        # Nobody awaits a queued write, so its failure is logged here.
        self._group.enqueue(op).add_done_callback(_log_unretrieved)

    @property
    def write_batches(self) -> tuple[int, int]:
        """(transactions committed, writes in them) since open: the group-commit ratio."""
        return self._group.batches, self._group.writes
