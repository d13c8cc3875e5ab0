"""The embedded store: one SQLite file in WAL mode.

SQLite calls block, so each connection lives on its own thread: one writer
(SQLite allows one writer at a time anyway) and one reader, which WAL lets
run beside the writer. A store method is one hop to that thread, and a
multi-statement write is one function there, so transactions never
interleave.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from flowport.server.storage.base import IdempotencyConflict, IdempotentResult
from flowport.server.storage.migrate import Migration, bundled, migrate
from flowport.v1 import session_pb2

T = TypeVar("T")
_CREATE_SESSION = "flowport.v1.SessionService/CreateSession"
_DELETE_SESSION = "flowport.v1.SessionService/DeleteSession"


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
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


class SqliteStore:
    """Store on a SQLite file; create with `await SqliteStore.open(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = _Thread("flowport-sqlite-w")
        self._reader = _Thread("flowport-sqlite-r")

    @classmethod
    async def open(cls, path: Path, migrations: list[Migration] | None = None) -> SqliteStore:
        """Open (creating if needed) and migrate the database at `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path)
        steps = bundled() if migrations is None else migrations
        await store._writer.open(lambda: _connect(path, readonly=False))
        try:
            await store._writer.run(lambda conn: migrate(conn, steps, path))
        except BaseException:
            await store._writer.close()
            raise
        await store._reader.open(lambda: _connect(path, readonly=True))
        return store

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    async def ping(self) -> None:
        await self._reader.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def create_session(
        self, tenant: str, session: session_pb2.Session, idempotency: tuple[str, bytes] | None
    ) -> IdempotentResult:
        body = session.SerializeToString()

        def tx(conn: sqlite3.Connection) -> IdempotentResult:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if idempotency is not None:
                    request_id, request_hash = idempotency
                    row = conn.execute(
                        "SELECT request_hash, response FROM idempotency WHERE tenant=? AND method=? AND request_id=?",
                        (tenant, _CREATE_SESSION, request_id),
                    ).fetchone()
                    if row is not None:
                        conn.execute("COMMIT")
                        if row[0] != request_hash:
                            raise IdempotencyConflict(request_id)
                        return IdempotentResult(row[1], replayed=True)
                    conn.execute(
                        "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?)",
                        (tenant, _CREATE_SESSION, request_id, request_hash, body, _us(session.create_time)),
                    )
                conn.execute(
                    "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        tenant,
                        session.session_id,
                        session.user_id,
                        _us(session.create_time),
                        _us(session.expire_time),
                        body,
                    ),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return IdempotentResult(body, replayed=False)

        return await self._writer.run(tx)

    async def get_session(self, tenant: str, session_id: str, now_us: int) -> session_pb2.Session | None:
        row = await self._reader.run(
            lambda conn: conn.execute(
                "SELECT body FROM sessions WHERE session_id=? AND tenant=? AND expire_us>?",
                (session_id, tenant, now_us),
            ).fetchone()
        )
        return None if row is None else session_pb2.Session.FromString(row[0])

    async def list_sessions(
        self, tenant: str, *, user_id: str, after: tuple[int, str] | None, limit: int, now_us: int
    ) -> list[session_pb2.Session]:
        sql = "SELECT body FROM sessions WHERE tenant=? AND expire_us>?"
        args: list[object] = [tenant, now_us]
        if user_id:
            sql += " AND user_id=?"
            args.append(user_id)
        if after is not None:
            sql += " AND (create_us, session_id) < (?, ?)"
            args.extend(after)
        sql += " ORDER BY create_us DESC, session_id DESC LIMIT ?"
        args.append(limit)
        rows = await self._reader.run(lambda conn: conn.execute(sql, args).fetchall())
        return [session_pb2.Session.FromString(row[0]) for row in rows]

    async def delete_session(self, tenant: str, session_id: str, now_us: int, request_id: str = "") -> bool:
        key = session_id.encode()

        def tx(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if request_id:
                    row = conn.execute(
                        "SELECT request_hash FROM idempotency WHERE tenant=? AND method=? AND request_id=?",
                        (tenant, _DELETE_SESSION, request_id),
                    ).fetchone()
                    if row is not None:
                        conn.execute("COMMIT")
                        if row[0] != key:
                            raise IdempotencyConflict(request_id)
                        return True
                deleted = conn.execute(
                    "DELETE FROM sessions WHERE session_id=? AND tenant=? AND expire_us>?", (session_id, tenant, now_us)
                ).rowcount
                if deleted and request_id:
                    conn.execute(
                        "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?)",
                        (tenant, _DELETE_SESSION, request_id, key, b"", now_us),
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return deleted > 0

        return await self._writer.run(tx)

    async def count_active_sessions(self, now_us: int) -> int:
        row = await self._reader.run(
            lambda conn: conn.execute("SELECT count(*) FROM sessions WHERE expire_us>?", (now_us,)).fetchone()
        )
        return int(row[0])

    async def purge_expired(self, now_us: int, idempotency_before_us: int) -> int:
        def tx(conn: sqlite3.Connection) -> int:
            removed = conn.execute("DELETE FROM sessions WHERE expire_us<=?", (now_us,)).rowcount
            removed += conn.execute("DELETE FROM idempotency WHERE create_us<?", (idempotency_before_us,)).rowcount
            return removed

        return await self._writer.run(tx)


def _us(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000
