"""Who and what the code running now serves, for log lines and spans.

The interceptor sets `CALL` for each RPC and the executor sets `EXECUTION`
for each execution's task; both are context variables, so a value set for
one call or execution never leaks into another. Nothing is computed when
they are set: the request id and trace id are read from the call's metadata
only when a log line is written (`request_id`, `traceparent_trace_id`), so
a call that logs nothing pays one context-variable set.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
_TRACEPARENT = re.compile(r"\A[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}\Z")
MAX_REQUEST_ID = 128


@dataclass
class Call:
    """The RPC being handled: its method and grpc.aio context.

    `open` turns False when the call ends: a task the call started (an
    execution) inherits this object, and a finished call's context must
    not be read again (grpc frees what it points to).
    """

    method: str
    context: Any
    open: bool = True


@dataclass(frozen=True)
class Execution:
    """The execution being run, and the request id of the call that started it."""

    tenant: str
    execution_id: str
    request_id: str | None = None


CALL: ContextVar[Call | None] = ContextVar("flowport_call", default=None)
EXECUTION: ContextVar[Execution | None] = ContextVar("flowport_execution", default=None)


def open_call(method: str, context: Any) -> Call:
    """A Call for `context`, closed the moment grpc finishes it (cancelled calls included)."""
    call = Call(method, context)

    def closed(_: object) -> None:
        call.open = False

    context.add_done_callback(closed)
    return call


def _metadata(call: Call, key: str) -> str | None:
    if not call.open:
        return None
    try:
        if call.context.done():
            call.open = False
            return None
        pairs = call.context.invocation_metadata() or ()
    except Exception:  # noqa: BLE001 - a finished call's context may refuse; a log line must not fail
        return None
    for name, value in pairs:
        if name == key and isinstance(value, str):
            return value
    return None


def request_id(call: Call) -> str | None:
    """The call's `x-request-id` (Envoy sets one on every request it forwards; gRPC clients may)."""
    value = _metadata(call, REQUEST_ID_HEADER)
    return value[:MAX_REQUEST_ID] if value else None


def traceparent_trace_id(call: Call) -> str | None:
    """The trace id of the call's W3C `traceparent`, when it carries a valid one."""
    value = _metadata(call, "traceparent")
    match = _TRACEPARENT.match(value.strip().lower()) if value else None
    return match.group(1) if match and match.group(1) != "0" * 32 else None
