"""The server interceptor: maps FlowportError to google.rpc.Status, once.

It is the one place every call passes through, so it also counts calls
(GetStats, per process and per tenant; Prometheus), opens the call's span
when tracing is on, sets the call's log context, writes a debug line per
call, and hands each finished call to the audit log (which records only
the few that matter).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.message import DecodeError

from flowport.server.api.in_band import in_band_error
from flowport.server.audit.calls import CallAuditor
from flowport.server.auth.authenticator import Authenticator
from flowport.server.auth.context import CURRENT
from flowport.server.auth.lifetime import EXPIRED
from flowport.server.errors import (
    DeadlineExceeded,
    FlowportError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
)
from flowport.server.metrics import RequestMetrics
from flowport.server.observability import tracing
from flowport.server.observability.context import CALL, open_call
from flowport.server.transcoding import original_path, stream_transport

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Envoy's route timeout for the call, in ms, sent with every request on a route that has one.
ENVOY_TIMEOUT_KEY = "x-envoy-expected-rq-timeout-ms"
# A unary call answers DEADLINE_EXCEEDED this much before Envoy's route timeout (at most a
# quarter of it): Envoy counts a timeout toward ejecting the server, never an answer.
DEADLINE_MARGIN = 1.0

if TYPE_CHECKING:  # the grpc classes are generic only in their stubs
    from flowport.server.observability.prometheus import Prometheus

    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]
    Context = grpc.aio.ServicerContext[Any, Any]
    # What grpc.aio calls: the stubs only describe the sync signatures.
    UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
    StreamBehavior = Callable[[Any, Context], AsyncIterator[Any]]


async def abort_with(context: Context, error: FlowportError) -> None:
    """End the call with `error`'s status, details included (raises AbortError)."""
    status = error.to_status()
    await context.abort(
        error.code, error.message, trailing_metadata=((STATUS_DETAILS_KEY, status.SerializeToString()),)
    )


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the call can
    answer INVALID_ARGUMENT instead of gRPC's own UNKNOWN (an HTTP 500)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return parse


def _undecodable(method: str) -> InvalidArgument:
    return InvalidArgument(f"the request to {method} could not be decoded", reason="MALFORMED_REQUEST")


def time_limit(context: Context) -> float | None:
    """Seconds a unary call may run before Envoy's route timeout would cut it, less the margin;
    None when it came without one (direct gRPC callers: their own deadline is gRPC's to keep)."""
    for key, value in context.invocation_metadata() or ():
        # ASCII digits, few enough for int(); a value Envoy never sends is no limit.
        if (
            key == ENVOY_TIMEOUT_KEY
            and isinstance(value, str)
            and value.isascii()
            and value.isdigit()
            and len(value) <= 12
        ):
            seconds = int(value) / 1000
            return max(0.0, seconds - min(DEADLINE_MARGIN, seconds / 4))
    return None


def _late(method: str, limit: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"{method} did not finish within {limit:.3g} s, the time the gateway gives it; "
        "it was stopped (work it started, such as an execution, carries on)",
        metadata={"seconds": f"{limit:.3g}"},
    )


def _internal(method: str, exc: BaseException) -> Internal:
    # The caller gets an id to quote; the traceback stays in the server log.
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
    return Internal(f"internal error (incident {incident})", metadata={"incident": incident})


_DONE = object()


class _Cut:
    """Ends a server stream whose credential ended, whatever the handler is waiting for.

    `end()` is called from outside the stream's task (a revocation, an expiry
    timer). While the task waits inside the handler it is cancelled there,
    and the CancelledError becomes UNAUTHENTICATED; while grpc is sending,
    the check before the next item ends it. Nothing is cancelled inside
    grpc's own code.
    """

    __slots__ = ("_cancelled", "_task", "_waiting", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None
        self._task = asyncio.current_task()
        self._waiting = False
        self._cancelled = False

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            if self._waiting and self._task is not None:
                self._task.cancel()
                self._cancelled = True

    def error(self) -> Unauthenticated:
        """UNAUTHENTICATED for the ended credential (the task's cancellation taken back, if any)."""
        assert self.reason is not None
        if self._cancelled and self._task is not None:
            # A handler may have swallowed it (asyncio.wait_for can): either way it is spent.
            self._cancelled = False
            self._task.uncancel()
        return Unauthenticated(
            f"the credential this stream was opened with was {self.reason}; open it again with a valid one",
            reason="CREDENTIAL_EXPIRED" if self.reason == EXPIRED else "CREDENTIAL_REVOKED",
        )

    async def next(self, items: AsyncIterator[Any]) -> Any:
        """The handler's next item (_DONE at its end), or the credential's end."""
        if self.reason is not None:
            raise self.error()
        self._waiting = True
        try:
            return await anext(items, _DONE)
        except asyncio.CancelledError:
            if not self._ours():
                raise
            raise self.error() from None
        finally:
            self._waiting = False

    async def run(self, writing: Awaitable[Any]) -> None:
        """A handler that writes with context.write() (grpc.health.v1's Watch) and returns nothing."""
        if self.reason is not None:
            raise self.error()
        self._waiting = True
        try:
            await writing
        except asyncio.CancelledError:
            if not self._ours():
                raise
            raise self.error() from None
        finally:
            self._waiting = False

    def _ours(self) -> bool:
        """Whether a CancelledError in the handler is this cut's, not grpc's (the client went away)."""
        return self._cancelled


# Methods whose calls GetStats does not count (see _wrap_unary).
UNCOUNTED_PREFIXES = ("/grpc.health.", "/grpc.reflection.", "/envoy.service.ratelimit.")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so raised FlowportErrors become rich statuses."""

    def __init__(
        self,
        metrics: RequestMetrics,
        authenticator: Authenticator | None = None,
        auditor: CallAuditor | None = None,
        prometheus: Prometheus | None = None,
        *,
        tenant_max_streams: int = 0,
    ) -> None:
        """`tenant_max_streams`: server streams one tenant may hold open at once (0: no cap)."""
        self._metrics = metrics
        self._tenant_max_streams = tenant_max_streams
        self._prometheus = prometheus
        self._auth = authenticator
        self._auditor = auditor
        # Handlers are fixed per method, so each is wrapped once, not per call.
        self._wrapped: dict[str, Handler] = {}

    # grpc returns None for an unknown method, and so must an interceptor.
    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # not cached: callers choose unknown paths, and the cache must not grow with them
        return self.wrapped(method, handler)

    def wrapped(self, method: str, handler: Handler) -> Handler:
        """`handler` of `method` with errors mapped, calls counted and callers authenticated (once per method)."""
        cached = self._wrapped.get(method)
        if cached is None:
            cached = self._wrapped[method] = self._wrap(method, handler)
        return cached

    async def _begin(self, method: str, request: Any, context: Context) -> None:
        """Authenticate (before the handler, so before any idempotency or cache
        lookup) and refuse a request that did not decode."""
        if self._auth is not None:
            metadata: Any = context.invocation_metadata() or ()
            CURRENT.set(await self._auth.authenticate(method, metadata, context.peer()))
        if isinstance(request, _Undecodable):
            raise _undecodable(method)

    def _wrap(self, method: str, handler: Handler) -> Handler:
        if handler.unary_unary is not None:
            return self._wrap_unary(method, handler)
        if handler.unary_stream is not None:
            return self._wrap_stream(method, handler)
        # Client- and bidi-streaming methods are not part of the API.
        return handler

    def _finish(self, method: str, code: grpc.StatusCode, seconds: float | None, span: Any) -> None:
        """What every call reports when it ends: Prometheus, its span, the debug log line."""
        if self._prometheus is not None:
            self._prometheus.rpc(method, code.name, seconds)
            if code is grpc.StatusCode.UNAUTHENTICATED:
                self._prometheus.auth_failures.inc()
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                tracing.fail(span, code.name)
        if log.isEnabledFor(logging.DEBUG):
            took = "" if seconds is None else f" in {1000 * seconds:.3f} ms"
            log.debug("%s answered %s%s", method, code.name, took)

    def _stream_opened(self, method: str, transport: str) -> Any:
        """Count a stream that opened; its open-streams gauge (incremented), None without Prometheus."""
        self._metrics.stream_opened(transport)
        if self._prometheus is None:
            return None
        gauge = self._prometheus.streams_open.labels(method, transport)
        gauge.inc()
        return gauge

    def _wrap_unary(self, method: str, handler: Handler) -> Handler:
        metrics, begin, auditor, finish = self._metrics, self._begin, self._auditor, self._finish
        unary = cast("UnaryBehavior", handler.unary_unary)
        attributes = _rpc_attributes(method)
        # Envoy's health checks (every few seconds) and reflection are the infrastructure's calls,
        # not the API's: counted in Prometheus by method, left out of GetStats' request figures.
        counted = not method.startswith(UNCOUNTED_PREFIXES)

        async def body(request: Any, context: Context, span: Any) -> Any:
            start = time.perf_counter()
            ok = False
            response: Any = None
            code, error = grpc.StatusCode.CANCELLED, None
            limit = time_limit(context)
            window = asyncio.timeout(limit)  # None: no limit
            try:
                async with window:
                    await begin(method, request, context)
                    response = await unary(request, context)
                ok, code = True, grpc.StatusCode.OK
                return response
            except FlowportError as exc:
                code, error = exc.code, exc
                await abort_with(context, exc)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except TimeoutError as exc:  # the limit's, or a handler's own (a bug)
                error = _late(method, limit) if limit is not None and window.expired() else _internal(method, exc)
                code = error.code
                await abort_with(context, error)
            except Exception as exc:  # noqa: BLE001 - a bug must still answer with a status
                code, error = grpc.StatusCode.INTERNAL, _internal(method, exc)
                await abort_with(context, error)
            finally:
                seconds = time.perf_counter() - start
                principal = CURRENT.get()
                if counted:
                    metrics.record(seconds, ok, principal.tenant if principal is not None else None)
                finish(method, code, seconds, span)
                if auditor is not None:
                    auditor.finish(method, context, request=request, response=response, code=code, error=error)

        async def unary_behavior(request: Any, context: Context) -> Any:
            # Each call runs in its own task: the value never reaches another call
            # (only tasks the call starts, which see it closed once it has ended).
            call = open_call(method, context)
            CALL.set(call)
            try:
                if not tracing.enabled():  # the hot path: not even a context manager
                    return await body(request, context, None)
                with _server_span(method, attributes, context) as span:
                    return await body(request, context, span)
            finally:
                call.open = False

        return grpc.unary_unary_rpc_method_handler(
            unary_behavior,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(self, method: str, handler: Handler) -> Handler:  # noqa: PLR0915 - one stream's life, in order
        metrics, begin, auditor, finish = self._metrics, self._begin, self._auditor, self._finish
        opened, max_streams = self._stream_opened, self._tenant_max_streams
        stream = cast("StreamBehavior", handler.unary_stream)
        attributes = _rpc_attributes(method)
        watch = self._auth.watch if self._auth is not None else None

        async def body(request: Any, context: Context, span: Any) -> AsyncGenerator[Any]:  # noqa: PLR0915
            ok = cancelled = False
            last: type[Any] | None = None
            error: FlowportError | None = None
            transport = stream_transport(context)
            tenant: str | None = None
            gauge = opened(method, transport)
            # Ends the stream (UNAUTHENTICATED) when its credential is revoked or expires.
            cut = _Cut()
            watched = None
            produced: Any = None
            try:
                try:
                    await begin(method, request, context)
                    principal = CURRENT.get()
                    if principal is not None:
                        if max_streams and metrics.tenant(principal.tenant).active_streams >= max_streams:
                            raise _too_many_streams(max_streams)
                        tenant = principal.tenant
                        metrics.stream_tenant(tenant, transport)
                        if watch is not None:
                            watched = watch(principal, cut.end)
                    produced = stream(request, context)
                    if inspect.isawaitable(produced):
                        await cut.run(produced)
                    else:
                        while (item := await cut.next(produced)) is not _DONE:
                            last = type(item)
                            yield item
                    ok = True
                except FlowportError as exc:
                    error = exc
                except grpc.aio.AbortError:
                    raise
                except asyncio.CancelledError:
                    # The client went away (or the server is stopping): a stream's usual end, not
                    # an error of the stream's in GetStats, still CANCELLED in metrics and the audit.
                    cancelled = True
                    raise
                except Exception as exc:  # noqa: BLE001
                    error = _internal(method, exc)
                if error is not None:
                    final = in_band_error(last, error) if last is not None and original_path(context) else None
                    if final is None:
                        await abort_with(context, error)
                    yield final
            finally:
                if watched is not None:
                    watched.close()
                if inspect.isasyncgen(produced):
                    await produced.aclose()  # the handler's cleanup now, even when grpc closed us at a yield
                metrics.stream_closed(ok or cancelled, transport, tenant)
                if gauge is not None:
                    gauge.dec()
                code = grpc.StatusCode.OK if ok else error.code if error is not None else grpc.StatusCode.CANCELLED
                finish(method, code, None, span)
                if auditor is not None:
                    auditor.finish(method, context, request=request, response=None, code=code, error=error)

        async def stream_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            call = open_call(method, context)
            CALL.set(call)
            # aclosing: when grpc closes this generator (the client went away), the
            # inner one must run its cleanup now, not whenever it is collected.
            try:
                with _server_span(method, attributes, context) as span:
                    async with contextlib.aclosing(body(request, context, span)) as items:
                        async for item in items:
                            yield item
            finally:
                call.open = False

        return grpc.unary_stream_rpc_method_handler(
            stream_behavior,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


def _too_many_streams(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"this tenant has {limit} streams open on this server, its most (tenant_max_streams); "
        "close one or retry shortly",
        reason="TENANT_STREAM_LIMIT",
        metadata={"tenant_max_streams": str(limit)},
        retry_delay=1.0,
    )


def _server_span(method: str, attributes: dict[str, str], context: Context) -> contextlib.AbstractContextManager[Any]:
    """The call's SERVER span, continuing the caller's trace; nothing with tracing off."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    parent = tracing.extract(context.invocation_metadata())
    return tracing.span(method.lstrip("/"), kind="server", attributes=attributes, context=parent)


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come out wrapped."""

    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: ErrorInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._interceptor.wrapped(handler_call_details.method, handler)


class _MethodTable(grpc.GenericRpcHandler):
    """Every registered method's wrapped handler, found by its full path in one dict lookup."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self.handlers.get(handler_call_details.method)


class WrappingRegistrar:
    """Registers services on a grpc.aio server with every method handler wrapped by `interceptor`.

    The same behaviour as installing the interceptor, without grpc's server
    interceptor machinery, which costs every call an extra task and an
    `asyncio.wait` (about a tenth of a unary call's CPU here). Pass it where
    the generated `add_*Servicer_to_server` functions expect the server.

    Methods the generated code registers one by one are served through one
    generic handler instead: grpc.aio keeps a call request outstanding per
    registered method and waits on all of them (`asyncio.wait`) for every
    call it accepts, which with this API's ~60 methods cost a quarter of a
    unary call's CPU; one table lookup costs next to nothing.
    """

    def __init__(self, server: grpc.aio.Server, interceptor: ErrorInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor
        self._table = _MethodTable()
        server.add_generic_rpc_handlers((self._table,))

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._interceptor) for h in handlers))

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, Handler]) -> None:
        for name, handler in method_handlers.items():
            path = f"/{service}/{name}"
            self._table.handlers[path] = self._interceptor.wrapped(path, handler)
