"""Error mapping: a raised FlowportError reaches the client as a rich google.rpc.Status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from flowport.clients import ApiError
from flowport.server import errors
from flowport.server.interceptor import ErrorInterceptor
from flowport.server.metrics import RequestMetrics
from flowport.v1 import event_pb2

RAISED: dict[str, Exception] = {
    "NotFound": errors.NotFound("thing 'x' does not exist", reason="THING_NOT_FOUND", metadata={"thing": "x"}),
    "Invalid": errors.InvalidArgument(
        "bad input", violations=[("nodes[1].config.url", "required"), ("name", "too long")]
    ),
    "Exhausted": errors.ResourceExhausted("slow down", retry_delay=1.5),
    "Bug": ZeroDivisionError("secret internal detail"),
}


async def _stream(request: Any, context: Any) -> AsyncIterator[empty_pb2.Empty]:
    yield empty_pb2.Empty()
    raise errors.OutOfRange("cursor too old", reason="CURSOR_EXPIRED")


async def _event_stream(request: Any, context: Any) -> AsyncIterator[event_pb2.Event]:
    yield event_pb2.Event(id="1", type="execution.started")
    raise errors.Unavailable("the bus went away", reason="BUS_DOWN")


class _Handler(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        name = details.method.rsplit("/", 1)[1]
        kwargs: dict[str, Any] = {
            "request_deserializer": empty_pb2.Empty.FromString,
            "response_serializer": empty_pb2.Empty.SerializeToString,
        }
        if name == "Stream":
            return grpc.unary_stream_rpc_method_handler(_stream, **kwargs)
        if name == "Events":
            return grpc.unary_stream_rpc_method_handler(
                _event_stream,
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=event_pb2.Event.SerializeToString,
            )

        async def behaviour(request: Any, context: Any) -> empty_pb2.Empty:
            raise RAISED[name]

        return grpc.unary_unary_rpc_method_handler(behaviour, **kwargs)


@pytest.fixture
async def channel() -> AsyncIterator[tuple[grpc.aio.Channel, RequestMetrics]]:
    metrics = RequestMetrics()
    server = grpc.aio.server(interceptors=[ErrorInterceptor(metrics)])
    server.add_generic_rpc_handlers([_Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch, metrics
    await server.stop(None)


async def _call(ch: grpc.aio.Channel, name: str) -> ApiError:
    call = ch.unary_unary(
        f"/test.Errors/{name}",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(empty_pb2.Empty())
    return ApiError.from_rpc_error(caught.value)


async def test_not_found_carries_error_info(channel: tuple[grpc.aio.Channel, RequestMetrics]) -> None:
    error = await _call(channel[0], "NotFound")
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.message == "thing 'x' does not exist"
    assert (error.reason, error.domain, error.metadata) == ("THING_NOT_FOUND", "flowport.dev", {"thing": "x"})


async def test_invalid_argument_carries_every_field_violation(channel: tuple[grpc.aio.Channel, RequestMetrics]) -> None:
    error = await _call(channel[0], "Invalid")
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    assert error.violations == [("nodes[1].config.url", "required"), ("name", "too long")]


async def test_resource_exhausted_carries_retry_info(channel: tuple[grpc.aio.Channel, RequestMetrics]) -> None:
    error = await _call(channel[0], "Exhausted")
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_delay == pytest.approx(1.5)


async def test_an_unexpected_exception_is_internal_without_leaking_details(
    channel: tuple[grpc.aio.Channel, RequestMetrics], caplog: pytest.LogCaptureFixture
) -> None:
    error = await _call(channel[0], "Bug")
    assert error.code() is grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in error.message
    incident = error.metadata["incident"]
    assert incident in error.message
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records), "the traceback is logged"


async def test_an_error_after_a_stream_started_ends_it_with_the_status(
    channel: tuple[grpc.aio.Channel, RequestMetrics],
) -> None:
    ch, metrics = channel
    call = ch.unary_stream(
        "/test.Errors/Stream",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for item in call(empty_pb2.Empty()):
            received.append(item)
    error = ApiError.from_rpc_error(caught.value)
    assert len(received) == 1
    assert (error.code(), error.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CURSOR_EXPIRED")
    # grpc sends the status while `abort` is awaited; the server's bookkeeping runs just after.
    for _ in range(100):
        if metrics.active_streams == 0:
            break
        await asyncio.sleep(0.01)
    assert metrics.active_streams == 0 and metrics.errors == 1


async def test_calls_and_errors_are_counted(channel: tuple[grpc.aio.Channel, RequestMetrics]) -> None:
    ch, metrics = channel
    for name in ("NotFound", "Invalid"):
        await _call(ch, name)
    # The server counts a call as its handler unwinds, which may be just
    # after the client already has the status.
    for _ in range(200):
        if metrics.total == 2:
            break
        await asyncio.sleep(0.01)
    assert (metrics.total, metrics.errors) == (2, 2)
    assert metrics.error_rate == 1.0


def test_every_status_code_maps_to_a_google_rpc_code() -> None:
    for code in grpc.StatusCode:

        class _E(errors.FlowportError):
            pass

        _E.code = code
        assert _E("x").to_status().code == code.value[0]


async def test_a_rest_stream_that_fails_midway_ends_with_an_error_event(
    channel: tuple[grpc.aio.Channel, RequestMetrics],
) -> None:
    ch, _ = channel
    call = ch.unary_stream(
        "/test.Errors/Events",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=event_pb2.Event.FromString,
    )
    # As Envoy's transcoder sends it: HTTP/1.1 clients cannot see trailers.
    rest = [e async for e in call(empty_pb2.Empty(), metadata=(("x-envoy-original-path", "/events"),))]
    assert [e.type for e in rest] == ["execution.started", "error"]
    assert dict(rest[1].data) == {"code": 14.0, "message": "the bus went away", "reason": "BUS_DOWN"}
    # A native gRPC caller gets the status itself.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [e async for e in call(empty_pb2.Empty())]
    assert ApiError.from_rpc_error(caught.value).reason == "BUS_DOWN"


async def test_a_request_that_does_not_decode_is_invalid_argument(
    channel: tuple[grpc.aio.Channel, RequestMetrics],
) -> None:
    call = channel[0].unary_unary("/test.Errors/NotFound")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\xff\xff\xff")  # not a protobuf message
    error = ApiError.from_rpc_error(caught.value)
    assert (error.code(), error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


class _OnlyErrors(_Handler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return super().service(details) if details.method.startswith("/test.Errors/") else None


async def test_unknown_methods_leave_nothing_behind() -> None:
    interceptor = ErrorInterceptor(RequestMetrics())
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([_OnlyErrors()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for n in range(20):
                call = ch.unary_unary(f"/nope.Service{n}/Call", request_serializer=bytes, response_deserializer=bytes)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(b"")
                assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
            await _call(ch, "NotFound")
    finally:
        await server.stop(None)
    # Wrapped handlers are cached for real methods only: callers choose unknown paths.
    assert list(interceptor._wrapped) == ["/test.Errors/NotFound"]
