"""The sandbox pool's waiting line: per-tenant queues served round-robin, with a cap per tenant.

A caller that finds no worker waits here under its tenant. When a worker is
free, the pool asks `ready()` which tenants may take one, in turn: tenants
with someone waiting and fewer than `cap` workers held, the tenant served
longest ago first. Serving a tenant moves it to the back of the line, so a
tenant that queued a hundred jobs gets one worker per round like any other,
and can never hold more than `cap` workers at once while others wait for
the rest. Within a tenant, jobs are first come, first served.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Waiters (futures resolved with what they waited for) per tenant; see the module docstring."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("a tenant's share must be at least one")
        self.cap = cap
        # Rotation order: the first tenant is the next to be served.
        self._queues: OrderedDict[str, deque[asyncio.Future[T]]] = OrderedDict()
        self._held: dict[str, int] = {}

    def __len__(self) -> int:
        """Waiters in line (a cancelled one counts until it is removed)."""
        return sum(len(queue) for queue in self._queues.values())

    def held(self, tenant: str) -> int:
        """What `tenant` holds now (handed out by `pop` and not yet `release`d)."""
        return self._held.get(tenant, 0)

    def push(self, tenant: str, waiter: asyncio.Future[T]) -> None:
        """Put `waiter` last in `tenant`'s queue; a tenant not waiting yet joins the back of the rotation."""
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
        queue.append(waiter)

    def remove(self, tenant: str, waiter: asyncio.Future[T]) -> None:
        """Take a waiter that gave up out of the line (no-op if it is not there)."""
        queue = self._queues.get(tenant)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        if not queue:
            del self._queues[tenant]

    def _prune(self, tenant: str) -> deque[asyncio.Future[T]] | None:
        # A waiter cancelled a moment ago is still queued until its caller removes it.
        queue = self._queues[tenant]
        while queue and queue[0].done():
            queue.popleft()
        if not queue:
            del self._queues[tenant]
            return None
        return queue

    def ready(self) -> list[str]:
        """Tenants that may be handed something now, in the order they should be."""
        return [
            tenant
            for tenant in list(self._queues)
            if self._prune(tenant) is not None and self._held.get(tenant, 0) < self.cap
        ]

    def pop(self, tenant: str) -> asyncio.Future[T]:
        """`tenant`'s first live waiter, counted as holding one more; the tenant goes to the back.

        Only for a tenant `ready()` just listed.
        """
        queue = self._prune(tenant)
        if queue is None:
            raise LookupError(f"tenant {tenant!r} has nobody waiting")
        waiter = queue.popleft()
        if queue:
            self._queues.move_to_end(tenant)
        else:
            del self._queues[tenant]
        self._held[tenant] = self._held.get(tenant, 0) + 1
        return waiter

    def release(self, tenant: str) -> None:
        """`tenant` gave back one of what it held."""
        left = self._held.get(tenant, 0) - 1
        if left > 0:
            self._held[tenant] = left
        else:
            self._held.pop(tenant, None)

    def drain(self) -> list[asyncio.Future[T]]:
        """Every waiter, removed from the line (the pool is closing)."""
        waiters = [waiter for queue in self._queues.values() for waiter in queue]
        self._queues.clear()
        return waiters
