"""Group commit: writes queued while a transaction runs share the next one.

Database drivers block, so each connection lives on its own thread
(`ConnectionThread`). `GroupWriter` queues write operations and runs every
operation queued meanwhile in one transaction (the engine's `run_batch`),
each in its own SAVEPOINT so one failing write never takes the others in
its batch down with it. Many executions finishing together cost one commit,
not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from flowport.server.errors import Unavailable

T = TypeVar("T")
C = TypeVar("C")
log = logging.getLogger(__name__)
# One batch: the results of its operations, (True, value) or (False, exception).
BatchRunner = Callable[[C, list[Callable[[C], Any]]], list[tuple[bool, Any]]]


class QueryTiming:
    """How busy one connection is: operations run, their time, whether one is running now.

    Updated on the connection's own thread (one writer per instance), read
    by GetStats; `observe` also reports each operation's time (Prometheus).
    """

    def __init__(self, operation: str) -> None:
        self.operation = operation
        self.count = 0
        self.seconds = 0.0
        self.active = 0
        self.observe: Callable[[float], None] | None = None

    def done(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        if self.observe is not None:
            self.observe(seconds)


# Seconds after a failed connect during which operations fail at once instead of trying again.
RECONNECT_PAUSE = 1.0


class StoreUnavailable(Unavailable):
    """The database cannot be reached (its server restarting, the network down): the call may
    succeed when retried, once the connection is made again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="STORE_UNAVAILABLE", retry_delay=1.0)


class ConnectionThread(Generic[C]):
    """A connection confined to one thread.

    With `broken` (a database server the connection can lose), a connection found broken is
    made again before the next operation, and an operation that failed because the connection
    broke fails with StoreUnavailable: the process recovers when the server does, without a
    restart. A read that failed so runs once more on a new connection; a write does not (its
    outcome is unknown).
    """

    def __init__(self, name: str, operation: str = "read", broken: Callable[[C], bool] | None = None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.conn: C | None = None
        self.timing = QueryTiming(operation)
        self._broken = broken
        self._opener: Callable[[], C] | None = None
        self._closer: Callable[[C], object] | None = None
        self._refused_until = 0.0  # after a failed connect, operations fail at once until then

    async def run(self, fn: Callable[[C], T]) -> T:
        timing = self.timing

        def call() -> T:
            # A read runs once more on a new connection if the one it had was found broken (a
            # server restarted while it was idle); a write is not run again: it may have committed.
            for attempt in (1, 2) if timing.operation == "read" else (1,):
                conn = self._usable()
                timing.active += 1
                started = time.perf_counter()
                try:
                    return fn(conn)
                except Exception as exc:
                    if self._broken is None or not self._broken(conn):
                        raise
                    if attempt == 2 or timing.operation != "read":
                        raise StoreUnavailable(f"the database connection was lost: {type(exc).__name__}") from exc
                finally:
                    timing.active -= 1
                    timing.done(time.perf_counter() - started)
            raise AssertionError("unreachable")

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _usable(self) -> C:
        """The connection, made again first if it broke (on this thread)."""
        assert self._opener is not None, "store is closed"
        conn = self.conn
        if conn is not None and (self._broken is None or not self._broken(conn)):
            return conn
        if conn is not None and self._closer is not None:
            with contextlib.suppress(Exception):
                self._closer(conn)
        self.conn = None
        if time.monotonic() < self._refused_until:
            # Each queued operation would try (and wait) on its own: one try a RECONNECT_PAUSE.
            raise StoreUnavailable("cannot connect to the database (tried a moment ago)")
        try:
            self.conn = self._opener()
        except Exception as exc:
            self._refused_until = time.monotonic() + RECONNECT_PAUSE
            raise StoreUnavailable(f"cannot connect to the database: {type(exc).__name__}") from exc
        log.warning("connected to the database again (%s)", self.timing.operation)
        return self.conn

    async def open(self, opener: Callable[[], C], closer: Callable[[C], object] | None = None) -> None:
        def set_conn() -> None:
            self.conn = opener()
            self._opener, self._closer = opener, closer

        await asyncio.get_running_loop().run_in_executor(self._executor, set_conn)

    async def close(self, closer: Callable[[C], object]) -> None:
        def close_conn() -> None:
            self._opener = None
            if self.conn is not None:
                closer(self.conn)
                self.conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close_conn)
        self._executor.shutdown(wait=True)


def commit_unless_one_fails(
    conn: C, ops: list[Callable[[C], Any]], execute: Callable[[str], object], isolated: BatchRunner[C]
) -> list[tuple[bool, Any]]:
    """Run `ops` in the transaction just begun, without savepoints, and commit.

    A savepoint costs a statement on each side of every op (a round trip
    each on PostgreSQL), and ops almost never fail. When one does raise, the
    transaction is rolled back and the batch runs again through `isolated`,
    each op in its own savepoint: the others still commit and the failing
    op's caller gets its exception. An op only reads and writes the
    database, so running it a second time after a rollback is safe.
    """
    try:
        values = [op(conn) for op in ops]
    except Exception:  # noqa: BLE001 - which op failed, and why, is for `isolated` to find out
        execute("ROLLBACK")
        return isolated(conn, ops)
    execute("COMMIT")
    return [(True, value) for value in values]


def log_unretrieved(future: asyncio.Future[Any]) -> None:
    """Done-callback of a write nobody awaits: its failure is logged here."""
    if not future.cancelled() and future.exception() is not None:
        log.error("a queued write failed: %s", future.exception())


class GroupWriter(Generic[C]):
    """Queues write operations and commits each batch in one transaction."""

    def __init__(self, thread: ConnectionThread[C], run_batch: BatchRunner[C]) -> None:
        self._thread = thread
        self._run_batch = run_batch
        self._pending: list[tuple[Callable[[C], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        self.writes = 0

    def enqueue(self, op: Callable[[C], T]) -> asyncio.Future[T]:
        """Queue `op`; the future resolves once its batch is committed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._flusher is None:
            # Its own context: a batch holds many callers' writes, not the first one's.
            self._flusher = asyncio.create_task(self._flush(), context=contextvars.Context())
        return future

    async def submit(self, op: Callable[[C], T]) -> T:
        return await self.enqueue(op)

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self.batches += 1
                self.writes += len(batch)
                ops = [op for op, _ in batch]
                try:
                    results = await self._thread.run(lambda conn, ops=ops: self._run_batch(conn, ops))  # type: ignore[misc]
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
