"""Audit log rows: inserted and read, never updated or deleted.

There is deliberately no update or delete method here, and the table's
triggers refuse both, so the log stays append-only.
"""

from __future__ import annotations

from dataclasses import dataclass

from flowport.server.storage.tables import Connection, Tables, micros
from flowport.v1 import audit_pb2

_INSERT = "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class AuditQuery:
    """Filters of a listing; empty strings and None mean "any"."""

    tenant: str = ""
    """The caller's or the resource's tenant."""
    action: str = ""
    """An exact action, or a family as a prefix ending in "." (e.g. "api_key.")."""
    subject: str = ""
    code: str = ""
    start_us: int | None = None
    """Inclusive lower bound on the time."""
    end_us: int | None = None
    """Exclusive upper bound on the time."""
    subject_tenant: str = ""
    """With `subject`: only entries whose caller is of this tenant (a tenant admin cannot see the
    callers of other tenants, so it must not find them by subject either)."""


def _row(event: audit_pb2.AuditEvent) -> tuple[object, ...]:
    return (
        event.audit_event_id,
        micros(event.time),
        event.action,
        event.code,
        event.tenant,
        event.resource_tenant,
        event.subject,
        event.SerializeToString(),
    )


def _barrier(conn: Connection) -> None:
    """A write that does nothing: it commits after every write queued before it."""


class AuditTables(Tables):
    """The audit log."""

    def append_audit_soon(self, event: audit_pb2.AuditEvent) -> None:
        """Queue `event` with the next group commit, without waiting.

        A failed write is logged by the store, never raised: recording must
        not fail or slow the call being recorded.
        """
        row = _row(event)
        self._write_soon(lambda conn: conn.execute(_INSERT, row))

    async def append_audit(self, event: audit_pb2.AuditEvent) -> None:
        """Insert `event` and wait until it is committed (for short-lived callers)."""
        row = _row(event)

        def op(conn: Connection) -> None:
            conn.execute(_INSERT, row)

        await self._write(op)

    async def list_audit_events(
        self, query: AuditQuery, *, after: tuple[int, str] | None, limit: int
    ) -> list[audit_pb2.AuditEvent]:
        """Entries newest first, strictly after the (time_us, audit_id) cursor.

        Entries queued before the call are committed first, so a caller
        sees everything recorded up to the moment it asked.
        """
        await self._write(_barrier)
        sql = "SELECT body FROM audit_log WHERE 1=1"
        args: list[object] = []
        if query.tenant:
            sql += " AND (tenant=? OR resource_tenant=?)"
            args += [query.tenant, query.tenant]
        if query.action.endswith("."):
            # A family: compare the prefix, so no LIKE wildcard in a name matters.
            sql += " AND substr(action, 1, ?)=?"
            args += [len(query.action), query.action]
        elif query.action:
            sql += " AND action=?"
            args.append(query.action)
        if query.subject:
            sql += " AND subject=?"
            args.append(query.subject)
            if query.subject_tenant:
                sql += " AND tenant=?"
                args.append(query.subject_tenant)
        if query.code:
            sql += " AND code=?"
            args.append(query.code)
        if query.start_us is not None:
            sql += " AND time_us>=?"
            args.append(query.start_us)
        if query.end_us is not None:
            sql += " AND time_us<?"
            args.append(query.end_us)
        if after is not None:
            sql += " AND (time_us, audit_id) < (?, ?)"
            args += list(after)
        sql += " ORDER BY time_us DESC, audit_id DESC LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [audit_pb2.AuditEvent.FromString(r[0]) for r in rows]
