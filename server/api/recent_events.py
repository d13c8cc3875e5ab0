"""EventService.ListRecentEvents: the newest logged events a caller may see (Kailash's
`GET /api/events/recent`).

Read from the event log, newest first, with StreamEvents' filters and visibility: the ids
filter in the store, types (families, Kailash names) and other credentials' sessions here.
Type filters can skip most rows, so one call reads at most MAX_SCANNED of them and hands
back a token to go on from there; the rows read are charged to the tenant's replay budget
(events/log.py), which its resuming streams share.
"""

from __future__ import annotations

from flowport.server import pagination
from flowport.server.api.sessions import VisibleSessions, check_named_session, session_scope
from flowport.server.errors import InvalidArgument
from flowport.server.events.kailash import Selection
from flowport.server.events.log import EventLog
from flowport.server.events.types import requested_types
from flowport.server.storage.sql_store import SqlStore
from flowport.server.tenancy import tenant_of
from flowport.server.types import Context
from flowport.v1 import event_pb2

DEFAULT_SIZE = 100  # Kailash's default `count`
MAX_SIZE = 500
READ = 500  # rows per store read
MAX_SCANNED = 5000  # rows one call reads at most


def _size(request: event_pb2.ListRecentEventsRequest) -> int:
    asked = [n for n in (request.page_size, request.count) if n]
    for field in ("page_size", "count"):
        if getattr(request, field) < 0:
            raise InvalidArgument(f"{field} must not be negative", violations=[(field, ">= 0")])
    return min([*asked, MAX_SIZE]) if asked else DEFAULT_SIZE


async def list_recent_events(
    store: SqlStore, log: EventLog, request: event_pb2.ListRecentEventsRequest, context: Context
) -> event_pb2.ListRecentEventsResponse:
    """The answer to ListRecentEvents; NOT_FOUND for a session the caller may not see."""
    size = _size(request)
    types = requested_types(request)
    filters = {
        "session_id": request.session_id,
        "workflow_id": request.workflow_id,
        "execution_id": request.execution_id,
        "types": types,
    }
    before = pagination.cursor_int(pagination.decode_token(request.page_token, filters))
    if request.session_id:
        # A session that ended still has its events: named, it must be one the caller may see.
        await check_named_session(store, context, request.session_id)
    selection = Selection.of(types)
    sessions = VisibleSessions(store, context)
    if request.session_id and session_scope(context) is not None:
        sessions.grant(request.session_id)
    await log.flush()  # this process's newest events, still queued for the log
    tenant = tenant_of(context)
    events: list[event_pb2.Event] = []
    scanned = 0
    last: int | None = None  # the id of the newest event not looked at yet is below this
    exhausted = False
    while len(events) < size and scanned < MAX_SCANNED:
        rows = await store.read_recent_events(
            tenant,
            before=before,
            limit=READ,
            session_id=request.session_id,
            workflow_id=request.workflow_id,
            execution_id=request.execution_id,
        )
        # The rows read count toward the tenant's replay budget, as a resuming stream's do: a loop
        # of these calls over a filter few events match read 5,000 rows each.
        await log.replay.take(tenant, len(rows))
        for row in rows:
            views = selection.views(row) if selection.hears(row.type) else []
            if views and await sessions.allows(row.session_id):
                if events and len(events) + len(views) > size:
                    break  # this event starts the next page
                events.extend(view.to_proto() for view in views)
            scanned += 1
            last = int(row.id)
            if len(events) >= size:
                break
        else:
            if len(rows) < READ:
                exhausted = True
                break
            before = last
            continue
        break
    token = "" if exhausted or last is None else pagination.encode_token([last], filters)
    return event_pb2.ListRecentEventsResponse(events=events, next_page_token=token, total=len(events))
