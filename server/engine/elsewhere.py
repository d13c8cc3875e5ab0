"""Executions this process is not running: waiting for them, and cancelling them through the bus.

An execution may be queued, or run by another process sharing the store. A
wait for it rereads it until it ends; a cancel of one running in another live
process asks that process (CANCEL_REQUESTED on the bus), which records the
outcome. Each process follows such requests for the runs it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from flowport.server.engine.run import FINISHED, Execution
from flowport.server.engine.slots import Slots
from flowport.server.events.bus import EventBus, Subscription

# Asks the process running an execution to cancel it (cancel through another process).
CANCEL_REQUESTED = "execution.cancel_requested"
TERMINAL_EVENTS = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})
CANCEL_WAIT = 10.0
# How often a wait for an execution running elsewhere rereads it, in case the
# event that says it ended was lost (Redis unreachable between the processes).
WAIT_POLL = 1.0


class Local(Protocol):
    """The executor's own reads, waits and cancels, which the paths through other processes come back to."""

    async def get(self, tenant: str, execution_id: str) -> Execution | None: ...

    async def wait(self, tenant: str, execution_id: str, timeout: float) -> Execution | None: ...

    async def cancel(self, tenant: str, execution_id: str) -> Execution | None: ...


class Elsewhere:
    """Waits for and cancels executions outside this process's slots; follows cancel requests for those inside."""

    def __init__(self, bus: EventBus, slots: Slots, local: Local) -> None:
        self._bus = bus
        self._slots = slots
        self._local = local
        self._following: asyncio.Task[None] | None = None
        self._cancelling: set[asyncio.Task[Execution | None]] = set()

    async def wait(self, tenant: str, execution_id: str, timeout: float) -> Execution | None:
        """Wait for an execution this process is not running (queued, or run by another process)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Subscribed before the first read, so an end between the two is not missed.
        ended = self._bus.subscribe(
            lambda e: e.execution_id == execution_id and e.tenant == tenant and e.type in TERMINAL_EVENTS,
            tenant=tenant,
        )
        try:
            while True:
                run = self._slots.runs.get(execution_id)
                if run is not None and run.tenant == tenant:  # taken from the queue by this process
                    return await self._local.wait(tenant, execution_id, max(0.0, deadline - loop.time()))
                execution = await self._local.get(tenant, execution_id)
                remaining = deadline - loop.time()
                if execution is None or execution.state in FINISHED or remaining <= 0:
                    return execution
                await ended.next(min(remaining, WAIT_POLL))
        finally:
            ended.close()

    async def cancel(self, tenant: str, execution_id: str) -> Execution | None:
        """Ask the process running it to cancel it; the execution once it ended, or after CANCEL_WAIT."""
        ended = self._bus.subscribe(
            lambda e: e.execution_id == execution_id and e.tenant == tenant and e.type in TERMINAL_EVENTS,
            tenant=tenant,
        )
        try:
            self._bus.publish(CANCEL_REQUESTED, tenant=tenant, execution_id=execution_id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT):
                    await ended.next()
        finally:
            ended.close()
        return await self._local.get(tenant, execution_id)

    def follow_cancels(self) -> None:
        """Cancel local runs that another process was asked to cancel."""
        requests = self._bus.subscribe(lambda e: e.type == CANCEL_REQUESTED and e.execution_id in self._slots.runs)
        self._following = asyncio.create_task(self._follow(requests), name="cancel requests")

    async def stop(self) -> None:
        """Stop following cancel requests."""
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)

    async def _follow(self, requests: Subscription) -> None:
        try:
            async for event in requests:
                run = self._slots.runs.get(event.execution_id)
                if run is not None and run.tenant == event.tenant:
                    task = asyncio.create_task(self._local.cancel(event.tenant, event.execution_id))
                    self._cancelling.add(task)  # held, or the loop may drop it
                    task.add_done_callback(self._cancelling.discard)
        finally:
            requests.close()
