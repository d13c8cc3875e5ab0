"""Reads that callers asking at the same time share: one query in flight per question.

The figures GetStats and /durability/status show are aggregates over whole
tables (counts by tenant). Asked by many callers at once, each would scan
again what the others are scanning; instead a caller that asks while the same
query runs gets that run's answer. An answer is also kept for KEEP_FACTOR
times as long as its query took, and at most KEEP_MAX seconds: a client
asking for its figures in a loop then keeps a reader busy about a tenth of
the time for a query under half a second (a sixth for one of a second, as a
tenant's millions of executions take), instead of scanning back to back on
the readers every tenant shares. A figure is at most about eleven of its
queries' time old, and never more than KEEP_MAX past its query; one whose
query took under KEEP_FROM (a small table) is not kept at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

KEEP_FACTOR = 10
# Seconds an answer is kept at most, however long its query took (waiting for a reader included).
KEEP_MAX = 5.0
# A query quicker than this is not kept at all: a small table's count, read back to back, costs a
# reader little, and a caller then reads what it just wrote.
KEEP_FROM = 0.005
# Answers kept at most (tenants times figures); past it, they are all let go.
KEPT_MAX = 65_536


class SharedReads:
    """Runs each distinct read once at a time; callers asking for it meanwhile, or soon after, get
    that run's answer."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._running: dict[Hashable, asyncio.Future[Any]] = {}
        self._kept: dict[Hashable, tuple[float, Any]] = {}  # key: (until, answer)

    async def read(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        kept = self._kept.get(key)
        if kept is not None:
            if self._clock() < kept[0]:
                answer: T = kept[1]
                return answer
            del self._kept[key]
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(self._timed(key, work))
            self._running[key] = running
            running.add_done_callback(lambda done: self._forget(key, done))
        # Shielded: a caller that gives up (its call cancelled) leaves the run to the others.
        result: T = await asyncio.shield(running)
        return result

    async def _timed(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        started = self._clock()
        answer = await work()
        ended = self._clock()
        if ended - started < KEEP_FROM:
            return answer
        if len(self._kept) >= KEPT_MAX:
            self._kept.clear()
        self._kept[key] = (ended + min(KEEP_FACTOR * (ended - started), KEEP_MAX), answer)
        return answer

    def _forget(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failure nobody awaited any more is not logged as lost
