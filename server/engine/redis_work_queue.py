"""The work queue (server/engine/work_queue.py) on a Redis stream read by a consumer group.

Loaded only when Redis is configured. Every Redis failure leaves a call as
QueueUnavailable, so the engine never handles Redis' own exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from flowport.server.engine.work_queue import GROUP, STREAM, QueuedExecution, QueueUnavailable

TIMEOUT = 2.0


@contextlib.contextmanager
def _failing() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise QueueUnavailable(str(exc) or type(exc).__name__) from exc


def _entries(raw: Any) -> list[QueuedExecution]:
    return [
        QueuedExecution(entry_id, fields[b"t"].decode(), fields[b"x"].decode())
        for entry_id, fields in raw
        # XAUTOCLAIM reports entries deleted meanwhile with no fields.
        if fields
    ]


# How long a consumer's read waits for an entry: how soon a stopping consumer notices (Takeover).
READ_BLOCK_MS = 1000


class RedisWorkQueue:
    """Executions waiting for a process with a free slot, shared through Redis."""

    def __init__(self, url: str, consumer: str, *, block_ms: int | None = None) -> None:
        """`block_ms`: how long a read waits for an entry (default READ_BLOCK_MS)."""
        block_ms = READ_BLOCK_MS if block_ms is None else block_ms
        # Reads block up to block_ms, so the socket timeout must outlast them.
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT + block_ms / 1000, socket_connect_timeout=TIMEOUT
        )
        self._consumer = consumer
        self._block_ms = block_ms
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # "0": a group made after entries were added (Redis restarted, or
            # the first process to read) still delivers them.
            await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def submit(self, tenant: str, execution_id: str) -> None:
        """Add an execution for any process to take."""
        with _failing():
            await self._redis.xadd(STREAM, {"t": tenant, "x": execution_id})

    async def backlog(self) -> int:
        """Entries added and not yet claimed by any process."""
        with _failing():
            return int(await self._redis.xlen(STREAM))

    async def queued(self, page: int = 1000) -> set[str]:
        """The executions of every entry in the stream, read by a process or not: all that waits for one."""
        with _failing():
            found: set[str] = set()
            start = "-"
            while True:
                raw = await self._redis.xrange(STREAM, min=start, max="+", count=page)
                found.update(entry.execution_id for entry in _entries(raw))
                if len(raw) < page:
                    return found
                # Exclusive of the last entry read; entries added meanwhile come after it.
                start = "(" + raw[-1][0].decode()

    async def take(self, count: int) -> list[QueuedExecution]:
        """Up to `count` new entries for this process; waits up to block_ms for one."""
        with _failing():
            await self._ensure_group()
            try:
                reply = await self._redis.xreadgroup(
                    GROUP, self._consumer, {STREAM: ">"}, count=count, block=self._block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost the group (restarted empty): make it again
                    self._group_ready = False
                raise
            return [entry for _, raw in reply or () for entry in _entries(raw)]

    async def reclaim(self, idle_ms: int, count: int = 100) -> list[QueuedExecution]:
        """Entries another process read and left unacknowledged for idle_ms: it died before claiming them."""
        with _failing():
            await self._ensure_group()
            reply = await self._redis.xautoclaim(STREAM, GROUP, self._consumer, idle_ms, "0-0", count=count)
            return _entries(reply[1])

    async def done(self, entries: list[QueuedExecution]) -> None:
        """Remove entries whose executions were claimed (or need no run any more)."""
        with _failing():
            if not entries:
                return
            ids = [entry.entry_id for entry in entries]
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(STREAM, GROUP, *ids)
                pipe.xdel(STREAM, *ids)
                await pipe.execute()

    async def give_back(self, entries: list[QueuedExecution]) -> None:
        """Return entries this process read but has no room for (it filled up while its read waited).

        Each goes back to the end of the queue for any process, in one transaction.
        """
        with _failing():
            if not entries:
                return
            ids = [entry.entry_id for entry in entries]
            async with self._redis.pipeline(transaction=True) as pipe:
                for entry in entries:
                    pipe.xadd(STREAM, {"t": entry.tenant, "x": entry.execution_id})
                pipe.xack(STREAM, GROUP, *ids)
                pipe.xdel(STREAM, *ids)
                await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()
