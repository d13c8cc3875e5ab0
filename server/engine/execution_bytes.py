"""The most bytes of stored executions one tenant may keep (`--tenant-max-execution-bytes`).

Executions are removed by age (`--execution-retention-seconds`), but age
alone lets one tenant fill the disk every tenant shares: its rate limit
times a month of 12 MiB executions. So each tenant's executions are also
counted in bytes (their stored bodies; triggers keep the count, migration
22), and a tenant past its cap:

- has its new executions refused (RESOURCE_EXHAUSTED, HTTP 429, reason
  TENANT_QUOTA, with a retry delay), which loses nothing already stored; and
- loses its oldest ended executions, at once in the background and at each
  purge round, until it is back to KEEP of its cap. Running and waiting
  executions are never removed.

So a tenant at its cap keeps its newest results, as the event log keeps each
tenant's newest events. A process reads a tenant's total at most once every
REFRESH seconds, so a tenant may pass its cap by what it writes in that time
in each process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from flowport.server.errors import ResourceExhausted
from flowport.server.storage.executions import ExecutionTables

log = logging.getLogger(__name__)

# Seconds a process uses a tenant's total before reading it again.
REFRESH = 1.0
# A tenant past its cap is brought back to this fraction of it: room for new results before the next removal.
KEEP = 0.9
# Removals (each of at most REMOVE_BATCH executions) in one tenant's trim; a larger excess goes over several.
TRIM_ROUNDS = 100
REMOVE_BATCH = 1000
# Tenants whose totals a process remembers; past it, it starts again.
TENANTS_TRACKED = 65_536


async def trim(store: ExecutionTables, tenant: str, limit: int) -> int:
    """Remove `tenant`'s oldest ended executions until its total is at most KEEP of `limit`;
    returns how many went (bounded by TRIM_ROUNDS * REMOVE_BATCH)."""
    target = int(limit * KEEP)
    removed = 0
    for _ in range(TRIM_ROUNDS):
        gone = await store.remove_oldest_ended_executions(tenant, target, batch=REMOVE_BATCH)
        removed += gone
        if not gone:  # back under, or nothing ended left: what remains is running or waiting
            break
    return removed


async def trim_all(store: ExecutionTables, limit: int) -> int:
    """`trim` each tenant past `limit` (a purge round); returns how many executions went."""
    removed = 0
    for tenant in await store.tenants_over_execution_bytes(limit):
        gone = await trim(store, tenant, limit)
        if gone:
            log.info("tenant %s was past its cap of %d bytes of executions: removed its %d oldest", tenant, limit, gone)
        removed += gone
    return removed


class ExecutionBytesCap:
    """The admission check of new executions against their tenant's cap, from totals read at most
    every REFRESH seconds, and the trim a refusal starts."""

    def __init__(
        self, store: ExecutionTables, limit: int | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`limit`: bytes each tenant may keep; None, no cap."""
        self.limit = limit
        self._store = store
        self._clock = clock
        self._totals: dict[str, tuple[int, float]] = {}  # tenant: (bytes, when read)
        self._trims: dict[str, asyncio.Task[int]] = {}

    async def over(self, tenant: str) -> bool:
        """Whether `tenant` keeps `limit` bytes of executions or more, by its total read at most
        REFRESH seconds ago."""
        limit = self.limit
        if limit is None:
            return False
        now = self._clock()
        known = self._totals.get(tenant)
        if known is not None and now - known[1] < REFRESH:
            return known[0] >= limit
        if len(self._totals) >= TENANTS_TRACKED and tenant not in self._totals:
            self._totals.clear()
        if known is not None:
            # Calls meanwhile use the last total instead of each reading it too.
            self._totals[tenant] = (known[0], now)
        used = await self._store.execution_bytes(tenant)
        self._totals[tenant] = (used, now)
        return used >= limit

    def refuse(self, tenant: str) -> ResourceExhausted:
        """The error for a new execution of `tenant`, which is `over`; starts removing its oldest
        ended executions unless that is under way."""
        assert self.limit is not None, "refused without a cap"
        if tenant not in self._trims:
            self._trims[tenant] = asyncio.create_task(self._trim(tenant, self.limit))
        return ResourceExhausted(
            f"this tenant keeps its most of {self.limit} bytes of stored executions; its oldest ended executions "
            "are being removed to make room, retry shortly",
            reason="TENANT_QUOTA",
            metadata={"kind": "executions", "tenant_max_execution_bytes": str(self.limit)},
            retry_delay=REFRESH,
        )

    async def _trim(self, tenant: str, limit: int) -> int:
        try:
            gone = await trim(self._store, tenant, limit)
            log.info("tenant %s reached its cap of %d bytes of executions: removed its %d oldest", tenant, limit, gone)
            # Read again at the next check: the room made is usable at once.
            self._totals.pop(tenant, None)
            return gone
        except Exception:
            log.exception("removing the oldest executions of tenant %s failed; the purge round retries", tenant)
            return 0
        finally:
            self._trims.pop(tenant, None)

    async def close(self) -> None:
        """Stop the trims under way (a purge round finishes their work)."""
        trims = list(self._trims.values())
        for task in trims:
            task.cancel()
        await asyncio.gather(*trims, return_exceptions=True)
