"""Event streams that survive a dropped connection.

`events()` follows `StreamEvents` and, when the connection drops (the
server or Envoy restarting: UNAVAILABLE, or the stream ending), opens it
again with `after_id` set to the last event it yielded: the server replays
what was published meanwhile from its event log, so nothing is missed and
nothing repeats. A server that stops ends its streams with a heartbeat
carrying the stream's cursor: a stream that saw no event since it connected
resumes from there too. `watch()` follows `WatchExecution` until the execution
ends; after a reconnect the server sends the execution as it is, then new
events (events already yielded are skipped by id). Heartbeats are dropped.

Reconnects back off from 0.1 s to 5 s; `give_up_after` seconds without a
working connection end the iterator with the last ApiError. The first
failed attempt after a working connection is logged as a warning (logger
`flowport.clients.streams`), so a reader waiting on a silent stream knows
it is reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from flowport.clients.errors import ApiError
from flowport.v1 import event_pb2, execution_pb2

log = logging.getLogger(__name__)

# What a restart looks like from the client: worth reconnecting.
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TERMINAL_EVENTS = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})
FINISHED = (
    execution_pb2.Execution.STATE_SUCCEEDED,
    execution_pb2.Execution.STATE_FAILED,
    execution_pb2.Execution.STATE_CANCELLED,
)


class _Backoff:
    def __init__(self, give_up_after: float) -> None:
        self.give_up_after = give_up_after
        self.delay = 0.1
        self.failing_since: float | None = None

    def failed(self, error: ApiError) -> float:
        """Seconds to wait before the next attempt; raises `error` once it has failed for too long."""
        now = time.monotonic()
        first = self.failing_since is None
        self.failing_since = self.failing_since or now
        if error.code() not in RECONNECT_CODES or now - self.failing_since > self.give_up_after:
            raise error
        if first:
            log.warning(
                "stream interrupted (%s: %s); reconnecting for up to %gs",
                error.code().name,
                error.message,
                self.give_up_after,
            )
        delay, self.delay = self.delay, min(self.delay * 2, 5.0)
        return delay

    def worked(self) -> None:
        self.delay, self.failing_since = 0.1, None

    def ended(self) -> float:
        """Seconds to wait after a stream ended without an error (a server closing it): never a busy loop."""
        delay, self.delay = self.delay, min(self.delay * 2, 5.0)
        return delay


def _after(request: event_pb2.StreamEventsRequest, last_id: str) -> event_pb2.StreamEventsRequest:
    again = event_pb2.StreamEventsRequest()
    again.CopyFrom(request)
    if last_id:
        again.after_id = last_id
    return again


def events(
    stream_events: Callable[..., Any], request: event_pb2.StreamEventsRequest, give_up_after: float = 60.0
) -> Iterator[event_pb2.Event]:
    """Events matching `request`, resumed across reconnects (sync)."""
    backoff, last_id = _Backoff(give_up_after), request.after_id
    while True:
        try:
            for event in stream_events(_after(request, last_id)):
                backoff.worked()
                last_id = event.id or last_id  # a heartbeat's id, when it has one, is the stream's cursor
                if event.type != "heartbeat":
                    yield event
            time.sleep(backoff.ended())
        except ApiError as error:
            time.sleep(backoff.failed(error))


async def aevents(
    stream_events: Callable[..., Any], request: event_pb2.StreamEventsRequest, give_up_after: float = 60.0
) -> AsyncIterator[event_pb2.Event]:
    """Events matching `request`, resumed across reconnects (asyncio)."""
    backoff, last_id = _Backoff(give_up_after), request.after_id
    while True:
        try:
            async for event in stream_events(_after(request, last_id)):
                backoff.worked()
                last_id = event.id or last_id  # a heartbeat's id, when it has one, is the stream's cursor
                if event.type != "heartbeat":
                    yield event
            await asyncio.sleep(backoff.ended())
        except ApiError as error:
            await asyncio.sleep(backoff.failed(error))


def _fresh(update: execution_pb2.WatchExecutionResponse, seen: set[str]) -> bool:
    """Whether to yield `update`: not a heartbeat, not an event yielded before a reconnect (remembered in `seen`)."""
    if not update.HasField("event"):
        return True
    if update.event.type == "heartbeat" or update.event.id in seen:
        return False
    seen.add(update.event.id)
    return True


def _ended(update: execution_pb2.WatchExecutionResponse) -> bool:
    if update.HasField("execution"):
        return update.execution.state in FINISHED
    return update.event.type in TERMINAL_EVENTS


def watch(
    watch_execution: Callable[..., Any], execution_id: str, give_up_after: float = 60.0
) -> Iterator[execution_pb2.WatchExecutionResponse]:
    """An execution's updates until it ends, across reconnects (sync)."""
    backoff, seen = _Backoff(give_up_after), set[str]()
    request = execution_pb2.WatchExecutionRequest(execution_id=execution_id)
    while True:
        try:
            for update in watch_execution(request):
                backoff.worked()
                if not _fresh(update, seen):
                    continue
                yield update
                if _ended(update):
                    return
            time.sleep(backoff.ended())
        except ApiError as error:
            time.sleep(backoff.failed(error))


async def awatch(
    watch_execution: Callable[..., Any], execution_id: str, give_up_after: float = 60.0
) -> AsyncIterator[execution_pb2.WatchExecutionResponse]:
    """An execution's updates until it ends, across reconnects (asyncio)."""
    backoff, seen = _Backoff(give_up_after), set[str]()
    request = execution_pb2.WatchExecutionRequest(execution_id=execution_id)
    while True:
        try:
            async for update in watch_execution(request):
                backoff.worked()
                if not _fresh(update, seen):
                    continue
                yield update
                if _ended(update):
                    return
            await asyncio.sleep(backoff.ended())
        except ApiError as error:
            await asyncio.sleep(backoff.failed(error))
