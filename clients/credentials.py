"""Attach a credential (`x-api-key` or a bearer token) to every call of a channel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def credential_metadata(api_key: str | None, token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries the credential."""
    if api_key and token:
        raise ValueError("give an api_key or a token, not both")
    if api_key:
        return (("x-api-key", api_key),)
    if token:
        return (("authorization", f"Bearer {token}"),)
    return ()


def _with(details: Any, extra: tuple[tuple[str, str], ...]) -> Any:
    metadata = list(details.metadata or ()) + list(extra)
    # Sync and aio call details carry slightly different fields; keep them all.
    fields = {
        f: getattr(details, f)
        for f in ("method", "timeout", "credentials", "wait_for_ready", "compression")
        if hasattr(details, f)
    }
    if isinstance(details, grpc.aio.ClientCallDetails):
        return details._replace(metadata=grpc.aio.Metadata(*metadata))  # type: ignore[attr-defined]
    return _Details(metadata=metadata, **fields)


class _Details(grpc.ClientCallDetails):
    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


class SyncCredential(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """For `grpc.intercept_channel`."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with(details, self._metadata), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(_with(details, self._metadata), request)


class AsyncUnaryCredential(grpc.aio.UnaryUnaryClientInterceptor):
    """For `grpc.aio` channels: unary calls."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with(details, self._metadata), request)


class AsyncStreamCredential(grpc.aio.UnaryStreamClientInterceptor):
    """For `grpc.aio` channels: server-streaming calls."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return await continuation(_with(details, self._metadata), request)
