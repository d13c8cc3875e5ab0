"""The Python SDK's call behaviour: ApiError on every failure, retries of calls safe to
repeat (with the request_id that makes a create safe), default deadlines, TLS.

A small grpc.aio SessionService stands in for the server where the test
needs it to misbehave (fail once, stall); the flowport server itself is used
for real errors."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flowport.clients import ApiError, AsyncClient, Client
from flowport.clients.retry import retried_methods, service_config
from flowport.server.app import Running
from flowport.v1 import event_pb2, execution_pb2, session_pb2, session_pb2_grpc, workflow_pb2

from ..conftest import ADMIN_KEY


class _Flaky(session_pb2_grpc.SessionServiceServicer):
    """Fails the first `failures` calls of each method with UNAVAILABLE; stalls GetSession when asked."""

    def __init__(self, failures: int = 0, stall: float = 0.0) -> None:
        self.failures = failures
        self.stall = stall
        self.seen: list[tuple[str, str, str]] = []  # (method, request_id, x-api-key)

    def _record(self, method: str, request: Any, context: Any) -> None:
        key = dict(context.invocation_metadata()).get("x-api-key", "")
        self.seen.append((method, getattr(request, "request_id", ""), key))

    async def CreateSession(self, request: Any, context: Any) -> session_pb2.Session:
        self._record("CreateSession", request, context)
        if sum(1 for m, _, _ in self.seen if m == "CreateSession") <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return session_pb2.Session(session_id="ses_1", user_id=request.session.user_id)

    async def GetSession(self, request: Any, context: Any) -> session_pb2.Session:
        self._record("GetSession", request, context)
        await asyncio.sleep(self.stall)
        return session_pb2.Session(session_id=request.session_id)


class _Server:
    """The stand-in, on its own loop in a thread, so sync clients can call it."""

    def __init__(self, servicer: _Flaky, credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()

        async def serve() -> None:
            self.server = grpc.aio.server()
            session_pb2_grpc.add_SessionServiceServicer_to_server(servicer, self.server)
            address = "localhost:0"
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
            await self.server.start()
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        started.wait(10)

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def flaky() -> Iterator[_Server]:
    server = _Server(_Flaky(failures=1, stall=1.0))
    yield server
    server.close()


def _create() -> session_pb2.CreateSessionRequest:
    return session_pb2.CreateSessionRequest(session=session_pb2.Session(user_id="ada"))


def test_a_create_is_retried_after_unavailable_with_one_request_id(flaky: _Server) -> None:
    with Client(flaky.target, api_key="fpk_x") as client:
        made = client.sessions.CreateSession(_create(), timeout=10)
    assert made.session_id == "ses_1"
    attempts = [s for s in flaky.servicer.seen if s[0] == "CreateSession"]
    assert len(attempts) == 2, "one failure, one retry"
    first_id, second_id = attempts[0][1], attempts[1][1]
    assert first_id.startswith("sdk-") and first_id == second_id, "the retry repeats the request, id and all"
    assert {key for _, _, key in attempts} == {"fpk_x"}, "the credential rides on every attempt"


def test_a_request_id_given_is_kept(flaky: _Server) -> None:
    request = _create()
    request.request_id = "mine-1"
    with Client(flaky.target) as client:
        client.sessions.CreateSession(request, timeout=10)
    assert {rid for m, rid, _ in flaky.servicer.seen if m == "CreateSession"} == {"mine-1"}
    assert request.request_id == "mine-1"


async def test_without_retries_unavailable_is_an_api_error(flaky: _Server) -> None:
    async with AsyncClient(flaky.target, retries=1) as client:
        with pytest.raises(ApiError) as caught:
            await client.sessions.CreateSession(_create(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE and caught.value.details() == "restarting"
    assert isinstance(caught.value, grpc.RpcError) and isinstance(caught.value, grpc.aio.AioRpcError)


def test_the_default_deadline_applies_to_unary_calls_and_a_call_may_override_it(flaky: _Server) -> None:
    get = session_pb2.GetSessionRequest(session_id="ses_9")
    with Client(flaky.target, timeout=0.2) as client:
        with pytest.raises(ApiError) as caught:
            client.sessions.GetSession(get)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.sessions.GetSession(get, timeout=5).session_id == "ses_9"


def test_every_method_the_clients_retry_is_safe_to_repeat() -> None:
    retried = set(retried_methods())
    assert ("flowport.v1.SessionService", "GetSession") in retried  # NO_SIDE_EFFECTS
    assert ("flowport.v1.ExecutionService", "CreateExecution") in retried  # takes a request_id
    # Streams resume in the SDK's iterators instead (a gRPC-retried stream could hang through a restart).
    assert ("flowport.v1.EventService", "StreamEvents") not in retried
    assert '"maxAttempts": 4' in service_config(4) and '"methodConfig": []' in service_config(1)
    with pytest.raises(ValueError, match="1 or more"):
        service_config(0)


def _self_signed() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


async def test_tls_with_the_servers_certificate_and_refused_without_it() -> None:
    cert, key = _self_signed()
    server = _Server(_Flaky(), grpc.ssl_server_credentials([(key, cert)]))
    try:
        async with AsyncClient(server.target, tls=True, root_certificates=cert) as client:
            got = await client.sessions.GetSession(session_pb2.GetSessionRequest(session_id="ses_t"), timeout=10)
            assert got.session_id == "ses_t"
        async with AsyncClient(server.target, tls=True, retries=1) as untrusting:  # the system's roots only
            with pytest.raises(ApiError) as caught:
                await untrusting.sessions.GetSession(session_pb2.GetSessionRequest(session_id="x"), timeout=15)
            # A refused handshake fails the call as UNAVAILABLE; on a loaded machine gRPC may still be
            # between connection attempts when the deadline comes. Either way no answer got through.
            assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert len(server.servicer.seen) == 1  # the trusted call only: the other never reached the servicer
    finally:
        server.close()


# Against the real server: its errors arrive as ApiError with the details decoded.


@pytest.fixture
async def client(running: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as made:
        yield made


async def test_unary_errors_carry_the_decoded_status(client: AsyncClient) -> None:
    with pytest.raises(ApiError) as caught:
        await client.workflows.CreateWorkflow(
            workflow_pb2.CreateWorkflowRequest(
                workflow=workflow_pb2.Workflow(name="bad", nodes=[workflow_pb2.Node(name="x", type="NoSuchNode")])
            )
        )
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and error.violations
    assert error.violations[0][0].startswith("nodes[0]") and error.domain
    assert "INVALID_ARGUMENT" in str(error) and error.violations[0][0] in str(error)


async def test_stream_errors_arrive_as_api_error_through_read_and_iteration(client: AsyncClient) -> None:
    stream = client.events.StreamEvents(event_pb2.StreamEventsRequest(after_id="not-a-number"))
    with pytest.raises(ApiError) as caught:
        await stream.read()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    missing = client.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id="exe_missing"))
    with pytest.raises(ApiError) as gone:
        async for _ in missing:
            pass
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND and gone.value.reason


async def test_sync_stream_errors_arrive_as_api_error(running: Running) -> None:
    def watch_missing() -> ApiError:
        with Client(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as sync:
            missing = sync.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id="exe_missing"))
            with pytest.raises(ApiError) as gone:
                next(iter(missing))
            return gone.value

    # The server runs on this test's loop, so the blocking client runs in a thread.
    error = await asyncio.to_thread(watch_missing)
    assert error.code() is grpc.StatusCode.NOT_FOUND


# The conveniences: pagination, run_workflow, watch, and events that resume.

TRIVIAL = {
    "name": "sdk_trivial",
    "nodes": [{"type": "PythonCodeNode", "name": "calc", "config": {"code": "result = {'n': n + 1}"}}],
}


async def test_paginate_walks_every_page_without_touching_the_request(client: AsyncClient) -> None:
    made = {
        (
            await client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session()))
        ).session_id
        for _ in range(5)
    }
    request = session_pb2.ListSessionsRequest(page_size=2)
    listed = [s.session_id async for s in client.paginate(client.sessions.ListSessions, request)]
    assert set(listed) == made and len(listed) == 5, "every item once, across three pages"
    assert request.page_token == ""
    with pytest.raises(TypeError, match="not a paginated list request"):
        client.paginate(client.sessions.GetSession, session_pb2.GetSessionRequest())


async def test_run_workflow_from_a_config_then_by_id_and_watch_it(client: AsyncClient) -> None:
    done = await client.run_workflow(TRIVIAL, {"n": 41})
    assert done.state == execution_pb2.Execution.STATE_SUCCEEDED, done.error.message
    assert done.outputs["calc"]["result"]["n"] == 42
    again = await client.run_workflow(done.workflow_id, {"n": 1})
    assert again.outputs["calc"]["result"]["n"] == 2 and again.workflow_id == done.workflow_id
    started = await client.run_workflow(done.workflow_id, {"n": 5}, wait=False)
    updates = [u async for u in client.watch(started.execution_id)]
    assert updates[0].HasField("execution"), "first the execution as it is"
    last = updates[-1]
    assert (last.HasField("event") and last.event.type == "execution.completed") or (
        last.execution.state == execution_pb2.Execution.STATE_SUCCEEDED
    )
    with pytest.raises(ApiError) as caught:
        await client.run_workflow("no_such_workflow", {})
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_a_stream_a_stopping_server_ended_resumes_from_its_last_heartbeats_cursor() -> None:
    from flowport.clients import streams

    asked: list[str] = []

    def stream_events(request: event_pb2.StreamEventsRequest) -> Iterator[event_pb2.Event]:
        asked.append(request.after_id)
        if len(asked) == 1:
            # No event since it opened, then ended cleanly with the stream's cursor.
            yield event_pb2.Event(type="heartbeat")
            yield event_pb2.Event(type="heartbeat", id="41")
        else:
            yield event_pb2.Event(type="session.created", id="42")

    first = next(streams.events(stream_events, event_pb2.StreamEventsRequest(types=["session.*"])))
    assert first.id == "42"
    assert asked == ["", "41"]


def test_a_stream_that_drops_says_once_that_it_is_reconnecting(caplog: pytest.LogCaptureFixture) -> None:
    """A reader waiting on a quiet stream learns that it is reconnecting, once per outage, not
    once per attempt."""
    from flowport.clients import streams

    attempts = 0

    def stream_events(request: event_pb2.StreamEventsRequest) -> Iterator[event_pb2.Event]:
        nonlocal attempts
        attempts += 1
        if attempts <= 3:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        yield event_pb2.Event(type="session.created", id="7")

    with caplog.at_level(logging.WARNING, logger="flowport.clients.streams"):
        first = next(streams.events(stream_events, event_pb2.StreamEventsRequest()))
    assert first.id == "7" and attempts == 4
    said = [r.getMessage() for r in caplog.records]
    assert said == ["stream interrupted (UNAVAILABLE: connection refused); reconnecting for up to 60s"]
