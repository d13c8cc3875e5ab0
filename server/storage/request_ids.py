"""What each tenant's remembered request ids take (`--tenant-max-request-id-bytes`).

Every call with a `request_id` leaves a record of its answer (`idempotency`)
for a day, so that a retry gets the same answer, whatever became of what the
call made. Creating and deleting with request ids, a tenant would grow that
table by its rate limit times a day of answers (a workflow's is the workflow,
up to 4 MiB). Triggers keep each tenant's total (migration 23, counted as
RECORD_BYTES says), and each purge round forgets the oldest records of a
tenant past its cap until it is back to KEEP of it: that tenant's retries of
calls older than what it kept are then new calls, as they are after a day.
Other tenants' records are never touched.
"""

from __future__ import annotations

import logging

from flowport.server.storage.tables import Connection, Tables

log = logging.getLogger(__name__)

# A tenant past its cap is brought back to this fraction of it.
KEEP = 0.9
# Removals (each of at most FORGET_BATCH records) in one tenant's round; a larger excess goes over several.
FORGET_ROUNDS = 100
FORGET_BATCH = 1000
# As migration 23 counts a record.
_RECORD_BYTES = "(length(response) + length(request_id) + length(method) + 64)"


class RequestIdTables(Tables):
    """Per-tenant totals of the idempotency records, and forgetting the oldest."""

    async def request_id_bytes(self, tenant: str) -> int:
        """The bytes of `tenant`'s remembered request ids, as of the last commit."""
        return await self._tenant_total("request_id_bytes", tenant)

    async def fold_request_id_bytes(self) -> None:
        """Fold the rows of PostgreSQL connections gone into shard 0."""
        await self._fold_shards("request_id_bytes")

    async def tenants_over_request_id_bytes(self, limit: int) -> list[str]:
        """The tenants whose remembered request ids take more than `limit` bytes."""
        return await self._tenants_over("request_id_bytes", limit)

    async def forget_oldest_request_ids(self, tenant: str, down_to: int, *, batch: int = FORGET_BATCH) -> int:
        """Forget `tenant`'s oldest records, among its `batch` oldest, until its total is `down_to`
        bytes (with any that share the last one's time); returns how many went. The total is read in
        the same transaction: processes purging at once do not each take away the whole excess."""

        def op(conn: Connection) -> int:
            (used,) = conn.execute("SELECT sum(bytes) FROM request_id_bytes WHERE tenant=?", (tenant,)).fetchone()
            excess = int(used or 0) - down_to
            if excess <= 0:
                return 0
            rows = conn.execute(
                f"SELECT create_us, {_RECORD_BYTES} FROM idempotency WHERE tenant=?"  # noqa: S608 - fixed fragments
                " ORDER BY create_us LIMIT ?",
                (tenant, batch),
            ).fetchall()
            freed, until = 0, None
            for create_us, size in rows:
                if freed >= excess:
                    break
                freed += int(size)
                until = int(create_us)
            if until is None:
                return 0
            return int(
                conn.execute("DELETE FROM idempotency WHERE tenant=? AND create_us<=?", (tenant, until)).rowcount
            )

        return await self._write(op)


async def forget_beyond(store: RequestIdTables, limit: int) -> int:
    """A purge round: bring each tenant past `limit` back to KEEP of it; returns records forgotten."""
    forgotten = 0
    for tenant in await store.tenants_over_request_id_bytes(limit):
        gone = 0
        for _ in range(FORGET_ROUNDS):
            removed = await store.forget_oldest_request_ids(tenant, int(limit * KEEP))
            gone += removed
            if not removed:
                break
        if gone:
            log.info("tenant %s was past its cap of %d bytes of request ids: forgot its %d oldest", tenant, limit, gone)
        forgotten += gone
    return forgotten
