"""The event bus across processes: one Redis stream, read by every process.

`publish()` still never waits: the event is queued, and a sender task adds
queued events to the stream in one command (a script). Redis orders them:
an event's id is its stream entry's id (`<ms>-<seq>`, as one integer
`ms * 100000 + seq`), so ids increase across every process and a stream
resumed by id on any process misses nothing and repeats nothing. Once an
event has its id, the publishing process alone runs the listeners (the event
log, webhook fan-out), so each event is logged and delivered to webhooks
once. Every process (the publisher too) reads the stream and hands each
event to its own subscribers.

Each event is also added to its tenant's own stream, with the same id, for
TENANT_WINDOW_MS: a resuming stream reads its tenant's recent events there
and older ones from the event log (server/events/log.py), so a replay never
reads other tenants' events. A tenant's stream goes once it is idle for
twice that window.

When Redis cannot be reached, publishing goes on: events get provisional
ids from the clock (above any id Redis gave before, so streams stay in
order), go to the listeners and to this process's subscribers only, and
`degraded` is set, which the health check reports. The reader retries and
picks a restarted Redis up again without a restart of flowport.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from flowport.server.events.bus import BusEvent, EventBus

log = logging.getLogger(__name__)

STREAM = "flowport:events"
TENANT_STREAM = "flowport:events:tenant:"  # + the tenant
# A tenant's own stream keeps this much of its newest events, by their ids' time (Redis's clock):
# long past the moment each is in the event log, which has the older ones. A resume misses an event
# only if the process that published it has not logged it this long after (its store stalled).
TENANT_WINDOW_MS = 60_000
SEQUENCE = 100_000  # an id is ms * SEQUENCE + the entry's sequence number in that ms
READ_BLOCK_MS = 1000
READ_COUNT = 500
ADD_BATCH_MAX = 500
# At most one command adding events, and one reading them, per this many seconds (plus the
# command's own round trip): events wait that long to share a command, since a command costs
# this process far more than the events in it (redis-py's per-command work; benchmarks/RESULTS.md).
SEND_DELAY = 0.005
READ_DELAY = 0.005
RETRY_DELAY = 0.5
TIMEOUT = 2.0
CLOSE_TIMEOUT = 3.0
_FAILURES = (RedisError, OSError, TimeoutError)
# A batch of events added in one command (one reply to parse, not one per
# event). KEYS[1]: the stream; KEYS[2...]: the batch's tenants' streams.
# ARGV[1]: the stream's approximate length cap; ARGV[2]: the publishing
# process; ARGV[3]: how many ms of ids the tenants' streams keep (counted
# from each new id, Redis's clock, never the process's); ARGV[4]: their time
# to live, in ms; ARGV[5...]: each event as the index of its tenant's key in
# KEYS, then the event as _encode makes it. The tenant's copy is added with
# pcall: it can fail only on an id its stream has passed, and must not stop
# the batch, whose events the stream has in any case.
_ADD_BATCH = """
local ids = {}
for i = 5, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i + 1], 'o', ARGV[2])
  ids[#ids + 1] = id
  local oldest = (tonumber(string.match(id, '^%d+')) - tonumber(ARGV[3])) .. '-0'
  redis.pcall('XADD', KEYS[tonumber(ARGV[i])], 'MINID', '~', oldest, id, 'e', ARGV[i + 1])
end
for k = 2, #KEYS do
  redis.call('PEXPIRE', KEYS[k], ARGV[4])
end
return ids
"""


def event_id(stream_id: bytes | str) -> int:
    """The integer id of a stream entry id."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms) * SEQUENCE + int(seq or 0)


def stream_id(event: int) -> str:
    """The stream entry id of an integer id."""
    return f"{event // SEQUENCE}-{event % SEQUENCE}"


def _encode(event: BusEvent) -> bytes:
    """The `e` field of an event's stream entry (its `o` field names the process that published it)."""
    fields = [event.type, event.time_ns, event.tenant, event.session_id, event.workflow_id, event.execution_id]
    return orjson.dumps([*fields, event.data])


def _decode(entry_id: bytes, fields: dict[bytes, bytes]) -> BusEvent:
    type_, time_ns, tenant, session_id, workflow_id, execution_id, data = orjson.loads(fields[b"e"])
    return BusEvent(str(event_id(entry_id)), type_, time_ns, tenant, session_id, workflow_id, execution_id, data)


class RedisBus(EventBus):
    """An EventBus whose events reach the subscribers of every process sharing a Redis."""

    shared = True

    def __init__(self, url: str, *, queue_size: int = 1024, max_len: int = 100_000) -> None:
        super().__init__(queue_size=queue_size, first_id=1)
        # Typed Any: redis-py's reply types are unions of every encoding it might use.
        self._redis: Any = aioredis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        self._max_len = max_len
        self._add_batch = self._redis.register_script(_ADD_BATCH)
        self._origin = os.urandom(8).hex()
        self._outbox: list[BusEvent] = []
        self._sender: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        # Provisional ids (Redis down) differ between processes by this salt.
        self._salt = secrets.randbelow(500) * 100
        self._provisional = 0
        self._closing = False
        self.degraded = False

    async def start(self) -> None:
        """Begin reading the stream from its end: subscribers get what is published from now on.

        The reader always reads after a fixed entry id, never after "$": "$" means the end at the
        time of each read, so what another process added between two reads (while this one waits
        to retry a Redis that was away, say) would be skipped.
        """
        position: str | None = None
        try:
            position = await self._end()
        except _FAILURES as exc:
            # Found on the first read that reaches Redis: nothing before it could be delivered.
            self._failed("reading the event stream's end", exc)
        self._reader = asyncio.create_task(self._read_forever(position), name="redis event reader")

    async def _end(self) -> str:
        """The id of the stream's newest entry, to read after; "0-0" for an empty (or new) stream,
        everything added to which is new."""
        newest = await self._redis.xrevrange(STREAM, count=1)
        if not newest:
            return "0-0"
        position = str(newest[0][0].decode())
        self.last_id = max(self.last_id, event_id(position))
        return position

    async def close(self) -> None:
        """Send what is queued, stop reading, disconnect (each step bounded: Redis may be gone)."""
        self._closing = True
        if self._sender is not None:
            await asyncio.wait({self._sender}, timeout=CLOSE_TIMEOUT)
        if self._outbox and (self._sender is None or self._sender.done()):
            await asyncio.wait({asyncio.create_task(self._send())}, timeout=CLOSE_TIMEOUT)
        if self._reader is not None:
            # redis-py may turn the cancellation of a blocked read into a
            # connection error; the loop checks _closing, and the wait is bounded.
            self._reader.cancel()
            done, _ = await asyncio.wait({self._reader}, timeout=CLOSE_TIMEOUT)
            if not done:
                log.warning("the Redis event reader did not stop within %g s", CLOSE_TIMEOUT)
        with contextlib.suppress(*_FAILURES):
            await asyncio.wait_for(self._redis.aclose(), CLOSE_TIMEOUT)

    async def ping(self) -> None:
        """Raises unless Redis answers (the health check's `bus`)."""
        await self._redis.ping()

    def publish(
        self,
        type_: str,
        *,
        tenant: str,
        session_id: str = "",
        workflow_id: str = "",
        execution_id: str = "",
        data: dict[str, Any] | None = None,
    ) -> BusEvent:
        """Queue an event for the stream; its id is set once Redis has ordered it. Never waits."""
        event = BusEvent("", type_, time.time_ns(), tenant, session_id, workflow_id, execution_id, data)
        self.published += 1
        self._outbox.append(event)
        if self._sender is None or self._sender.done():
            # Its own context: a batch carries many publishers' events.
            self._sender = asyncio.get_running_loop().create_task(self._send(), context=contextvars.Context())
        return event

    async def _send(self) -> None:
        # Each round first waits SEND_DELAY: events published meanwhile (while the last
        # command was under way too) share the next command.
        while True:
            await asyncio.sleep(SEND_DELAY)
            if not self._outbox:
                return
            batch, self._outbox = self._outbox, []
            stamped: list[BusEvent] = []
            try:
                for start in range(0, len(batch), ADD_BATCH_MAX):
                    # Bounded: Redis runs a script to its end before any other command.
                    part = batch[start : start + ADD_BATCH_MAX]
                    keys, args = self._batch_arguments(part)
                    ids = await self._add_batch(keys=keys, args=args)
                    stamped += [replace(event, id=str(event_id(i))) for event, i in zip(part, ids, strict=True)]
            except _FAILURES as exc:
                self._failed("publishing events", exc)
                # What Redis did not take: the reader will not see these.
                unsent = [replace(event, id=str(self._provisional_id())) for event in batch[len(stamped) :]]
                for event in unsent:
                    self._deliver(event)
                stamped += unsent
            else:
                self._recovered()
            for event in stamped:
                for listener in self._listeners:
                    listener(event)

    def _batch_arguments(self, part: list[BusEvent]) -> tuple[list[str], list[bytes | int | str]]:
        """_ADD_BATCH's keys and arguments for `part`."""
        keys = [STREAM]
        position: dict[str, int] = {}
        args: list[bytes | int | str] = [self._max_len, self._origin, TENANT_WINDOW_MS, 2 * TENANT_WINDOW_MS]
        for event in part:
            index = position.get(event.tenant)
            if index is None:
                keys.append(TENANT_STREAM + event.tenant)
                index = position[event.tenant] = len(keys)  # KEYS counts from 1
            args += [index, _encode(event)]
        return keys, args

    def _provisional_id(self) -> int:
        # Above every id seen, and time-based like Redis's own, so that ids
        # keep increasing when Redis comes back (an empty one starts at now).
        self._provisional = (self._provisional + 1) % 100
        floor = time.time_ns() // 1_000_000 * SEQUENCE + 50_000 + self._salt + self._provisional
        self.last_id = max(self.last_id + 1, floor)
        return self.last_id

    async def _read_forever(self, position: str | None) -> None:
        while not self._closing:
            try:
                if position is None:
                    position = await self._end()
                replies = await self._redis.xread({STREAM: position}, count=READ_COUNT, block=READ_BLOCK_MS)
            except _FAILURES as exc:
                # Retried from the last entry seen: a restarted Redis is empty
                # and numbers entries from the clock, so later than that.
                self._failed("reading events", exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            self._recovered()
            for _stream, entries in replies or ():
                for entry_id, fields in entries:
                    position = entry_id.decode()
                    try:
                        event = _decode(entry_id, fields)
                    except (KeyError, ValueError, TypeError) as exc:
                        log.warning("skipped a malformed event %s in %s: %s", position, STREAM, exc)
                        continue
                    self._deliver(event)
            if replies and sum(len(entries) for _stream, entries in replies) < READ_COUNT:
                # What is added meanwhile comes with the next read, not a read each (a full read
                # means more is waiting: read on at once, so the reader keeps up with the stream).
                await asyncio.sleep(READ_DELAY)

    def _deliver(self, event: BusEvent) -> None:
        self.last_id = max(self.last_id, int(event.id))
        super()._deliver(event)

    async def history(self, tenant: str, after: int, until: int) -> AsyncIterator[BusEvent]:
        """`tenant`'s events with ids in (after, until] that its own stream still keeps (its last
        TENANT_WINDOW_MS or so), oldest first."""
        start = "(" + stream_id(after)
        while True:
            entries = await self._redis.xrange(
                TENANT_STREAM + tenant, min=start, max=stream_id(until), count=READ_COUNT
            )
            for entry_id, fields in entries:
                yield _decode(entry_id, fields)
            if len(entries) < READ_COUNT:
                return
            start = "(" + entries[-1][0].decode()

    def _failed(self, doing: str, exc: BaseException) -> None:
        if not self.degraded:
            log.warning("event bus degraded: Redis unavailable while %s (%s: %s)", doing, type(exc).__name__, exc)
        self.degraded = True

    def _recovered(self) -> None:
        if self.degraded:
            log.warning("event bus recovered: Redis answers again")
        self.degraded = False
