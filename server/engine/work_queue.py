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

from dataclasses import dataclass
from typing import Protocol

STREAM = "flowport:executions"
GROUP = "executors"


class QueueUnavailable(Exception):
    """The queue could not be reached, or failed a command: the caller retries or runs nothing new."""


# What a queue call raises when the queue fails (Redis down, a timeout): never a bug.
QUEUE_FAILURES = (QueueUnavailable,)


@dataclass(frozen=True)
class QueuedExecution:
    """One entry of the queue: which execution, and the entry to acknowledge once claimed."""

    entry_id: bytes
    tenant: str
    execution_id: str


class WorkQueue(Protocol):
    """What the executor needs of the shared queue (server/engine/redis_work_queue.py is the one
    there is). Every call raises QueueUnavailable when the queue fails."""

    async def submit(self, tenant: str, execution_id: str) -> None:
        """Add an execution for any process to take."""

    async def backlog(self) -> int:
        """Entries added and not yet claimed by any process."""

    async def queued(self, page: int = 1000) -> set[str]:
        """The executions of every entry in the queue, read by a process or not."""

    async def take(self, count: int) -> list[QueuedExecution]:
        """Up to `count` new entries for this process; waits a while for one."""

    async def reclaim(self, idle_ms: int, count: int = 100) -> list[QueuedExecution]:
        """Entries another process read and left unacknowledged for idle_ms."""

    async def done(self, entries: list[QueuedExecution]) -> None:
        """Remove entries whose executions were claimed (or need no run any more)."""

    async def give_back(self, entries: list[QueuedExecution]) -> None:
        """Return entries this process read but has no room for, to the end of the queue."""

    async def close(self) -> None:
        """Release the connection."""
