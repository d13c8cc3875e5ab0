"""What the clients add to every call.

- the credential: `x-api-key`, or `authorization: Bearer <token>`;
- a `request_id` on requests that take one and were sent without it, so a
  create retried after UNAVAILABLE is answered from the server's first
  result, never made twice (see retry.py);
- the client's default deadline, on unary calls that give none;
- `ApiError` (errors.py) instead of the raw grpc error, for unary and
  streaming calls alike.

The sync interceptor waits for a unary call's outcome to convert its error,
so `stub.Method.future(...)` blocks like a plain call.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from flowport.clients.errors import ApiError


def credential_metadata(api_key: str | None, token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries the credential."""
    if api_key and token:
        raise ValueError("give an api_key or a token, not both")
    if api_key:
        return (("x-api-key", api_key),)
    if token:
        return (("authorization", f"Bearer {token}"),)
    return ()


def with_request_id(request: Any) -> Any:
    """`request`, or a copy of it with a fresh `request_id` when it takes one and has none."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None or "request_id" not in descriptor.fields_by_name or request.request_id:
        return request
    stamped = type(request)()
    stamped.CopyFrom(request)
    stamped.request_id = f"sdk-{uuid.uuid4()}"
    return stamped


class _Details(grpc.ClientCallDetails):
    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


class _Calls:
    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout: float | None) -> None:
        self._metadata = metadata
        self._timeout = timeout

    def _details(self, details: Any, *, unary: bool) -> Any:
        metadata = list(details.metadata or ()) + list(self._metadata)
        timeout = details.timeout if details.timeout is not None or not unary else self._timeout
        if isinstance(details, grpc.aio.ClientCallDetails):
            return details._replace(metadata=grpc.aio.Metadata(*metadata), timeout=timeout)  # type: ignore[attr-defined]
        # Sync call details carry slightly different fields; keep them all.
        fields = {
            f: getattr(details, f)
            for f in ("method", "credentials", "wait_for_ready", "compression")
            if hasattr(details, f)
        }
        return _Details(metadata=metadata, timeout=timeout, **fields)


class SyncCalls(_Calls, grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """For `grpc.intercept_channel`."""

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        outcome = continuation(self._details(details, unary=True), with_request_id(request))
        try:
            outcome.result()
        except grpc.RpcError as exc:
            # The stub raises what the interceptor raises.
            raise ApiError.from_rpc_error(exc) from None
        return outcome

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return _SyncStream(continuation(self._details(details, unary=False), request))


class _SyncStream:
    """A server stream whose errors arrive as ApiError; everything else is the call's."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise ApiError.from_rpc_error(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class AsyncUnaryCalls(_Calls, grpc.aio.UnaryUnaryClientInterceptor):
    """For `grpc.aio` channels: unary calls."""

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        call = await continuation(self._details(details, unary=True), with_request_id(request))
        try:
            return await call
        except grpc.RpcError as exc:
            raise ApiError.from_rpc_error(exc) from None


class AsyncStreamCalls(_Calls, grpc.aio.UnaryStreamClientInterceptor):
    """For `grpc.aio` channels: server-streaming calls (`read()`, `async for`, `cancel()` as usual)."""

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        call = await continuation(self._details(details, unary=False), request)

        async def responses() -> AsyncIterator[Any]:
            try:
                async for response in call:
                    yield response
            except grpc.RpcError as exc:
                raise ApiError.from_rpc_error(exc) from None

        return responses()
