"""Reads that callers asking at the same time share: one query in flight per question.

The figures GetStats and /durability/status show are aggregates over whole
tables (counts by tenant). Asked by many callers at once, each would scan
again what the others are scanning; instead a caller that asks while the same
query runs gets that run's answer. Nothing is kept once it is answered: a
figure is at most one query's time older than the call that gets it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class SharedReads:
    """Runs each distinct read once at a time; callers asking for it meanwhile await that run."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}

    async def read(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(work())
            self._running[key] = running
            running.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: a caller that gives up (its call cancelled) leaves the run to the others.
        result: T = await asyncio.shield(running)
        return result

    def _forget(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody awaited any more is not logged as lost
