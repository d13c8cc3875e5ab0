"""Errors in the middle of a stream, for HTTP/1.1 clients.

Once a transcoded stream (SSE or NDJSON) has sent its first event, its HTTP
status is already 200 and HTTP/1.1 has no trailers to carry a gRPC status.
So for REST callers the server ends such a stream with one last message, an
event of type `error` whose data is the `google.rpc.Status` fields (`code`,
`message`, `reason`), and closes it normally. Native gRPC callers get the
status itself. A stream that fails before its first message answers with
the error's HTTP status and JSON body, like a unary call.
"""

from __future__ import annotations

from google.protobuf.message import Message

from flowport.server.errors import FlowportError
from flowport.v1 import event_pb2, execution_pb2

ERROR_EVENT = "error"


def _error_event(error: FlowportError) -> event_pb2.Event:
    event = event_pb2.Event(type=ERROR_EVENT)
    event.time.GetCurrentTime()
    event.data.update({"code": error.code.value[0], "message": error.message, "reason": error.reason})
    return event


def in_band_error(message_type: type[Message], error: FlowportError) -> Message | None:
    """The last message of a REST stream of `message_type` that failed with `error`."""
    if message_type is event_pb2.Event:
        return _error_event(error)
    if message_type is execution_pb2.WatchExecutionResponse:
        return execution_pb2.WatchExecutionResponse(event=_error_event(error))
    return None
