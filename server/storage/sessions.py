"""Session rows."""

from __future__ import annotations

from collections import Counter, OrderedDict

from flowport.server.errors import ResourceExhausted
from flowport.server.storage import idempotency, quotas
from flowport.server.storage.base import Deletion, IdempotentResult
from flowport.server.storage.tables import Connection, Tables, micros
from flowport.v1 import session_pb2

_CREATE = "flowport.v1.SessionService/CreateSession"
_DELETE = "flowport.v1.SessionService/DeleteSession"
# Session owners cached per store: a session's creator never changes, so an entry never goes stale.
OWNERS_CACHED = 65_536
# Who owns a session: its row while it is there, then what its executions and workflows recorded.
_OWNER_QUERIES = (
    "SELECT creator FROM sessions WHERE session_id=? AND tenant=?",
    "SELECT session_creator FROM executions WHERE session_id=? AND tenant=? AND session_creator<>'' LIMIT 1",
    "SELECT session_creator FROM workflows WHERE session_id=? AND tenant=? AND session_creator<>'' LIMIT 1",
)
# Sessions created = rows in `sessions` + `removed` (migrations/v0015_session_counts.py).
_COUNT_REMOVED = (
    "INSERT INTO session_counts (tenant, removed) VALUES (?, ?)"
    " ON CONFLICT (tenant) DO UPDATE SET removed = session_counts.removed + excluded.removed"
)


class SessionTables(Tables):
    """Sessions, scoped by tenant, expiring at `expire_us` (0 once deleted) and removed by the purge."""

    _session_owners: OrderedDict[tuple[str, str], str] | None = None
    _session_sampler: quotas.SessionSampler | None = None

    async def create_session(
        self, tenant: str, session: session_pb2.Session, idempotency_key: tuple[str, bytes] | None
    ) -> IdempotentResult:
        """Store a new session; past the tenant's `--tenant-max-sessions` (as last counted), raise
        ResourceExhausted and write nothing."""
        body = session.SerializeToString()
        now_us = micros(session.create_time)
        sampler = None
        if self.quotas.sessions is not None:
            if self._session_sampler is None:
                self._session_sampler = quotas.SessionSampler()
            sampler = self._session_sampler if self._session_sampler.due(tenant) else None

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
            if sampler is not None:
                quotas.check(conn, self.quotas, tenant, quotas.SESSIONS)
            return IdempotentResult(body, replayed=False)

        try:
            result = await self._write(op)
        except ResourceExhausted:
            if sampler is not None:
                sampler.counted(tenant, over=True)
            raise
        if sampler is not None:
            sampler.counted(tenant, over=False)
        if not result.replayed:
            self._remember_owner(tenant, session.session_id, session.creator)
        return result

    async def session_owner(self, tenant: str, session_id: str) -> str | None:
        """The credential that created the session (expired and deleted ones too; once its row is
        removed, as its executions or workflows recorded it); None when unknown. Cached."""
        key = (tenant, session_id)
        owners = self._owner_cache()
        owner = owners.get(key)
        if owner is not None:
            owners.move_to_end(key)
            return owner
        for sql in _OWNER_QUERIES:
            row = await self._lookup(sql, (session_id, tenant))
            if row is not None:
                self._remember_owner(tenant, session_id, str(row[0]))
                return str(row[0])
        # Not cached: an id nobody has created yet could be created later.
        return None

    def _owner_cache(self) -> OrderedDict[tuple[str, str], str]:
        if self._session_owners is None:
            self._session_owners = OrderedDict()
        return self._session_owners

    def _remember_owner(self, tenant: str, session_id: str, creator: str) -> None:
        owners = self._owner_cache()
        owners[(tenant, session_id)] = creator
        owners.move_to_end((tenant, session_id))
        if len(owners) > OWNERS_CACHED:
            owners.popitem(last=False)

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
        where, args = _listed(tenant, user_id, now_us, creator)
        sql = f"SELECT body FROM sessions WHERE {where}"  # noqa: S608 - fixed fragments
        if after is not None:
            sql += " AND (create_us, session_id) < (?, ?)"
            args.extend(after)
        sql += " ORDER BY create_us DESC, session_id DESC LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [session_pb2.Session.FromString(row[0]) for row in rows]

    async def count_listed_sessions(self, tenant: str, *, user_id: str, now_us: int, creator: str | None = None) -> int:
        where, args = _listed(tenant, user_id, now_us, creator)
        sql = f"SELECT count(*) FROM sessions WHERE {where}"  # noqa: S608 - fixed fragments
        row = await self._read(lambda conn: conn.execute(sql, args).fetchone())
        return int(row[0])

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
            if request_id:
                first = idempotency.replayed(conn, tenant, _DELETE, request_id, key)
                if first is not None:
                    # The owner check comes first: another credential repeating the owner's
                    # request_id is told the session is missing, not that it deleted it.
                    if creator is None or _deleted_owner(conn, tenant, session_id, first) == creator:
                        return Deletion.REPLAYED
                    return Deletion.MISSING
            row = conn.execute(sql + " RETURNING creator", args).fetchone()
            if row is not None and request_id:
                # The owner, for the check above when the session's row is gone.
                idempotency.remember(conn, tenant, _DELETE, (request_id, key), str(row[0]).encode(), now_us=now_us)
            return Deletion.DELETED if row is not None else Deletion.MISSING

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


def session_creator(tenant: str, session_id: str) -> tuple[str, tuple[str, ...]]:
    """SQL for the `session_creator` of a row written in `session_id`: its session's creator, read
    in the same statement (no round trip), or '' outside a session."""
    if not session_id:
        return "''", ()
    return "COALESCE((SELECT creator FROM sessions WHERE session_id=? AND tenant=?), '')", (session_id, tenant)


def _deleted_owner(conn: Connection, tenant: str, session_id: str, recorded: bytes) -> str | None:
    """Whose session a remembered delete removed: recorded with it, else (older records) its row's creator."""
    if recorded:
        return recorded.decode()
    row = conn.execute("SELECT creator FROM sessions WHERE session_id=? AND tenant=?", (session_id, tenant)).fetchone()
    return None if row is None else str(row[0])


def _one(column: str, tenant: str, session_id: str, now_us: int, creator: str | None) -> tuple[str, tuple[object, ...]]:
    """The query for one unexpired session's `column` (a fixed name), only `creator`'s if given."""
    sql = f"SELECT {column} FROM sessions WHERE session_id=? AND tenant=? AND expire_us>?"  # noqa: S608
    if creator is None:
        return sql, (session_id, tenant, now_us)
    return sql + " AND creator=?", (session_id, tenant, now_us, creator)


def _listed(tenant: str, user_id: str, now_us: int, creator: str | None) -> tuple[str, list[object]]:
    """The WHERE clause of list_sessions without its cursor: what its pages hold in all."""
    where, args = "tenant=? AND expire_us>?", list[object]([tenant, now_us])
    if creator is not None:
        where += " AND creator=?"
        args.append(creator)
    if user_id:
        where += " AND user_id=?"
        args.append(user_id)
    return where, args
