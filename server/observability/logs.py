"""Log lines operators can search: one JSON object per line, with the call's context.

`configure(level, fmt)` installs one handler on the root logger (stderr).
`json` writes objects like

    {"time": "2026-11-26T11:39:32.123Z", "level": "ERROR", "logger": "flowport.server.interceptor",
     "message": "unhandled error in … (incident 3f…)", "request_id": "…", "tenant": "acme",
     "rpc": "/flowport.v1.ExecutionService/CreateExecution", "execution_id": "exe_…", "trace_id": "…"}

and `text` the same fields after the message, for people at a terminal;
`auto` is text on a terminal and JSON otherwise. The context fields appear
when there is a value: `request_id` is the call's `x-request-id` (Envoy
gives every request one), `tenant` the caller's or the execution's,
`trace_id` the active span's or, with tracing off, the caller's W3C
`traceparent`.

Secrets are never logged: nothing in flowport logs a credential, request
bodies or node parameters, and while a node holds revealed secret values
every record is scrubbed of them when it is made (server/secrets/redaction.py),
whichever library logs it.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar
from typing import IO, Any, Final

from pythonjsonlogger.orjson import OrjsonFormatter

from flowport.server.auth.context import CURRENT
from flowport.server.observability import tracing
from flowport.server.observability.context import CALL, EXECUTION, request_id, traceparent_trace_id

LOG_FORMATS: Final = ("auto", "json", "text")
CONTEXT_FIELDS: Final = ("request_id", "tenant", "rpc", "execution_id", "trace_id")
# Libraries whose DEBUG lines are wire traffic (headers included): kept at INFO at most.
_CHATTY: Final = ("hpack", "httpcore", "grpc._cython", "asyncio", "aiosqlite")
# Libraries that log each request they make at INFO (httpx: GetStats reads Envoy's admin on every
# call, nodes and webhooks make many): kept at WARNING.
_PER_REQUEST: Final = ("httpx",)


# Set while the filter runs: a library logging from inside it (grpc does, when
# metadata will not decode) must not bring it back in.
_FILTERING: ContextVar[bool] = ContextVar("flowport_log_filtering", default=False)


class ContextFilter(logging.Filter):
    """Adds the context fields to every record that passes through the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _FILTERING.get():
            return True
        token = _FILTERING.set(True)
        try:
            self._add(record)
        finally:
            _FILTERING.reset(token)
        return True

    @staticmethod
    def _add(record: logging.LogRecord) -> None:
        call = CALL.get()
        execution = EXECUTION.get()
        principal = CURRENT.get()
        values: dict[str, Any] = {
            "request_id": (request_id(call) if call is not None else None)
            or (execution.request_id if execution is not None else None),
            "tenant": principal.tenant if principal is not None else execution.tenant if execution else None,
            "rpc": call.method if call is not None else None,
            "execution_id": execution.execution_id if execution is not None else None,
            "trace_id": tracing.current_trace_id() or (traceparent_trace_id(call) if call is not None else None),
        }
        for name, value in values.items():
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)


class _JsonFormatter(OrjsonFormatter):
    """JSON lines with UTC millisecond timestamps and fixed key names."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class _TextFormatter(logging.Formatter):
    """The classic line, then the context fields that have a value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name))
        return f"{line} [{extra}]" if extra else line


def formatter(fmt: str, stream: IO[str]) -> logging.Formatter:
    """The formatter for `fmt` ('auto' decides by whether `stream` is a terminal)."""
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    if fmt == "json":
        return _JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "exc_info": "exception"},
        )
    return _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure(level: str, fmt: str = "auto", stream: IO[str] | None = None) -> logging.Handler:
    """Route every logger to one handler on `stream` (stderr) in `fmt`, at `level`; returns the handler."""
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    handler.setFormatter(formatter(fmt, target))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    for name in _PER_REQUEST:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler
