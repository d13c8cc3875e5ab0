"""The in-process event bus: publish never blocks, subscribers never slow
each other down.

Every state change is published here as a `flowport.v1.Event`. Each
subscriber has a bounded queue; a subscriber whose queue is full is cut off
(its iterator raises `SubscriberOverflow`) instead of making the publisher
wait. Ids increase by one per event; the event log (`events/log.py`) is a
listener that writes every event to the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from google.protobuf import struct_pb2

from flowport.v1 import event_pb2


@dataclass(frozen=True, slots=True)
class BusEvent:
    """An event as the bus carries it: plain fields, turned into a
    `flowport.v1.Event` only for a subscriber that receives it."""

    id: str
    type: str
    time_ns: int
    tenant: str
    session_id: str = ""
    workflow_id: str = ""
    execution_id: str = ""
    data: dict[str, Any] | None = None
    # Only on Kailash-named copies (events/kailash.py).
    progress: float | None = None
    error: str | None = None
    # What is made of the event once for all its subscribers (its wire form, its Kailash copies):
    # one tenant's hundreds of streams each built their own, all on the event loop.
    made: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    def to_proto(self) -> event_pb2.Event:
        """The wire form, made once: shared by every stream that sends it, so never changed."""
        proto = self.made.get("proto")
        if proto is None:
            proto = self.made["proto"] = self._proto()
        return proto

    def _proto(self) -> event_pb2.Event:
        event = event_pb2.Event(
            id=self.id,
            type=self.type,
            tenant=self.tenant,
            session_id=self.session_id,
            workflow_id=self.workflow_id,
            execution_id=self.execution_id,
            data=struct_pb2.Struct(),
        )
        event.time.FromNanoseconds(self.time_ns)
        if self.data:
            event.data.update(self.data)
        if self.progress is not None:
            event.progress = self.progress
        if self.error is not None:
            event.error = self.error
        return event


Filter = Callable[[BusEvent], bool]


class SubscriberOverflow(Exception):
    """The subscriber fell behind by more than its queue and was cut off."""


class StreamsEnded(Exception):
    """The server is shutting down: a stream reading this subscription ends cleanly (OK), and its
    client resumes by id on another server."""


class Subscription:
    """One subscriber's view of the bus; iterate it with `async for`."""

    def __init__(
        self, bus: EventBus, accept: Filter, size: int, *, client_stream: bool = False, tenant: str | None = None
    ) -> None:
        self._bus = bus
        self.accept = accept
        # Offered only that tenant's events (None: every event, for `accept` to choose from).
        self.tenant = tenant
        # A client's stream (ended at shutdown), not the server's own follower of some events.
        self.client_stream = client_stream
        self.queue: asyncio.Queue[BusEvent | None] = asyncio.Queue(size)
        self.overflowed = False
        self.ended = False

    def offer(self, event: BusEvent) -> None:
        if self.overflowed or self.ended:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._bus.unsubscribe(self)
            self._wake()

    def end(self) -> None:
        """Make the reader's next `next()` raise StreamsEnded (events still queued are left to the resume)."""
        self.ended = True
        self._bus.unsubscribe(self)
        self._wake()

    def _wake(self) -> None:
        # A None in the queue wakes a reader waiting in next() at once.
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    def close(self) -> None:
        """Stop receiving events."""
        self._bus.unsubscribe(self)

    async def next(self, timeout: float | None = None) -> BusEvent | None:
        """The next event, or None when `timeout` passes first (then call again)."""
        if self.ended:
            raise StreamsEnded("the server is shutting down")
        try:
            event = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None
        if self.ended:
            raise StreamsEnded("the server is shutting down")
        if event is None:
            raise SubscriberOverflow("subscriber fell behind and was disconnected")
        return event

    def __aiter__(self) -> AsyncIterator[BusEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[BusEvent]:
        while True:
            event = await self.next()
            assert event is not None  # no timeout given
            yield event


class EventBus:
    """Fan-out of events to the subscribers whose filter accepts them."""

    # Whether events cross processes (RedisBus): this one is the process's own.
    shared: ClassVar[bool] = False

    def __init__(self, queue_size: int = 1024, first_id: int = 1) -> None:
        self._queue_size = queue_size
        self.last_id = first_id - 1
        # Subscribers to every tenant's events, and to one tenant's: an event is tested against the
        # first and its own tenant's, so one tenant's many streams cost other tenants' events nothing.
        self._subscribers: list[Subscription] = []
        self._tenant_subscribers: dict[str, list[Subscription]] = {}
        self._listeners: list[Callable[[BusEvent], None]] = []
        self.published = 0
        # Set by end_streams(): the server is shutting down, streams end as they (re)subscribe.
        self.streams_ended = False

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
        """Stamp and deliver an event; returns it. Never waits."""
        self.last_id += 1
        event = BusEvent(str(self.last_id), type_, time.time_ns(), tenant, session_id, workflow_id, execution_id, data)
        self.published += 1
        for listener in self._listeners:
            listener(event)
        self._deliver(event)
        return event

    def _deliver(self, event: BusEvent) -> None:
        """Offer `event` to every subscriber whose filter accepts it."""
        # Copies: a subscriber that overflows removes itself meanwhile.
        for subscriber in tuple(self._subscribers):
            if subscriber.accept(event):
                subscriber.offer(event)
        for subscriber in tuple(self._tenant_subscribers.get(event.tenant, ())):
            if subscriber.accept(event):
                subscriber.offer(event)

    def add_listener(self, listener: Callable[[BusEvent], None]) -> None:
        """Call `listener` with every event, in order, as it is published.

        For the event log and webhook fan-out: a listener must not block or
        raise (queue the work and return).
        """
        self._listeners.append(listener)

    def subscribe(
        self, accept: Filter, size: int | None = None, *, client_stream: bool = False, tenant: str | None = None
    ) -> Subscription:
        """A new subscriber receiving events that `accept` approves, from now on (of `tenant` only,
        when given).

        `client_stream`: it feeds a client's stream, which end_streams() ends at shutdown."""
        subscription = Subscription(self, accept, size or self._queue_size, client_stream=client_stream, tenant=tenant)
        if client_stream and self.streams_ended:
            subscription.ended = True
        elif tenant is None:
            self._subscribers.append(subscription)
        else:
            self._tenant_subscribers.setdefault(tenant, []).append(subscription)
        return subscription

    def end_streams(self) -> int:
        """End every client stream's subscription, and those made from now on (StreamsEnded): the
        server is shutting down and its streams close cleanly, for their clients to resume elsewhere
        by id. The server's own subscribers and listeners (the event log, webhooks, executions
        waited for) keep receiving events. Returns how many ended."""
        self.streams_ended = True
        every = [*self._subscribers, *(s for group in self._tenant_subscribers.values() for s in group)]
        ending = [s for s in every if s.client_stream]
        for subscription in ending:
            subscription.end()
        return len(ending)

    def unsubscribe(self, subscription: Subscription) -> None:
        """Remove a subscriber (idempotent)."""
        tenant = subscription.tenant
        group = self._subscribers if tenant is None else self._tenant_subscribers.get(tenant, [])
        if subscription in group:
            group.remove(subscription)
            if tenant is not None and not group:
                del self._tenant_subscribers[tenant]

    @property
    def subscriber_count(self) -> int:
        """Subscribers connected now."""
        return len(self._subscribers) + sum(len(group) for group in self._tenant_subscribers.values())
