"""Python SDK: every flowport service on one channel, sync or asyncio.

    from flowport.clients import Client
    from flowport.v1 import session_pb2

    with Client("127.0.0.1:8080", api_key=KEY) as fp:   # through Envoy, or :50051 direct
        s = fp.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="ada")))

`AsyncClient` is the same on grpc.aio. Each service is a typed stub
(`fp.sessions`, `fp.workflows`, `fp.executions`, ...) returning the
generated messages. Every call carries the credential; a failed call raises
`ApiError` (the gRPC code and the decoded status details); calls that are
safe to repeat are retried on UNAVAILABLE with backoff (`retries`, through
gRPC's service config), and creates get a `request_id` when they have none,
so a retry is never a second create; unary calls get the client's
`timeout` unless they pass their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message

from flowport.clients import pages, runs, streams
from flowport.clients.interceptors import AsyncStreamCalls, AsyncUnaryCalls, SyncCalls, credential_metadata
from flowport.clients.retry import service_config
from flowport.server.limits import MAX_MESSAGE_BYTES
from flowport.v1 import (
    apikey_pb2_grpc,
    audit_pb2_grpc,
    event_pb2,
    event_pb2_grpc,
    execution_pb2,
    execution_pb2_grpc,
    gateway_pb2_grpc,
    registry_pb2_grpc,
    resource_pb2_grpc,
    schema_pb2_grpc,
    secret_pb2_grpc,
    session_pb2_grpc,
    webhook_pb2_grpc,
    workflow_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:8080"
DEFAULT_RETRIES = 4  # attempts in all, for calls safe to repeat


def _options(retries: int, options: list[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    return [
        ("grpc.enable_retries", 1 if retries > 1 else 0),
        ("grpc.service_config", service_config(retries)),
        # A restarted server is found again within seconds: gRPC's default
        # reconnect backoff grows to two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
        # Each client keeps its own connections: grpc otherwise shares them
        # process-wide, and one client's failed reconnects would hold back another.
        ("grpc.use_local_subchannel_pool", 1),
        # As much as the API answers with (an execution's outputs can be
        # megabytes): gRPC's default receive limit is 4 MiB.
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        *(options or []),
    ]


def _credentials(
    tls: bool | grpc.ChannelCredentials, root_certificates: bytes | None
) -> grpc.ChannelCredentials | None:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if tls or root_certificates is not None:
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return None


class Events(event_pb2_grpc.EventServiceStub):
    """The EventService stub (`fp.events.StreamEvents(...)`), and, called, a stream that survives reconnects:

        for event in fp.events(StreamEventsRequest(types=["execution.*"])): ...

    resumed from the last event after a dropped connection (streams.py).
    """

    def __call__(
        self, request: event_pb2.StreamEventsRequest | None = None, give_up_after: float = 60.0
    ) -> Iterator[event_pb2.Event]:
        return streams.events(self.StreamEvents, request or event_pb2.StreamEventsRequest(), give_up_after)


class AsyncEvents(event_pb2_grpc.EventServiceStub):
    """`Events` for AsyncClient: `async for event in fp.events(request): ...`."""

    def __call__(
        self, request: event_pb2.StreamEventsRequest | None = None, give_up_after: float = 60.0
    ) -> AsyncIterator[event_pb2.Event]:
        return streams.aevents(self.StreamEvents, request or event_pb2.StreamEventsRequest(), give_up_after)


class _Stubs:
    def _bind(self, channel: Any) -> None:
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(channel)
        self.workflows = workflow_pb2_grpc.WorkflowServiceStub(channel)
        self.executions = execution_pb2_grpc.ExecutionServiceStub(channel)
        self.webhooks = webhook_pb2_grpc.WebhookServiceStub(channel)
        self.schemas = schema_pb2_grpc.SchemaServiceStub(channel)
        self.keys = apikey_pb2_grpc.ApiKeyServiceStub(channel)
        self.secrets = secret_pb2_grpc.SecretServiceStub(channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(channel)
        self.services = registry_pb2_grpc.ServiceRegistryServiceStub(channel)
        self.resources = resource_pb2_grpc.ResourceServiceStub(channel)


class Client(_Stubs):
    """Blocking client. Use as a context manager, or call `close()`.

    `target`: host:port of Envoy (`flowport up`) or of a server (`flowport serve`).
    `api_key` or `token` (a JWT): the credential. `tls`: True for TLS with
    the system's roots (or `root_certificates`), or your own
    `grpc.ChannelCredentials`. `timeout`: the default deadline of unary
    calls, in seconds (None: none). `retries`: attempts in all for calls
    safe to repeat (1: no retries). `options`: extra channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        options: list[tuple[str, Any]] | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        credentials = _credentials(tls, root_certificates)
        if channel is None:
            opts = _options(retries, options)
            channel = (
                grpc.secure_channel(target, credentials, opts)
                if credentials is not None
                else grpc.insecure_channel(target, opts)
            )
        self.channel = channel
        calls = SyncCalls(credential_metadata(api_key, token), timeout)
        intercepted = grpc.intercept_channel(self.channel, calls)
        self._bind(intercepted)
        self.events = Events(intercepted)

    def paginate(self, method: Callable[..., Any], request: Message, **call: Any) -> Iterator[Any]:
        """Every item of a list call, page after page (`fp.paginate(fp.sessions.ListSessions, request)`)."""
        return pages.paginate(method, request, **call)

    def run_workflow(
        self,
        workflow: runs.Workflow,
        inputs: dict[str, Any] | None = None,
        *,
        wait: bool = True,
        session_id: str = "",
    ) -> execution_pb2.Execution:
        """Run a workflow config (dict or Workflow; created first) or an existing workflow's id.

        With `wait`, returns the execution once it has ended, however long it runs.
        """
        execution: execution_pb2.Execution = runs.run(self, workflow, inputs, wait, session_id)
        return execution

    def watch(self, execution_id: str, give_up_after: float = 60.0) -> Iterator[execution_pb2.WatchExecutionResponse]:
        """The execution as it is, then its events until it ends; reconnects after a dropped connection."""
        return streams.watch(self.executions.WatchExecution, execution_id, give_up_after)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Stubs):
    """asyncio client (the arguments of `Client`). Use as an async context manager, or await `close()`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        token: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        options: list[tuple[str, Any]] | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        metadata = credential_metadata(api_key, token)
        interceptors: list[grpc.aio.ClientInterceptor] = [
            AsyncUnaryCalls(metadata, timeout),
            AsyncStreamCalls(metadata, timeout),
        ]
        self.target = target
        credentials = _credentials(tls, root_certificates)
        if channel is None:
            opts = _options(retries, options)
            channel = (
                grpc.aio.secure_channel(target, credentials, opts, interceptors=interceptors)
                if credentials is not None
                else grpc.aio.insecure_channel(target, opts, interceptors=interceptors)
            )
        self.channel = channel
        self._bind(self.channel)
        self.events = AsyncEvents(self.channel)

    def paginate(self, method: Callable[..., Awaitable[Any]], request: Message, **call: Any) -> AsyncIterator[Any]:
        """Every item of a list call, page after page (`async for s in fp.paginate(fp.sessions.ListSessions, r)`)."""
        return pages.apaginate(method, request, **call)

    async def run_workflow(
        self,
        workflow: runs.Workflow,
        inputs: dict[str, Any] | None = None,
        *,
        wait: bool = True,
        session_id: str = "",
    ) -> execution_pb2.Execution:
        """Run a workflow config (dict or Workflow; created first) or an existing workflow's id.

        With `wait`, returns the execution once it has ended, however long it runs.
        """
        execution: execution_pb2.Execution = await runs.arun(self, workflow, inputs, wait, session_id)
        return execution

    def watch(
        self, execution_id: str, give_up_after: float = 60.0
    ) -> AsyncIterator[execution_pb2.WatchExecutionResponse]:
        """The execution as it is, then its events until it ends; reconnects after a dropped connection."""
        return streams.awatch(self.executions.WatchExecution, execution_id, give_up_after)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
