"""Health of the database resource pools this process has open.

Every sweep runs `SELECT 1` through each open pool (bounded by a timeout)
and records the outcome for GET /health's `database_pools` component, as
counts and the slowest latency: /health is public, so no names. A pool
whose resource was deleted or changed through another process is closed
here too (the API closes its own process's pool at once).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowport.server.nodes.sql_pools import SqlPools
from flowport.server.periodic import Periodic
from flowport.server.resolver import RESOLVING_FOR
from flowport.server.resources.directory import ResourceDirectory

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine


@dataclass(frozen=True)
class PoolSweep:
    """One round of pool checks."""

    checked: int
    failed: int
    latency_ms: float  # the slowest check
    at: float  # unix seconds


async def ping(engine: AsyncEngine, timeout: float) -> float:
    """Milliseconds for SELECT 1 through `engine`; raises when it fails or takes longer than `timeout`."""
    from sqlalchemy import text  # loaded with the first pool, not at start

    started = time.perf_counter()
    async with asyncio.timeout(timeout), engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return 1000 * (time.perf_counter() - started)


class PoolHealth:
    """Checks the open resource pools on a schedule."""

    def __init__(self, pools: SqlPools, directory: ResourceDirectory, *, interval: float, timeout: float) -> None:
        self._pools = pools
        self._directory = directory
        self._timeout = timeout
        self.last_sweep: PoolSweep | None = None
        self._schedule = Periodic(self.check_all, interval, "resource pool health checks")

    def start(self) -> None:
        self._schedule.start()

    async def close(self) -> None:
        await self._schedule.close()

    async def _ping(self, tenant: str, engine: AsyncEngine) -> float | None:
        """The ping's latency; None when the pool was retired before it could be held."""
        # Its own task (gather): a new connection's name lookup is the tenant's (resolver.py).
        RESOLVING_FOR.set(tenant)
        async with self._pools.using(engine):
            # Held from here: retiring it now waits for this ping instead of being reopened by it.
            if not self._pools.is_current(engine):
                return None
            return await ping(engine, self._timeout)

    async def check_all(self) -> PoolSweep:
        """Check every open pool once (closing those whose resource is gone or changed)."""
        open_pools = self._pools.resource_pools()
        current = []
        for tenant, name, fingerprint, engine in open_pools:
            if await self._directory.still_current(tenant, name, fingerprint) is False:
                self._directory.forget(tenant, name)
            else:
                current.append((tenant, engine))
        # Only pools still in service: a retired one (its resource changed meanwhile) is not reopened.
        current = [(tenant, engine) for tenant, engine in current if self._pools.is_current(engine)]
        pings = (self._ping(tenant, engine) for tenant, engine in current)
        outcomes = [outcome for outcome in await asyncio.gather(*pings, return_exceptions=True) if outcome is not None]
        latencies = [o for o in outcomes if isinstance(o, float)]
        sweep = PoolSweep(
            checked=len(outcomes),
            failed=len(outcomes) - len(latencies),
            latency_ms=round(max(latencies, default=0.0), 3),
            at=time.time(),
        )
        self.last_sweep = sweep
        return sweep
