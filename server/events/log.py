"""The event log: every published event, durably, for resuming streams.

A bus listener queues each event and writes queued events in one batch per
loop turn (grouped with other writes by the store), so publishing never
waits for the disk. Reads for a resuming stream first flush what is queued,
so a resume sees every event published before it. Retention is by count
(rows, not id arithmetic: ids skip ahead at a restart) and by age; a
cursor is OUT_OF_RANGE only when retention dropped an event after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, cast

from flowport.server.errors import Unavailable
from flowport.server.events.bus import BusEvent, EventBus
from flowport.server.storage.events import EventTables

if TYPE_CHECKING:
    from flowport.server.events.redis_bus import RedisBus

log = logging.getLogger(__name__)
# Seconds between tries to write events the store could not take, and how many of them are kept
# (the oldest go first past it: memory is bounded however long the database is away).
RETRY_UNWRITTEN = 1.0
MAX_UNWRITTEN = 100_000

PAGE = 500
# Ids are reserved durably a block at a time, so none is ever handed out
# twice, even after a crash; a restart skips what was left of its block.
ID_BLOCK = 1_000_000
PURGE_INTERVAL = 60.0
# Events of one tenant its resuming streams read back from the log and the Redis stream, a second,
# together, in a process: a replay of the whole log (a million events) by each of a tenant's
# streams would otherwise take every tenant's event loop for as long as its clients read.
REPLAY_RATE = 10_000.0
REPLAY_CHUNK = 500
TENANTS_TRACKED = 65_536


class ReplayBudget:
    """A token bucket per tenant (REPLAY_RATE a second, as many at once): a replay takes a chunk of
    tokens before each chunk of events it sends, and waits when its tenant has spent them."""

    def __init__(self, rate: float = REPLAY_RATE, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # tenant: (tokens, when counted)

    async def take(self, tenant: str, count: int) -> None:
        """Spend `count` of `tenant`'s tokens, waiting until they are there (debt is paid in turn)."""
        now = self._clock()
        tokens, then = self._tokens.get(tenant, (self._rate, now))
        tokens = min(self._rate, tokens + (now - then) * self._rate) - count
        if len(self._tokens) >= TENANTS_TRACKED and tenant not in self._tokens:
            self._tokens.clear()
        self._tokens[tenant] = (tokens, now)
        if tokens < 0:
            await asyncio.sleep(-tokens / self._rate)


class EventLog:
    """Writes the bus's events to the store and reads them back by cursor."""

    def __init__(self, store: EventTables, bus: EventBus, *, retention_count: int, retention_seconds: float) -> None:
        self._store = store
        self._bus = bus
        self._retention_count = retention_count
        self._retention_seconds = retention_seconds
        self._pending: list[BusEvent] = []
        self._scheduled = False
        # Events whose write failed with the store unavailable (its database down), and the events
        # published after them: written again every RETRY_UNWRITTEN seconds, together, by one write
        # at a time (so the log gains ids in order), at most MAX_UNWRITTEN of them kept.
        self._unwritten: list[BusEvent] = []
        self._holding = False  # events wait in _unwritten for the retry, not written as they come
        self._retry_due = False
        self.dropped_unwritten = 0
        self._reserved = 0
        self._purger: asyncio.Task[None] | None = None
        self.replay = ReplayBudget()
        # With Redis, ids come from the stream: nothing to reserve here.
        self._shared = cast("RedisBus", bus) if bus.shared else None

    @classmethod
    async def open(
        cls,
        store: EventTables,
        *,
        queue_size: int,
        retention_count: int,
        retention_seconds: float,
        redis_url: str | None = None,
    ) -> tuple[EventLog, EventBus]:
        """The log and its bus: in-process, with ids after every id ever handed out, or across
        processes through Redis (`redis_url`), with ids from the Redis stream."""
        bus: EventBus
        if redis_url is not None:
            # Loaded only with Redis configured: a default start never imports the client.
            from flowport.server.events.redis_bus import RedisBus

            bus = RedisBus(redis_url, queue_size=queue_size, max_len=retention_count)
            await bus.start()
            reserved = 0
        else:
            last, reserved = await store.reserve_event_ids(ID_BLOCK)
            bus = EventBus(queue_size=queue_size, first_id=last + 1)
        event_log = cls(store, bus, retention_count=retention_count, retention_seconds=retention_seconds)
        event_log._reserved = reserved
        bus.add_listener(event_log.append)
        event_log._purger = asyncio.create_task(event_log._purge_forever())
        return event_log, bus

    def append(self, event: BusEvent) -> None:
        """Bus listener: queue `event` for the next batch write."""
        self._pending.append(event)
        if self._shared is None and int(event.id) > self._reserved - ID_BLOCK // 2:
            # Half the block is left: reserve the next one long before it is needed.
            self._reserved += ID_BLOCK
            self._store.extend_event_ids_soon(self._reserved)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._write_batch)

    def _write_batch(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self._holding:
            # Behind events the store refused: written with them by the retry, ids in order.
            self._keep(batch)
            return
        self._store.append_events_soon(batch, lambda failure: self._written(batch, failure))

    def _written(self, batch: list[BusEvent], failure: BaseException | None) -> None:
        """How a queued batch went: one the store could not take (its database unreachable) is
        kept and written again once it can; another failure (a bug) is logged, and the batch lost."""
        if failure is None:
            return
        if not isinstance(failure, Unavailable):
            log.error("could not write %d events to the event log: %s", len(batch), failure)
            return
        self._keep(batch)
        self._hold()

    def _keep(self, batch: list[BusEvent]) -> None:
        if not self._unwritten and not self._holding:
            log.warning("the event log cannot be written (the store is unavailable); keeping its events to write later")
        self._unwritten.extend(batch)
        if len(self._unwritten) > MAX_UNWRITTEN:
            self._unwritten.sort(key=lambda event: int(event.id))
            gone = len(self._unwritten) - MAX_UNWRITTEN
            del self._unwritten[:gone]
            self.dropped_unwritten += gone
            log.error("the event log lost its %d oldest unwritten events (the store is still unavailable)", gone)

    def _hold(self) -> None:
        """New events wait behind the kept ones; one retry is due after RETRY_UNWRITTEN seconds."""
        self._holding = True
        if not self._retry_due:
            self._retry_due = True
            asyncio.get_running_loop().call_later(RETRY_UNWRITTEN, self._write_unwritten)

    def _write_unwritten(self) -> None:
        self._retry_due = False
        batch, self._unwritten = self._unwritten, []
        if not batch:
            self._holding = False
            return
        self._store.append_events_soon(batch, lambda failure: self._retried(batch, failure), again=True)

    def _retried(self, batch: list[BusEvent], failure: BaseException | None) -> None:
        if failure is None:
            log.warning("the event log took %d events it could not write while the store was away", len(batch))
        else:
            self._written(batch, failure)  # kept again (and held), or logged as lost
            if isinstance(failure, Unavailable):
                return
        if self._unwritten:
            self._hold()  # what came meanwhile, next
        else:
            self._holding = False

    async def flush(self) -> None:
        """Return once every event published so far is committed."""
        again = bool(self._unwritten)
        batch, self._unwritten, self._pending = [*self._unwritten, *self._pending], [], []
        # Writes commit in order, so awaiting this one covers earlier queued ones.
        try:
            await self._store.append_events(batch, again=again)
        except Unavailable:
            self._keep(batch)
            self._hold()
            raise

    async def bounds(self, tenant: str) -> tuple[int, int]:
        """(oldest, newest): a stream of `tenant`'s may resume after any id from oldest-1 to newest
        and miss nothing, since retention has dropped no event of its after oldest-1. Ids have gaps
        (a restart skips ahead), so oldest need not be an id that was handed out."""
        await self.flush()
        purged, newest = await self._store.event_bounds(tenant)
        return purged + 1, max(newest, self._bus.last_id)

    async def history(
        self, tenant: str, after: int, *, session_id: str, workflow_id: str, execution_id: str
    ) -> AsyncIterator[BusEvent]:
        """A tenant's events after `after`, oldest first, until caught up with the bus.

        With Redis, another process logs its events a moment after the stream
        has them, so the log is read together with the tenant's own stream
        (its last minute of events; server/events/redis_bus.py), each event
        once: a replay reads no other tenant's events.
        """
        read = 0
        async for event in self._history(
            tenant, after, session_id=session_id, workflow_id=workflow_id, execution_id=execution_id
        ):
            read += 1
            if read % REPLAY_CHUNK == 0:
                await self.replay.take(tenant, REPLAY_CHUNK)
            yield event
        if read % REPLAY_CHUNK:
            # What is left is charged too: many short replays add up like one long one.
            await self.replay.take(tenant, read % REPLAY_CHUNK)

    async def _history(
        self, tenant: str, after: int, *, session_id: str, workflow_id: str, execution_id: str
    ) -> AsyncIterator[BusEvent]:
        logged = self._logged(tenant, after, session_id=session_id, workflow_id=workflow_id, execution_id=execution_id)
        if self._shared is None:
            async for event in logged:
                yield event
            return
        # The log up to the bus's newest id, with the tenant's own Redis stream for what other
        # processes have not logged yet; each event once. Never past `until`: a live event
        # after it is the subscription's, and must not be taken for one already sent.
        until = self._shared.last_id
        wanted = {"session_id": session_id, "workflow_id": workflow_id, "execution_id": execution_id}
        recent = (
            event
            async for event in self._shared.history(tenant, after, until)
            if all(not v or getattr(event, k) == v for k, v in wanted.items())
        )
        async for event in _merged(_through(logged, until), recent):
            yield event

    async def _logged(
        self, tenant: str, after: int, *, session_id: str, workflow_id: str, execution_id: str
    ) -> AsyncIterator[BusEvent]:
        """A tenant's logged events after `after`, oldest first."""
        while True:
            page = await self._store.read_events(
                tenant,
                after=after,
                limit=PAGE,
                session_id=session_id,
                workflow_id=workflow_id,
                execution_id=execution_id,
            )
            for event in page:
                yield event
            if len(page) < PAGE:
                return
            after = int(page[-1].id)

    async def close(self) -> None:
        """Stop purging and write what is queued."""
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        if self._shared is not None:
            await self._shared.close()  # its last events reach this log's queue
        await self.flush()

    async def purge(self, now: Callable[[], float] = time.time) -> int:
        """Drop each tenant's events beyond the retention count, and every event past its age;
        returns how many."""
        keep_after_us = int((now() - self._retention_seconds) * 1e6)
        return await self._store.purge_events(keep_count=self._retention_count, keep_after_us=keep_after_us)

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            try:
                removed = await self.purge()
            except Exception:
                log.exception("purging the event log failed; will retry")
            else:
                if removed:
                    log.debug("purged %d events past retention", removed)


async def _through(events: AsyncIterator[BusEvent], until: int) -> AsyncIterator[BusEvent]:
    """`events` (ascending ids) up to id `until`."""
    async for event in events:
        if int(event.id) > until:
            return
        yield event


async def _merged(first: AsyncIterator[BusEvent], second: AsyncIterator[BusEvent]) -> AsyncIterator[BusEvent]:
    """Two iterators of ascending ids as one, each id once."""
    a = await anext(first, None)
    b = await anext(second, None)
    while a is not None or b is not None:
        if b is None or (a is not None and int(a.id) <= int(b.id)):
            assert a is not None
            if b is not None and int(b.id) == int(a.id):
                b = await anext(second, None)
            yield a
            a = await anext(first, None)
        else:
            yield b
            b = await anext(second, None)
