"""Counts GetStats reads from the store: what exists now, whichever process made it.

Each is one aggregate query, scoped to a tenant or to all of them (None);
GetStats is called by dashboards every few seconds, not per request. The
same query asked again while it runs, or soon after, is not run again
(shared_reads.py): callers hammering the figures of one tenant keep a reader
busy at most about a tenth of the time.
"""

from __future__ import annotations

import functools

from flowport.server.storage.shared_reads import SharedReads
from flowport.server.storage.tables import Tables
from flowport.v1 import execution_pb2, webhook_pb2

_STATE_NAMES: dict[int, str] = {
    execution_pb2.Execution.STATE_PENDING: "pending",
    execution_pb2.Execution.STATE_RUNNING: "running",
    execution_pb2.Execution.STATE_SUCCEEDED: "succeeded",
    execution_pb2.Execution.STATE_FAILED: "failed",
    execution_pb2.Execution.STATE_CANCELLED: "cancelled",
}


def _scope(tenant: str | None) -> tuple[str, tuple[object, ...]]:
    return ("tenant=?", (tenant,)) if tenant is not None else ("1=1", ())


class StatsTables(Tables):
    """Aggregates over sessions, executions and webhook deliveries."""

    async def count_sessions(self, tenant: str | None, now_us: int) -> int:
        """Sessions of `tenant` (or all) that have not expired."""
        where, args = _scope(tenant)
        sql = f"SELECT count(*) FROM sessions WHERE {where} AND expire_us>?"  # noqa: S608 - fixed fragments
        # Shared whatever `now_us`: a caller may get the count of a moment before its own call.
        return await self._scalar(sql, (*args, now_us), shared_as=args)

    async def count_sessions_created(self, tenant: str | None) -> int:
        """Sessions `tenant` (or every tenant) ever created, by any process: the rows still kept
        (live, expired or deleted, until the purge) plus what the purge has removed."""
        where, args = _scope(tenant)
        sql = (
            f"SELECT (SELECT count(*) FROM sessions WHERE {where})"  # noqa: S608 - fixed fragments
            f" + COALESCE((SELECT sum(removed) FROM session_counts WHERE {where}), 0)"
        )
        # One statement: one snapshot, so a purge moving rows into `removed` never counts them twice or not at all.
        return await self._scalar(sql, (*args, *args))

    @functools.cached_property
    def _shared_reads(self) -> SharedReads:
        return SharedReads()

    async def executions_by_state(self, tenant: str | None) -> dict[str, int]:
        """Executions of `tenant` (or all) by state name; every state present, zeros included."""
        where, args = _scope(tenant)
        sql = f"SELECT state, count(*) FROM executions WHERE {where} GROUP BY state"  # noqa: S608 - fixed fragments
        rows = await self._shared_reads.read(
            (sql, args), lambda: self._read(lambda conn: conn.execute(sql, args).fetchall())
        )
        counts = dict.fromkeys(_STATE_NAMES.values(), 0)
        for state, count in rows:
            name = _STATE_NAMES.get(int(state))
            if name is not None:
                counts[name] = int(count)
        return counts

    async def deliveries_retrying(self, tenant: str | None) -> int:
        """Webhook deliveries of `tenant` (or all) waiting for another attempt after a failed one."""
        where, args = _scope(tenant)
        sql = f"SELECT count(*) FROM webhook_deliveries WHERE {where} AND state=?"  # noqa: S608 - fixed fragments
        return await self._scalar(sql, (*args, webhook_pb2.WebhookDelivery.STATE_RETRYING))

    async def count_workflows(self, tenant: str | None) -> int:
        """Workflows of `tenant` (or all) that are not deleted, each counted once whatever its versions."""
        where, args = _scope(tenant)
        sql = (
            "SELECT count(*) FROM (SELECT DISTINCT tenant, workflow_id FROM workflows"  # noqa: S608 - fixed fragments
            f" WHERE {where} AND deleted_us IS NULL) AS live"
        )
        return await self._scalar(sql, args)

    async def count_events(self, tenant: str | None) -> int:
        """Events of `tenant` (or all) kept in the log."""
        return await self._count_rows("events", tenant)

    async def count_request_ids(self, tenant: str | None) -> int:
        """Request ids of `tenant` (or all) remembered with their first answer, until the purge."""
        return await self._count_rows("idempotency", tenant)

    async def _count_rows(self, table: str, tenant: str | None) -> int:
        where, args = _scope(tenant)
        return await self._scalar(f"SELECT count(*) FROM {table} WHERE {where}", args)  # noqa: S608 - fixed names

    async def _scalar(self, sql: str, args: tuple[object, ...], shared_as: tuple[object, ...] | None = None) -> int:
        """The one number `sql` selects; shared with callers asking the same meanwhile (`shared_as`:
        what makes two asks the same, when not every argument must match)."""
        key = (sql, args if shared_as is None else shared_as)
        row = await self._shared_reads.read(key, lambda: self._read(lambda conn: conn.execute(sql, args).fetchone()))
        return int(row[0])
