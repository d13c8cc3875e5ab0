"""Python SDK: typed stubs for every flowport service on one channel.

    from flowport.clients import Client
    from flowport.v1 import session_pb2

    with Client("127.0.0.1:8080", api_key=KEY) as fp:   # through Envoy, or :50051 direct
        s = fp.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="ada")))

`AsyncClient` is the same on grpc.aio. Failed calls raise grpc.RpcError;
`ApiError.from_rpc_error(e)` decodes its reason and field violations.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc

from flowport.clients.credentials import (
    AsyncStreamCredential,
    AsyncUnaryCredential,
    SyncCredential,
    credential_metadata,
)
from flowport.v1 import (
    apikey_pb2_grpc,
    audit_pb2_grpc,
    event_pb2_grpc,
    execution_pb2_grpc,
    gateway_pb2_grpc,
    schema_pb2_grpc,
    secret_pb2_grpc,
    session_pb2_grpc,
    webhook_pb2_grpc,
    workflow_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:8080"


class _Stubs:
    def _bind(self, channel: Any) -> None:
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(channel)
        self.workflows = workflow_pb2_grpc.WorkflowServiceStub(channel)
        self.executions = execution_pb2_grpc.ExecutionServiceStub(channel)
        self.events = event_pb2_grpc.EventServiceStub(channel)
        self.webhooks = webhook_pb2_grpc.WebhookServiceStub(channel)
        self.schemas = schema_pb2_grpc.SchemaServiceStub(channel)
        self.keys = apikey_pb2_grpc.ApiKeyServiceStub(channel)
        self.secrets = secret_pb2_grpc.SecretServiceStub(channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(channel)


class Client(_Stubs):
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        token: str | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.channel = channel or grpc.insecure_channel(target)
        metadata = credential_metadata(api_key, token)
        self._bind(grpc.intercept_channel(self.channel, SyncCredential(metadata)) if metadata else self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Stubs):
    """asyncio client. Use as an async context manager, or await `close()`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        token: str | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        metadata = credential_metadata(api_key, token)
        interceptors = [AsyncUnaryCredential(metadata), AsyncStreamCredential(metadata)] if metadata else None
        self.target = target
        self.channel = channel or grpc.aio.insecure_channel(target, interceptors=interceptors)
        self._bind(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
