"""A per-tenant cap on things held at once, for a pool every tenant shares.

The HTTP nodes of every execution share one connection pool, and webhook
deliveries another: without a cap, one tenant's requests to a server that
never answers would hold every connection, and another tenant's would wait
for one until they time out. With it, a tenant holds at most its share at
once; its further requests wait their turn (first come, first served within
the tenant), and the rest of the pool stays for the other tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class TenantShares:
    """At most `share` holders per tenant; nothing is kept for a tenant that holds and waits for none."""

    def __init__(self, share: int) -> None:
        if share < 1:
            raise ValueError("a tenant's share must be at least one")
        self.share = share
        self._held: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Hold one of `tenant`'s places for the block, waiting for one first when all are held."""
        await self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    async def acquire(self, tenant: str) -> None:
        """Take one of `tenant`'s places, waiting for one when all are held; `release` gives it back."""
        if self._held.get(tenant, 0) < self.share and not self._waiting.get(tenant):
            self._held[tenant] = self._held.get(tenant, 0) + 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(tenant, deque())
        queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(tenant)  # handed a place just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # a release may have dropped it already
                    queue.remove(waiter)
                if not queue and self._waiting.get(tenant) is queue:
                    del self._waiting[tenant]
            raise

    def release(self, tenant: str) -> None:
        """Give back one of `tenant`'s places, to its next waiter if any."""
        queue = self._waiting.get(tenant)
        while queue:
            waiter = queue.popleft()
            if not queue and self._waiting.get(tenant) is queue:
                del self._waiting[tenant]
            if not waiter.done():
                waiter.set_result(None)  # the place goes to the next waiter: held stays the same
                return
        held = self._held[tenant] - 1
        if held:
            self._held[tenant] = held
        else:
            del self._held[tenant]
