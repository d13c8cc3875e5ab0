"""The server interceptor: maps FlowportError to google.rpc.Status, once.

It also counts calls for GatewayService.GetStats and hands each finished
call to the audit log (which records only the few that matter), since it
is the one place every call passes through.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf.message import DecodeError

from flowport.server.api.in_band import in_band_error
from flowport.server.audit.calls import CallAuditor
from flowport.server.auth.authenticator import Authenticator
from flowport.server.auth.context import CURRENT
from flowport.server.errors import FlowportError, Internal, InvalidArgument
from flowport.server.metrics import RequestMetrics
from flowport.server.transcoding import original_path

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"

if TYPE_CHECKING:  # the grpc classes are generic only in their stubs
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


def _internal(method: str, exc: BaseException) -> Internal:
    # The caller gets an id to quote; the traceback stays in the server log.
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
    return Internal(f"internal error (incident {incident})", metadata={"incident": incident})


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so raised FlowportErrors become rich statuses."""

    def __init__(
        self, metrics: RequestMetrics, authenticator: Authenticator | None = None, auditor: CallAuditor | None = None
    ) -> None:
        self._metrics = metrics
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

    def _wrap_unary(self, method: str, handler: Handler) -> Handler:
        metrics, begin, auditor = self._metrics, self._begin, self._auditor
        unary = cast("UnaryBehavior", handler.unary_unary)

        async def unary_behavior(request: Any, context: Context) -> Any:
            start = time.perf_counter()
            ok = False
            response: Any = None
            code, error = grpc.StatusCode.CANCELLED, None
            try:
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
            except Exception as exc:  # noqa: BLE001 - a bug must still answer with a status
                code, error = grpc.StatusCode.INTERNAL, _internal(method, exc)
                await abort_with(context, error)
            finally:
                metrics.record(time.perf_counter() - start, ok)
                if auditor is not None:
                    auditor.finish(method, context, request=request, response=response, code=code, error=error)

        return grpc.unary_unary_rpc_method_handler(
            unary_behavior,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(self, method: str, handler: Handler) -> Handler:
        metrics, begin, auditor = self._metrics, self._begin, self._auditor
        stream = cast("StreamBehavior", handler.unary_stream)

        async def stream_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            ok = False
            last: type[Any] | None = None
            error: FlowportError | None = None
            metrics.stream_opened()
            try:
                try:
                    await begin(method, request, context)
                    async for item in stream(request, context):
                        last = type(item)
                        yield item
                    ok = True
                except FlowportError as exc:
                    error = exc
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    error = _internal(method, exc)
                if error is not None:
                    final = in_band_error(last, error) if last is not None and original_path(context) else None
                    if final is None:
                        await abort_with(context, error)
                    yield final
            finally:
                metrics.stream_closed(ok)
                if auditor is not None:
                    code = grpc.StatusCode.OK if ok else error.code if error is not None else grpc.StatusCode.CANCELLED
                    auditor.finish(method, context, request=request, response=None, code=code, error=error)

        return grpc.unary_stream_rpc_method_handler(
            stream_behavior,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


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
