"""The execution work queue shared by processes: a Redis stream read by a consumer group.

A process starts an execution it creates at once when it has a free slot.
When it is full, it records the execution unowned and adds it here; any
process with a free slot takes it (`XREADGROUP`), claims its row in the
database and runs it, then removes the entry (`XACK` + `XDEL`, so the
stream holds only work not yet claimed).

Two layers keep work from being lost:

- an entry read by a process that died before claiming the row stays in
  the group's pending list; after a lease without acknowledgement another
  process takes it over (`XAUTOCLAIM`);
- once claimed, the row's database lease (server/leases.py) covers the run,
  as for any execution. An unowned (queued) row carries a check time one
  lease ahead instead: when it passes, the lease sweep of some process looks
  for the row's entry in the stream (`queued`). Still there, the row is only
  waiting its turn and its next check moves a lease further; gone (lost with
  a Redis restarted without persistence, or never added because Redis was
  unreachable), the entry is added again.

The database claim is the only gate, so a row taken through both layers at
once still runs once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

STREAM = "flowport:executions"
GROUP = "executors"
TIMEOUT = 2.0
QUEUE_FAILURES = (RedisError, OSError, TimeoutError)


@dataclass(frozen=True)
class QueuedExecution:
    """One entry of the queue: which execution, and the entry to acknowledge once claimed."""

    entry_id: bytes
    tenant: str
    execution_id: str


def _entries(raw: Any) -> list[QueuedExecution]:
    return [
        QueuedExecution(entry_id, fields[b"t"].decode(), fields[b"x"].decode())
        for entry_id, fields in raw
        # XAUTOCLAIM reports entries deleted meanwhile with no fields.
        if fields
    ]


class RedisWorkQueue:
    """Executions waiting for a process with a free slot, shared through Redis."""

    def __init__(self, url: str, consumer: str, *, block_ms: int = 1000) -> None:
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
        """Add an execution for any process to take. Raises a QUEUE_FAILURES error when Redis fails."""
        await self._redis.xadd(STREAM, {"t": tenant, "x": execution_id})

    async def backlog(self) -> int:
        """Entries added and not yet claimed by any process."""
        return int(await self._redis.xlen(STREAM))

    async def queued(self, page: int = 1000) -> set[str]:
        """The executions of every entry in the stream, read by a process or not: all that waits for one."""
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
        await self._ensure_group()
        reply = await self._redis.xautoclaim(STREAM, GROUP, self._consumer, idle_ms, "0-0", count=count)
        return _entries(reply[1])

    async def done(self, entries: list[QueuedExecution]) -> None:
        """Remove entries whose executions were claimed (or need no run any more)."""
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
