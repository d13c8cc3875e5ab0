"""Event log rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from flowport.server.events.bus import BusEvent
from flowport.server.storage.tables import Connection, Tables

_INSERT = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
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

    async def append_events(self, events: Sequence[BusEvent]) -> None:
        """Append events (ids already assigned) and wait for the commit."""
        await self._write(self._appending(events))

    def append_events_soon(self, events: Sequence[BusEvent]) -> None:
        """Queue an append; it commits in order with the writes around it."""
        self._write_soon(self._appending(events))

    def _appending(self, events: Sequence[BusEvent]) -> Callable[[Connection], object]:
        rows = [_row(e) for e in events]
        if not rows:
            return lambda conn: None
        if self.dialect == "postgresql":
            # Each row's data is JSON already (orjson's UTF-8), carried as a string.
            batch = orjson.dumps([(*row[:7], row[7].decode()) for row in rows]).decode()
            return lambda conn: conn.execute(_INSERT_JSON, (batch,))
        return lambda conn: conn.executemany(_INSERT, rows)

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

    async def event_bounds(self) -> tuple[int, int]:
        """(purged through, newest): the highest id retention ever dropped (0: none) and the newest id
        in the log (0 when it is empty). Every event with an id above the first is still in the log."""
        row = await self._lookup(
            "SELECT purged_through, (SELECT COALESCE(MAX(id), 0) FROM events) FROM event_id_reservation WHERE id=1", ()
        )
        assert row is not None
        return int(row[0]), int(row[1])

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
        """Drop all but the newest `keep_count` events, and every event older than `keep_after_us`;
        returns how many. The highest id dropped is remembered (`event_bounds`)."""
        # Counted in rows, never from ids: ids skip ahead at every restart.
        # Read outside the write: later appends only add newer events.
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (keep_count,)
            ).fetchone()
        )
        beyond_count = 0 if row is None else int(row[0])
        greatest = self._greatest()  # a fixed function name, not input
        mark = f"UPDATE event_id_reservation SET purged_through={greatest}(purged_through, ?) WHERE id=1"  # noqa: S608

        def op(conn: Connection) -> int:
            (too_old,) = conn.execute("SELECT MAX(id) FROM events WHERE time_us<?", (keep_after_us,)).fetchone()
            highest = max(beyond_count, int(too_old or 0))
            if not highest:
                return 0
            removed = conn.execute(
                "DELETE FROM events WHERE id<=? OR time_us<?", (beyond_count, keep_after_us)
            ).rowcount
            conn.execute(mark, (highest,))
            return removed

        return await self._write(op)
