"""Session rows."""

from __future__ import annotations

from collections import Counter

from flowport.server.storage import idempotency
from flowport.server.storage.base import Deletion, IdempotentResult
from flowport.server.storage.tables import Connection, Tables, micros
from flowport.v1 import session_pb2

_CREATE = "flowport.v1.SessionService/CreateSession"
_DELETE = "flowport.v1.SessionService/DeleteSession"
# Sessions created = rows in `sessions` + `removed` (migrations/v0015_session_counts.py).
_COUNT_REMOVED = (
    "INSERT INTO session_counts (tenant, removed) VALUES (?, ?)"
    " ON CONFLICT (tenant) DO UPDATE SET removed = session_counts.removed + excluded.removed"
)


class SessionTables(Tables):
    """Sessions, scoped by tenant, expiring at `expire_us` (0 once deleted) and removed by the purge."""

    async def create_session(
        self, tenant: str, session: session_pb2.Session, idempotency_key: tuple[str, bytes] | None
    ) -> IdempotentResult:
        body = session.SerializeToString()
        now_us = micros(session.create_time)

        def op(conn: Connection) -> IdempotentResult:
            if idempotency_key is not None:
                first = idempotency.replayed(conn, tenant, _CREATE, *idempotency_key)
                if first is not None:
                    return IdempotentResult(first, replayed=True)
                idempotency.remember(conn, tenant, _CREATE, idempotency_key, body, now_us=now_us)
            conn.execute(
                "INSERT INTO sessions (tenant, session_id, user_id, create_us, expire_us, body, creator)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    tenant,
                    session.session_id,
                    session.user_id,
                    now_us,
                    micros(session.expire_time),
                    body,
                    session.creator,
                ),
            )
            return IdempotentResult(body, replayed=False)

        return await self._write(op)

    async def get_session(
        self, tenant: str, session_id: str, now_us: int, creator: str | None = None
    ) -> session_pb2.Session | None:
        row = await self._lookup(*_one("body", tenant, session_id, now_us, creator))
        return None if row is None else session_pb2.Session.FromString(row[0])

    async def list_sessions(
        self,
        tenant: str,
        *,
        user_id: str,
        after: tuple[int, str] | None,
        limit: int,
        now_us: int,
        creator: str | None = None,
    ) -> list[session_pb2.Session]:
        sql = "SELECT body FROM sessions WHERE tenant=? AND expire_us>?"
        args: list[object] = [tenant, now_us]
        if creator is not None:
            sql += " AND creator=?"
            args.append(creator)
        if user_id:
            sql += " AND user_id=?"
            args.append(user_id)
        if after is not None:
            sql += " AND (create_us, session_id) < (?, ?)"
            args.extend(after)
        sql += " ORDER BY create_us DESC, session_id DESC LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [session_pb2.Session.FromString(row[0]) for row in rows]

    async def delete_session(
        self, tenant: str, session_id: str, now_us: int, request_id: str = "", creator: str | None = None
    ) -> Deletion:
        key = session_id.encode()
        # Marked expired (0: before any process's clock), not deleted: every read skips it at
        # once, and the purge removes it and counts it (count_sessions_created).
        sql = "UPDATE sessions SET expire_us=0 WHERE session_id=? AND tenant=? AND expire_us>?"
        args: tuple[object, ...] = (session_id, tenant, now_us)
        if creator is not None:
            sql, args = sql + " AND creator=?", (*args, creator)

        def op(conn: Connection) -> Deletion:
            if request_id and idempotency.replayed(conn, tenant, _DELETE, request_id, key) is not None:
                return Deletion.REPLAYED
            deleted = conn.execute(sql, args).rowcount
            if deleted and request_id:
                idempotency.remember(conn, tenant, _DELETE, (request_id, key), b"", now_us=now_us)
            return Deletion.DELETED if deleted else Deletion.MISSING

        return await self._write(op)

    async def session_exists(self, tenant: str, session_id: str, now_us: int, creator: str | None = None) -> bool:
        return await self._lookup(*_one("1", tenant, session_id, now_us, creator)) is not None

    async def count_active_sessions(self, now_us: int) -> int:
        row = await self._read(
            lambda conn: conn.execute("SELECT count(*) FROM sessions WHERE expire_us>?", (now_us,)).fetchone()
        )
        return int(row[0])

    async def purge_expired(self, now_us: int, idempotency_before_us: int) -> int:
        def op(conn: Connection) -> int:
            # RETURNING: a row another process purges at the same time is counted once, by the one that deleted it.
            gone = conn.execute("DELETE FROM sessions WHERE expire_us<=? RETURNING tenant", (now_us,)).fetchall()
            by_tenant = Counter(str(row[0]) for row in gone)
            # In tenant order, so that purges in several processes never wait on each other in a cycle.
            if by_tenant:
                conn.executemany(_COUNT_REMOVED, sorted(by_tenant.items()))
            removed = len(gone)
            removed += conn.execute("DELETE FROM idempotency WHERE create_us<?", (idempotency_before_us,)).rowcount
            return removed

        return await self._write(op)


def _one(column: str, tenant: str, session_id: str, now_us: int, creator: str | None) -> tuple[str, tuple[object, ...]]:
    """The query for one unexpired session's `column` (a fixed name), only `creator`'s if given."""
    sql = f"SELECT {column} FROM sessions WHERE session_id=? AND tenant=? AND expire_us>?"  # noqa: S608
    if creator is None:
        return sql, (session_id, tenant, now_us)
    return sql + " AND creator=?", (session_id, tenant, now_us, creator)
