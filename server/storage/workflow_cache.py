"""Workflows a process keeps in memory while it shares a PostgreSQL database with other processes,
never used once another process has changed them.

Every execution starts by reading its workflow. On PostgreSQL that read is a
round trip from a reader thread, and measured as the largest single part of
an execution's cost there (benchmarks/RESULTS.md). Keeping the rows in each
process is only correct if a create or delete through one process is seen by
every other before the create or delete answers. The protocol:

- A create or delete raises `workflow_changes.seq` in its own transaction
  (a trigger on `workflows` does, so a process of an earlier release raises
  it too), and answers once every process whose lease has not run out has
  seen that value (`wait_for_others`).
- Each process reads `seq` every `POLL` seconds, and in the same statement
  the tenants whose newest change is above the value it saw last
  (`workflow_tenant_changes`, migration 24). A new value drops what it keeps
  of those tenants, and only of those: one tenant changing its workflows in
  a loop costs the others nothing. Then it writes its acknowledgement
  (`workflow_cache_acks.seen`), renewing its lease: `until_us` = the
  database's clock + `LEASE`. The acknowledgement share-locks the counter
  first, so a change that committed without waiting for this process (its
  lease had run out) is seen by the acknowledgement itself, and one that
  commits later waits for it.
- A process uses what it keeps only until its lease ends by its own
  monotonic clock, counted from before the write that renewed it (less a
  margin), so never after the database's `until_us`: a process that stops
  polling (stalled, cut off from the database) stops using its rows before
  the writers stop waiting for it.
- A read that began before a drop of its tenant is not kept: each read
  carries the count of drops when it began (`tag`), and is kept only if its
  tenant (or everything) was not dropped since.
- `seen` only moves to a value once the tenants changed up to it, read in
  one snapshot with it, are dropped.

So a create answers at most a poll and a write later (a few tens of
milliseconds) while every process is well, and at most `LEASE` plus a
poll later when one stopped answering. SQLite needs none of this: one
process owns the file, and its reads take microseconds on the event loop's
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from flowport.server.periodic import Failures

if TYPE_CHECKING:
    from flowport.server.storage.tables import Connection

log = logging.getLogger(__name__)

Key = tuple[str, str, int, str | None]  # tenant, workflow_id, version (0: latest), session_creator

# Seconds a process may use what it keeps after its last acknowledgement.
LEASE = 2.0
# Less this much, by the process's own clock: what an acknowledgement's write took beyond its start.
MARGIN = 0.25
# Seconds between reads of the change counter.
POLL = 0.05
# A lease is renewed when this much of it is left.
RENEW_LEFT = LEASE * 0.75
# Rows kept at most, their bodies' bytes in all, and the largest body kept (larger ones are
# read each time): at most 32 MiB per process, however large the workflows.
MAX_ENTRIES = 4096
MAX_BYTES = 32 * 2**20
MAX_BODY = 256 * 1024
# Acknowledgements of processes gone this long are removed at start.
STALE_ACKS_US = 3600 * 1_000_000

_DB_NOW_US = "(extract(epoch from clock_timestamp()) * 1000000)::bigint"
# One statement, so one transaction on an autocommit connection, outside any write batch: the
# share lock it takes on the counter is held until the acknowledgement is committed, and it
# waits for no lock a batch could be holding while that batch waits for the counter.
_ACK = (
    "WITH current AS (SELECT seq FROM workflow_changes WHERE id=1 FOR SHARE),"  # noqa: S608 - fixed fragments
    " ack AS (INSERT INTO workflow_cache_acks (owner, seen, until_us) VALUES (?, ?, "
    f"{_DB_NOW_US} + ?) ON CONFLICT (owner) DO UPDATE SET seen=excluded.seen, until_us=excluded.until_us)"
    " SELECT seq FROM current"
)
_BEHIND = (
    "SELECT count(*) FROM workflow_cache_acks WHERE owner<>? AND seen<?"  # noqa: S608 - fixed fragments
    f" AND until_us>{_DB_NOW_US}"
)
_SEQ = "SELECT seq FROM workflow_changes WHERE id=1"
# The counter and the tenants changed since a value, in one snapshot. Past MAX_TENANTS of them
# everything is dropped, which is as correct and cheaper to say.
MAX_TENANTS = 1000
_SINCE = (
    "SELECT c.seq, t.tenant FROM workflow_changes c LEFT JOIN workflow_tenant_changes t ON t.seq > ?"
    " WHERE c.id=1 LIMIT ?"
)
# Tenants dropped one by one that are remembered (for `keep`) before one drop of everything
# forgets them all.
MAX_TENANT_MARKS = 10_000
# Rounds of an acknowledgement chasing changes that keep coming; past them the lease is not renewed.
ACK_ROUNDS = 3

Runner = Callable[[Callable[["Connection"], Any]], Awaitable[Any]]


def changes(conn: Connection) -> int:
    """The change counter, read in the transaction of a workflow create or delete: the database
    raised it there (a trigger on workflows, migration 21), so this is that change's value."""
    (seq,) = conn.execute(_SEQ).fetchone()
    return int(seq)


class WorkflowCache:
    """One process's workflow rows, kept under the protocol above."""

    def __init__(self, owner: str, run: Runner) -> None:
        """`run` runs an op on an autocommit connection (the store's readers): each statement
        is its own transaction, never part of a write batch."""
        self._owner = owner
        self._run = run
        self._entries: OrderedDict[Key, bytes] = OrderedDict()
        self._by_tenant: dict[str, set[Key]] = {}
        self._bytes = 0
        self.seen = -1  # nothing seen yet: nothing is kept until the first acknowledgement
        self._drops = 0  # what a read carries (`tag`): it goes up with every drop, never back
        self._all_dropped = 0  # `_drops` at the last drop of everything
        self._tenant_dropped: dict[str, int] = {}  # `_drops` at each tenant's last drop since
        self._valid_until = 0.0
        self._renew_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    # -- use ------------------------------------------------------------

    def get(self, key: Key) -> bytes | None:
        """The body kept for `key`, if any and while the lease holds."""
        if time.monotonic() >= self._valid_until:
            return None
        body = self._entries.get(key)
        if body is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return body

    def tag(self) -> int:
        """What a read beginning now carries to `keep`."""
        return self._drops

    def keep(self, key: Key, body: bytes, tag: int) -> None:
        """Keep what a read that began at `tag` found, unless its tenant's rows (or all) were
        dropped since it began."""
        if (
            self._all_dropped > tag
            or self._tenant_dropped.get(key[0], 0) > tag
            or len(body) > MAX_BODY
            or time.monotonic() >= self._valid_until
        ):
            return
        self._forget(key)
        self._entries[key] = body
        self._by_tenant.setdefault(key[0], set()).add(key)
        self._bytes += len(body)
        while len(self._entries) > MAX_ENTRIES or self._bytes > MAX_BYTES:
            self._forget(next(iter(self._entries)))

    def _forget(self, key: Key) -> None:
        body = self._entries.pop(key, None)
        if body is None:
            return
        self._bytes -= len(body)
        keys = self._by_tenant[key[0]]
        keys.discard(key)
        if not keys:
            del self._by_tenant[key[0]]

    # -- changes --------------------------------------------------------

    async def changed(self, seq: int, tenant: str) -> None:
        """This process committed change `seq` of `tenant`'s workflows: drop what it keeps of
        that tenant, and of any other changed before it, acknowledge it, and wait until every
        other process with a lease has seen it. Never raises: the change is committed."""
        # At once, before any other read of this process can use a row the change made old.
        self._drop_tenants(frozenset((tenant,)))
        try:
            await self._catch_up()
            await self._acknowledge()
            await self.wait_for_others(seq)
        except Exception:
            # Whoever has not seen it yet stops using its rows within a lease, polling or not.
            log.warning("workflow change %d: acknowledgements unreadable; waiting out the lease", seq, exc_info=True)
            await asyncio.sleep(LEASE + POLL)

    async def wait_for_others(self, seq: int) -> None:
        """Return once no other process whose lease has not run out is behind `seq`."""
        deadline = time.monotonic() + LEASE + 2 * POLL + 1.0
        while True:
            (behind,) = await self._run(lambda conn: conn.execute(_BEHIND, (self._owner, seq)).fetchone())
            if not behind:
                return
            if time.monotonic() > deadline:
                # Cannot happen while each process acknowledges when it renews; said, not hidden.
                log.warning("workflow change %d: %d processes neither saw it nor let their lease end", seq, behind)
                return
            await asyncio.sleep(POLL / 5)

    def _drop(self, seq: int, tenants: frozenset[str] | None = None) -> None:
        """Change `seq` was read with the tenants changed since `seen` (None: unknown, so all):
        what this process keeps of them is older."""
        if tenants is None or len(self._tenant_dropped) + len(tenants) > MAX_TENANT_MARKS:
            self._entries.clear()
            self._by_tenant.clear()
            self._bytes = 0
            self._drops += 1
            self._all_dropped = self._drops
            self._tenant_dropped.clear()
        else:
            self._drop_tenants(tenants)
        self.seen = seq

    def _drop_tenants(self, tenants: frozenset[str]) -> None:
        self._drops += 1
        for tenant in tenants:
            for key in list(self._by_tenant.get(tenant, ())):
                self._forget(key)
            self._tenant_dropped[tenant] = self._drops

    # -- the lease ------------------------------------------------------

    async def start(self) -> None:
        """Acknowledge the current counter (taking a lease), then keep polling."""
        await self._run(
            lambda conn: conn.execute(
                f"DELETE FROM workflow_cache_acks WHERE until_us<{_DB_NOW_US} - ?",  # noqa: S608 - fixed fragments
                (STALE_ACKS_US,),
            )
        )
        await self._poll()
        self._task = asyncio.create_task(self._forever(), name="flowport-workflow-cache")

    async def close(self) -> None:
        """Stop polling, stop using what is kept, and give up the lease (writers stop waiting for it)."""
        self._valid_until = 0.0
        self._drop(self.seen)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._run(lambda conn: conn.execute("DELETE FROM workflow_cache_acks WHERE owner=?", (self._owner,)))

    async def _forever(self) -> None:
        # Every 50 ms: a database outage is said once, then once a minute, not at each poll.
        failures = Failures(log, "reading the workflow change counter")
        try:
            while True:
                await asyncio.sleep(POLL)
                try:
                    await self._poll()
                except Exception as exc:  # noqa: BLE001 - said by `failures`; polling goes on
                    failures.failed(exc)
                else:
                    failures.worked()
        finally:
            failures.close()

    async def _poll(self) -> None:
        before = self.seen
        if await self._catch_up() or (self.seen == before and time.monotonic() >= self._renew_at):
            # (A change of this process's own, seen meanwhile, is acknowledged by its writer.)
            await self._acknowledge()

    async def _catch_up(self) -> bool:
        """Read the counter and the tenants changed since `seen` in one snapshot, and drop them;
        whether anything was dropped."""
        before = self.seen

        def since(conn: Connection) -> list[tuple[int, str | None]]:
            return list(conn.execute(_SINCE, (before, MAX_TENANTS + 1)).fetchall())

        rows = await self._run(since)
        seq = int(rows[0][0])
        if self.seen != before or seq == before:
            # Another read of this process moved `seen` meanwhile: this one may predate it.
            return False
        tenants = frozenset(tenant for _, tenant in rows if tenant is not None)
        if seq < before or before < 0 or not tenants or len(rows) > MAX_TENANTS:
            # Below what was seen only if the database was restored or the counter reset: it is
            # the truth either way, and what is kept may be from a future that never happened.
            self._drop(seq)
        else:
            self._drop(seq, tenants)
        return True

    async def _acknowledge(self) -> None:
        """Write what this process has seen, with a new lease.

        The statement share-locks the counter first. A change committed before it is seen
        here, so the lease is not taken on an old value (the change may not have waited for
        this process: its lease had run out, or it had none yet); a change after it blocks
        until this acknowledgement commits, and then waits for it. While changes keep coming
        faster than an acknowledgement, the lease is left to run out (and the rows unused)."""
        owner, lease_us = self._owner, int(LEASE * 1_000_000)
        for _ in range(ACK_ROUNDS):
            started = time.monotonic()
            seen = self.seen

            def ack(conn: Connection, seen: int = seen) -> Any:
                return conn.execute(_ACK, (owner, seen, lease_us)).fetchone()

            (current,) = await self._run(ack)
            if int(current) <= seen:
                # Counted from before the statement: the database's `until_us` is later still.
                self._valid_until = max(self._valid_until, started + LEASE - MARGIN)
                self._renew_at = started + LEASE - RENEW_LEFT
                return
            # Not from this statement's tenants: its share lock may have read a counter that
            # committed after the snapshot the rest of it reads.
            await self._catch_up()
