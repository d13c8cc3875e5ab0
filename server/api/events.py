"""EventService: resumable event streams (the seed's WebSocket and SSE).

A stream replays the logged events after its cursor (the `last-event-id`
header an SSE client sends on a reconnect, else `after_id`), then follows
new events as they are published. It starts with a heartbeat (so headers
reach the client at once) and beats while idle. The subscription starts
before the replay, so no event falls between the two; ids already sent are
skipped. A subscriber that falls more than its queue behind is cut with
ABORTED (reason SUBSCRIBER_TOO_SLOW, metadata last_event_id) and resumes
with `after_id`; the other subscribers never wait for it. A server shutting
down ends its streams with OK after a heartbeat whose `id` is the stream's
cursor (the last id it passed), for the client to resume from elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from flowport.server.api.recent_events import list_recent_events
from flowport.server.api.sessions import VisibleSessions, check_session, session_scope
from flowport.server.errors import Aborted, InvalidArgument, OutOfRange, shown
from flowport.server.events.bus import BusEvent, EventBus, StreamsEnded, SubscriberOverflow
from flowport.server.events.kailash import Selection
from flowport.server.events.log import EventLog
from flowport.server.events.types import requested_types
from flowport.server.storage.sql_store import SqlStore
from flowport.server.tenancy import tenant_of
from flowport.server.transcoding import stream_transport
from flowport.server.types import Context
from flowport.v1 import event_pb2, event_pb2_grpc

LAST_EVENT_ID = "last-event-id"
HEARTBEAT = "heartbeat"
# Event ids are positive 64-bit integers.
MAX_ID_DIGITS = 19
MAX_ID = 2**63 - 1


def _cursor(request: event_pb2.StreamEventsRequest, context: Context) -> int | None:
    # Last-Event-ID first: an EventSource sends it on a reconnect to the same
    # URL, whose after_id (if any) is where the first connection started.
    raw, field = "", LAST_EVENT_ID
    for key, value in context.invocation_metadata() or ():
        if key == LAST_EVENT_ID and isinstance(value, str):
            raw = value.strip()
    if not raw:
        raw, field = request.after_id, "after_id"
    if not raw:
        return None
    # ASCII digits only ("²".isdigit() is true), at most 19 of them, so int() never fails;
    # within a 64-bit id, so the stores' BIGINT comparisons never overflow.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= MAX_ID_DIGITS and int(raw) <= MAX_ID):
        raise InvalidArgument(
            f"{field} {shown(raw)} is not an event id", violations=[(field, "an event id from this server")]
        )
    return int(raw)


def event_filter(request: event_pb2.StreamEventsRequest, context: Context) -> Selection:
    """The types the request asks for (none: every type), Kailash names as copies of flowport's events.

    A browser EventSource that names no types (the Kailash examples' progress bar) also gets the
    Kailash-named copies; gRPC and NDJSON streams get them only by name."""
    return Selection.of(requested_types(request), default_copies=stream_transport(context) == "sse")


def _heartbeat(cursor: int = 0) -> event_pb2.Event:
    heartbeat = event_pb2.Event(type=HEARTBEAT, id=str(cursor) if cursor else "")
    heartbeat.time.GetCurrentTime()
    return heartbeat


class EventService(event_pb2_grpc.EventServiceServicer):
    """Streams of the gateway's events, per tenant, resumable by id."""

    def __init__(self, bus: EventBus, event_log: EventLog, heartbeat: float, store: SqlStore) -> None:
        self._bus = bus
        self._log = event_log
        self._heartbeat = heartbeat
        self._store = store

    async def ListRecentEvents(
        self, request: event_pb2.ListRecentEventsRequest, context: Context
    ) -> event_pb2.ListRecentEventsResponse:
        return await list_recent_events(self._store, self._log, request, context)

    async def StreamEvents(
        self, request: event_pb2.StreamEventsRequest, context: Context
    ) -> AsyncIterator[event_pb2.Event]:
        tenant = tenant_of(context)
        after = _cursor(request, context)
        types = event_filter(request, context)
        # Other credentials' sessions' events are left out for a caller without the admin role.
        sessions = VisibleSessions(self._store, context)
        if request.session_id and session_scope(context) is not None:
            # Another credential's session is as missing here as in GetSession.
            await check_session(self._store, context, request.session_id)
            sessions.grant(request.session_id)

        def accept(event: BusEvent) -> bool:
            return (
                event.tenant == tenant
                and (not request.session_id or event.session_id == request.session_id)
                and (not request.workflow_id or event.workflow_id == request.workflow_id)
                and (not request.execution_id or event.execution_id == request.execution_id)
                and types.hears(event.type)
            )

        subscription = self._bus.subscribe(accept, client_stream=True, tenant=tenant)
        sent = self._bus.last_id if after is None else after
        try:
            if after is not None:
                oldest, newest = await self._log.bounds(tenant)
                if after < oldest - 1 or after > newest:
                    raise OutOfRange(
                        f"event id {after} is outside the retained log ({oldest - 1}..{newest}); "
                        "start again without after_id",
                        reason="CURSOR_OUT_OF_RANGE",
                        metadata={"oldest_event_id": str(oldest), "newest_event_id": str(newest)},
                    )
            # Open: a first heartbeat now carries the response headers (and
            # through Envoy the first bytes) to a client waiting on a quiet stream.
            yield _heartbeat()
            if after is not None:
                while True:
                    async for logged in self._log.history(
                        tenant,
                        sent,
                        session_id=request.session_id,
                        workflow_id=request.workflow_id,
                        execution_id=request.execution_id,
                    ):
                        if accept(logged) and await sessions.allows(logged.session_id):
                            for view in types.views(logged):
                                yield view.to_proto()
                        sent = int(logged.id)
                    if not subscription.overflowed:
                        break
                    # The replay was long enough to overflow the live queue:
                    # subscribe afresh and replay what was published meanwhile.
                    subscription = self._bus.subscribe(accept, client_stream=True, tenant=tenant)
                    await self._log.flush()
            while True:
                event = await subscription.next(self._heartbeat)
                if event is None:
                    yield _heartbeat()
                    continue
                if int(event.id) <= sent:
                    continue
                if await sessions.allows(event.session_id):
                    for view in types.views(event):
                        yield view.to_proto()
                sent = int(event.id)
        except StreamsEnded:
            # This server is shutting down: the stream ends cleanly (OK) with a heartbeat carrying
            # its cursor, the last id it has passed, so a client that saw no event since it
            # connected still resumes (on another server) where this stream stood.
            yield _heartbeat(sent)
        except SubscriberOverflow:
            raise Aborted(
                f"the stream fell behind by more than its queue; resume with after_id={sent}",
                reason="SUBSCRIBER_TOO_SLOW",
                metadata={"last_event_id": str(sent)},
            ) from None
        finally:
            subscription.close()
