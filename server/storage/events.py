"""Event log rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from flowport.server.events.bus import BusEvent
from flowport.server.storage.tables import Connection, Tables

_INSERT = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
# Events written again (a write that committed though its caller saw the connection fail): one
# already there is left as it is, since ids are given once and the row is the same event. Only
# then: on PostgreSQL, ON CONFLICT makes every row of a batch cost more.
_AGAIN = " ON CONFLICT (id) DO NOTHING"
# PostgreSQL takes a batch as one statement with one JSON parameter, which it
# takes apart itself: psycopg's executemany sends a statement per row
# (pipelined), and its per-row work, or the adapting of one array per column,
# was most of a server's CPU per execution on PostgreSQL.
_INSERT_JSON = (
    "INSERT INTO events SELECT (r->>0)::bigint, r->>1, r->>2, (r->>3)::bigint, r->>4, r->>5, r->>6,"
    " convert_to(r->>7, 'UTF8') FROM json_array_elements(?::json) AS r"
)


def _row(event: BusEvent) -> tuple[Any, ...]:
    return (
        int(event.id),
        event.tenant,
        event.type,
        event.time_ns // 1000,
        event.session_id,
        event.workflow_id,
        event.execution_id,
        orjson.dumps(event.data or {}),
    )


class EventTables(Tables):
    """The append-only event log."""

    async def append_events(self, events: Sequence[BusEvent], *, again: bool = False) -> None:
        """Append events (ids already assigned) and wait for the commit. `again`: some may be
        there already (written before by a write whose outcome was unknown)."""
        await self._write(self._appending(events, again))

    def append_events_soon(
        self,
        events: Sequence[BusEvent],
        done: Callable[[BaseException | None], None] | None = None,
        *,
        again: bool = False,
    ) -> None:
        """Queue an append; it commits in order with the writes around it. `done` hears how it
        went (None: committed); `again` as for append_events."""
        self._write_soon(self._appending(events, again), done)

    def _appending(self, events: Sequence[BusEvent], again: bool) -> Callable[[Connection], object]:
        rows = [_row(e) for e in events]
        if not rows:
            return lambda conn: None
        if self.dialect == "postgresql":
            # Each row's data is JSON already (orjson's UTF-8), carried as a string.
            batch = orjson.dumps([(*row[:7], row[7].decode()) for row in rows]).decode()
            sql = _INSERT_JSON + _AGAIN if again else _INSERT_JSON
            return lambda conn: conn.execute(sql, (batch,))
        insert = _INSERT + _AGAIN if again else _INSERT
        return lambda conn: conn.executemany(insert, rows)

    async def reserve_event_ids(self, block: int) -> tuple[int, int]:
        """Reserve the next `block` ids durably; returns (last id used before, reserved until)."""

        def op(conn: Connection) -> tuple[int, int]:
            (reserved,) = conn.execute("SELECT reserved_until FROM event_id_reservation WHERE id=1").fetchone()
            (newest,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
            start = max(int(reserved), int(newest))
            conn.execute("UPDATE event_id_reservation SET reserved_until=? WHERE id=1", (start + block,))
            return start, start + block

        return await self._write(op)

    def extend_event_ids_soon(self, until: int) -> None:
        """Queue raising the reservation to `until` (committed in order with other writes)."""
        greatest = self._greatest()  # a fixed function name, not input
        sql = f"UPDATE event_id_reservation SET reserved_until={greatest}(reserved_until, ?) WHERE id=1"  # noqa: S608
        self._write_soon(lambda conn: conn.execute(sql, (until,)))

    async def event_bounds(self, tenant: str) -> tuple[int, int]:
        """(purged through, newest): the highest id of `tenant`'s that retention ever dropped (0: none)
        and the newest id in the log (0 when it is empty). Every event of `tenant` with an id above
        the first is still in the log."""
        row = await self._lookup(
            "SELECT purged_through, COALESCE((SELECT purged_through FROM event_purge_marks WHERE tenant=?), 0),"
            " (SELECT COALESCE(MAX(id), 0) FROM events) FROM event_id_reservation WHERE id=1",
            (tenant,),
        )
        assert row is not None
        # The global mark: what retention dropped before it went per tenant, for every tenant.
        return max(int(row[0]), int(row[1])), int(row[2])

    async def read_events(
        self,
        tenant: str,
        *,
        after: int,
        limit: int,
        session_id: str = "",
        workflow_id: str = "",
        execution_id: str = "",
    ) -> list[BusEvent]:
        """A tenant's events with id > `after`, oldest first, filtered by the ids given."""
        return await self._select_events(
            "id>? ORDER BY id",
            tenant,
            after,
            limit,
            session_id=session_id,
            workflow_id=workflow_id,
            execution_id=execution_id,
        )

    async def read_recent_events(
        self,
        tenant: str,
        *,
        before: int | None,
        limit: int,
        session_id: str = "",
        workflow_id: str = "",
        execution_id: str = "",
    ) -> list[BusEvent]:
        """A tenant's events with id < `before` (None: any), newest first, filtered by the ids given."""
        return await self._select_events(
            "id<? ORDER BY id DESC",
            tenant,
            2**63 - 1 if before is None else before,
            limit,
            session_id=session_id,
            workflow_id=workflow_id,
            execution_id=execution_id,
        )

    async def _select_events(
        self, order: str, tenant: str, bound: int, limit: int, *, session_id: str, workflow_id: str, execution_id: str
    ) -> list[BusEvent]:
        """Events of `tenant` filtered by the ids given, then `order` ("id>? ORDER BY id"...) against `bound`."""
        sql = "SELECT * FROM events WHERE tenant=?"
        args: list[object] = [tenant]
        for column, value in (("session_id", session_id), ("workflow_id", workflow_id), ("execution_id", execution_id)):
            if value:
                sql += f" AND {column}=?"
                args.append(value)
        sql += f" AND {order} LIMIT ?"
        args.extend((bound, limit))
        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        return [
            BusEvent(str(r[0]), r[2], r[3] * 1000, r[1], r[4], r[5], r[6], orjson.loads(r[7]) or None) for r in rows
        ]

    async def purge_events(self, *, keep_count: int, keep_after_us: int) -> int:
        """Drop all but the newest `keep_count` events of each tenant, and every event older than
        `keep_after_us`; returns how many. The highest id dropped of each tenant is remembered
        (`event_bounds`)."""
        # Counted in rows, never from ids: ids skip ahead at every restart. Read outside the
        # write: later appends only add newer events. The tenants are found by a skip scan of
        # the (tenant, id) index, one lookup per tenant, not a walk over every event.
        beyond = await self._read(lambda conn: _beyond_count(conn, keep_count))
        greatest = self._greatest()  # a fixed function name, not input
        mark = (
            "INSERT INTO event_purge_marks (tenant, purged_through) VALUES (?, ?) ON CONFLICT (tenant) DO UPDATE"  # noqa: S608
            f" SET purged_through={greatest}(event_purge_marks.purged_through, excluded.purged_through)"
        )

        # Through the time index, over the old rows only: SQLite would otherwise walk the tenant index
        # whole for its GROUP BY.
        hint = " INDEXED BY events_by_time" if self.dialect == "sqlite" else ""
        aged_sql = f"SELECT tenant, MAX(id) FROM events{hint} WHERE time_us<? GROUP BY tenant"  # noqa: S608 - fixed

        def op(conn: Connection) -> int:
            highest = dict(beyond)
            aged = conn.execute(aged_sql, (keep_after_us,)).fetchall()
            for tenant, newest_aged in aged:
                highest[tenant] = max(highest.get(tenant, 0), int(newest_aged))
            removed = 0
            if aged:
                removed += conn.execute("DELETE FROM events WHERE time_us<?", (keep_after_us,)).rowcount
            for tenant, through in beyond.items():
                removed += conn.execute("DELETE FROM events WHERE tenant=? AND id<=?", (tenant, through)).rowcount
            # In tenant order, so that purges in several processes never wait on each other in a cycle.
            if highest:
                conn.executemany(mark, sorted(highest.items()))
            return removed

        return await self._write(op)


# The tenants of the log, by a skip scan of events_by_tenant: one index lookup per tenant.
_TENANTS = (
    "WITH RECURSIVE t(tenant) AS (SELECT MIN(tenant) FROM events"
    " UNION ALL SELECT (SELECT MIN(tenant) FROM events WHERE tenant>t.tenant) FROM t WHERE t.tenant IS NOT NULL)"
    " SELECT tenant FROM t WHERE tenant IS NOT NULL"
)


def _beyond_count(conn: Connection, keep_count: int) -> dict[str, int]:
    """The newest id of each tenant's events past its newest `keep_count`; tenants with none left out."""
    beyond = {}
    for (tenant,) in conn.execute(_TENANTS).fetchall():
        row = conn.execute(
            "SELECT id FROM events WHERE tenant=? ORDER BY id DESC LIMIT 1 OFFSET ?", (tenant, keep_count)
        ).fetchone()
        if row is not None:
            beyond[str(tenant)] = int(row[0])
    return beyond
