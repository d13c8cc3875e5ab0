"""The gRPC server in-process on 127.0.0.1: sessions, gateway, health,
reflection and graceful shutdown."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from flowport.clients import ApiError, AsyncClient
from flowport.server.app import ALL_SERVICES, Running, start, stop
from flowport.server.settings import Settings
from flowport.v1 import gateway_pb2, session_pb2, workflow_pb2

from ..conftest import ADMIN_KEY, make_settings

S = session_pb2


@pytest.fixture
async def client(running: Running) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as c:
        yield c


async def _error(awaitable: object) -> ApiError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable  # type: ignore[misc]
    return ApiError.from_rpc_error(caught.value)


async def test_session_lifecycle(client: AsyncClient) -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"tenant_id": "acme", "isolation_level": "strict", "n": 3})
    created = await client.sessions.CreateSession(
        S.CreateSessionRequest(
            session=S.Session(user_id="ada", metadata=metadata, ttl=duration_pb2.Duration(seconds=60))
        )
    )
    assert created.session_id.startswith("ses_") and created.tenant == "default"
    assert created.expire_time.seconds - created.create_time.seconds == 60
    assert created.WhichOneof("expiration") == "expire_time"
    got = await client.sessions.GetSession(S.GetSessionRequest(session_id=created.session_id))
    assert got == created
    listed = await client.sessions.ListSessions(S.ListSessionsRequest())
    assert created.session_id in [s.session_id for s in listed.sessions]
    await client.sessions.DeleteSession(S.DeleteSessionRequest(session_id=created.session_id))
    error = await _error(client.sessions.GetSession(S.GetSessionRequest(session_id=created.session_id)))
    assert (error.code(), error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    # Nothing of the id: every missing session is the same answer.
    assert (error.message, error.metadata) == ("session does not exist or has expired", {})


async def test_unknown_session_is_not_found_for_get_and_delete(client: AsyncClient) -> None:
    for call in (
        client.sessions.GetSession(S.GetSessionRequest(session_id="ses_nope")),
        client.sessions.DeleteSession(S.DeleteSessionRequest(session_id="ses_nope")),
    ):
        error = await _error(call)
        assert error.code() is grpc.StatusCode.NOT_FOUND
        assert "ses_nope" not in error.message and error.reason == "SESSION_NOT_FOUND"


@pytest.mark.parametrize(
    ("session", "field"),
    [
        (S.Session(user_id="u" * 257), "session.user_id"),
        (S.Session(ttl=duration_pb2.Duration(seconds=0, nanos=5)), "session.ttl"),
        (S.Session(ttl=duration_pb2.Duration(seconds=8 * 86400)), "session.ttl"),
    ],
)
async def test_invalid_sessions_name_the_field(client: AsyncClient, session: S.Session, field: str) -> None:
    error = await _error(client.sessions.CreateSession(S.CreateSessionRequest(session=session)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == [field]


async def test_expire_time_in_the_past_is_refused(client: AsyncClient) -> None:
    session = S.Session()
    session.expire_time.FromSeconds(1)
    error = await _error(client.sessions.CreateSession(S.CreateSessionRequest(session=session)))
    assert error.violations[0][0] == "session.expire_time"


async def test_oversized_metadata_and_request_id_are_refused(client: AsyncClient) -> None:
    big = struct_pb2.Struct()
    big.update({"blob": "x" * (65 * 1024)})
    error = await _error(client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(metadata=big))))
    assert error.violations[0][0] == "session.metadata"
    error = await _error(
        client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(), request_id="k" * 129))
    )
    assert error.violations[0][0] == "request_id"


async def test_request_id_makes_create_idempotent(client: AsyncClient) -> None:
    request = S.CreateSessionRequest(session=S.Session(user_id="ada"), request_id="req-1")
    first = await client.sessions.CreateSession(request)
    again = await client.sessions.CreateSession(request)
    assert again == first
    error = await _error(
        client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(user_id="bob"), request_id="req-1"))
    )
    assert (error.code(), error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    listed = await client.sessions.ListSessions(S.ListSessionsRequest(user_id="ada"))
    assert len(listed.sessions) == 1, "the retry must not create a second session"


async def test_request_id_makes_delete_retryable(running: Running, client: AsyncClient) -> None:
    deleted: list[str] = []
    running.bus.add_listener(
        lambda event: deleted.append(event.session_id) if event.type == "session.deleted" else None
    )
    created = await client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
    other = await client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
    request = S.DeleteSessionRequest(session_id=created.session_id, request_id="del-1")
    await client.sessions.DeleteSession(request)
    await client.sessions.DeleteSession(request)  # a retry succeeds...
    assert deleted == [created.session_id]  # ...and announces nothing twice
    error = await _error(
        client.sessions.DeleteSession(S.DeleteSessionRequest(session_id=other.session_id, request_id="del-1"))
    )
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert (await client.sessions.GetSession(S.GetSessionRequest(session_id=other.session_id))).session_id


async def test_list_pages_through_every_session_once(client: AsyncClient) -> None:
    ids = {
        (await client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(user_id="p")))).session_id
        for _ in range(7)
    }
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await client.sessions.ListSessions(S.ListSessionsRequest(user_id="p", page_size=3, page_token=token))
        seen += [s.session_id for s in page.sessions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)


async def test_bad_page_parameters_are_invalid_argument(client: AsyncClient) -> None:
    error = await _error(client.sessions.ListSessions(S.ListSessionsRequest(page_size=-1)))
    assert error.violations[0][0] == "page_size"
    bad_token = "not-a-token"
    error = await _error(client.sessions.ListSessions(S.ListSessionsRequest(page_token=bad_token)))
    assert error.violations[0][0] == "page_token"
    for _ in range(2):
        await client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session(user_id="q")))
    page = await client.sessions.ListSessions(S.ListSessionsRequest(user_id="q", page_size=1))
    error = await _error(
        client.sessions.ListSessions(S.ListSessionsRequest(user_id="other", page_token=page.next_page_token))
    )
    assert "different filters" in error.message


async def test_gateway_info_health_and_stats(client: AsyncClient) -> None:
    info = await client.gateway.GetInfo(gateway_pb2.GetInfoRequest())
    assert info.name == "flowport" and info.api_version == "v1"
    assert {f.name: f.enabled for f in info.features}["sessions"] is True
    health = await client.gateway.GetHealth(gateway_pb2.GetHealthRequest())
    assert health.status == "healthy"
    assert health.components["database"].status == "healthy"
    assert health.components["database"].latency > 0
    await client.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
    stats = await client.gateway.GetStats(gateway_pb2.GetStatsRequest())
    assert stats.sessions.active == 1
    assert stats.requests.total >= 3
    assert stats.system.rss_bytes > 0


async def test_standard_health_and_reflection(running: Running, client: AsyncClient) -> None:
    before = (await client.gateway.GetStats(gateway_pb2.GetStatsRequest())).requests.total
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", *ALL_SERVICES]:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Envoy's health checks are not the API's calls: GetStats counts only the one GetStats.
        after = (await client.gateway.GetStats(gateway_pb2.GetStatsRequest())).requests.total
        assert after == before + 1
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert set(ALL_SERVICES) <= set(names)


async def test_a_second_server_on_the_same_port_fails_naming_it(running: Running, settings: Settings) -> None:
    from flowport.server.app import StartupError

    before = _sandbox_workers()
    with pytest.raises(StartupError, match=f"--grpc-port {settings.grpc_port}"):
        await start(settings)
    # What the failed start opened is closed again: its sandbox workers are gone.
    for _ in range(100):
        if _sandbox_workers() <= before:
            break
        await asyncio.sleep(0.05)
    assert _sandbox_workers() == before


def _sandbox_workers() -> set[int]:
    """Children of this process that are sandbox workers."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"PPid:\t{os.getpid()}\n" in status and b"flowport.server.sandbox.worker" in cmdline:
            found.add(int(entry.name))
    return found


async def test_graceful_stop_lets_in_flight_calls_finish(settings: Settings) -> None:
    running = await start(settings)
    store = running.store
    original = store.get_session
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow_get(*args: object, **kwargs: object) -> object:
        arrived.set()
        await release.wait()
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    store.get_session = slow_get  # type: ignore[method-assign]
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as c:
        created = await c.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        in_flight = asyncio.ensure_future(c.sessions.GetSession(S.GetSessionRequest(session_id=created.session_id)))
        await asyncio.wait_for(arrived.wait(), 10)  # the call is in the server
        stopping = asyncio.ensure_future(stop(running, 5.0))
        await asyncio.sleep(0.2)
        release.set()
        got = await in_flight
        await stopping
    assert got.session_id == created.session_id


async def test_watch_execution_streams_state_then_events_until_the_end(client: AsyncClient) -> None:
    from google.protobuf import json_format

    from flowport.v1 import execution_pb2

    workflow = json_format.ParseDict(
        {
            "name": "watched",
            "nodes": [
                {"type": "PythonCodeNode", "name": "a", "config": {"code": "import time\ntime.sleep(0.5)\nresult = 1"}}
            ],
        },
        workflow_pb2.Workflow(),
    )
    await client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
    started = await client.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="watched"))
    messages = [
        m
        async for m in client.executions.WatchExecution(
            execution_pb2.WatchExecutionRequest(execution_id=started.execution_id)
        )
    ]
    assert messages[0].WhichOneof("update") == "execution"
    assert messages[0].execution.execution_id == started.execution_id
    # The node sleeps, so the watch begins while the execution runs.
    assert messages[0].execution.state in (execution_pb2.Execution.STATE_PENDING, execution_pb2.Execution.STATE_RUNNING)
    types = [m.event.type for m in messages[1:]]
    assert types[-3:] == ["node.completed", "execution.progress", "execution.completed"]
    assert all(m.event.execution_id == started.execution_id for m in messages[1:])
    error = await _error(
        client.executions.WatchExecution(execution_pb2.WatchExecutionRequest(execution_id="exe_missing")).read()
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND


async def test_a_start_failing_late_closes_what_it_opened(tmp_path: Path) -> None:
    from flowport.server.app import StartupError

    broken = tmp_path / "jwks.json"
    broken.write_text("not a key set")
    # The JWKS file is read after the store, the sandbox pool and the webhook
    # dispatcher have started.
    settings = make_settings(tmp_path / "data", jwt_jwks_file=str(broken))
    before = _sandbox_workers()
    with pytest.raises(StartupError, match="bearer tokens"):
        await start(settings)
    for _ in range(100):
        if _sandbox_workers() <= before:
            break
        await asyncio.sleep(0.05)
    assert _sandbox_workers() == before
    # The store was closed too: a new start opens the same file at once.
    settings = make_settings(tmp_path / "data")
    await stop(await start(settings), 1.0)


async def test_a_draining_server_fails_its_health_check_serves_on_then_ends_its_streams_cleanly(
    running: Running, settings: Settings
) -> None:
    import httpx

    from flowport.v1 import event_pb2

    bridge_health = f"http://127.0.0.1:{settings.websocket_port}/healthz"
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as c, httpx.AsyncClient() as http:
        assert (await http.get(bridge_health)).status_code == 200
        health = health_pb2_grpc.HealthStub(c.channel)
        stream = c.events.StreamEvents(event_pb2.StreamEventsRequest(types=["session.*"]))
        assert (await stream.read()).type == "heartbeat"  # subscribed
        # A drain long enough for the three calls below on a slow machine.
        stopping = asyncio.ensure_future(stop(running, 2.0, drain=3.0))
        await asyncio.sleep(0.2)
        # Envoy's health check sees it at once...
        checked = await health.Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ...and the /ws bridge's, so new WebSocket connections go elsewhere too.
        assert (await http.get(bridge_health)).status_code == 503
        # ...while calls Envoy sent before it noticed are still answered, and streams still follow.
        created = await c.sessions.CreateSession(S.CreateSessionRequest(session=S.Session()))
        assert not stopping.done()
        rest = [event async for event in stream]
        assert await stream.code() == grpc.StatusCode.OK
        await stopping
    *events, last = [e for e in rest if e.type != "heartbeat" or e.id]
    assert [(e.type, e.session_id) for e in events] == [("session.created", created.session_id)]
    # The stream ends on a heartbeat carrying its cursor, for its client to resume from on another server.
    assert last.type == "heartbeat" and last.id == events[-1].id


async def test_a_second_stop_signal_skips_the_drain_and_cancels_calls_in_flight(running: Running) -> None:
    from flowport.v1 import execution_pb2

    # An HTTP node whose server accepts and never answers keeps one waited call in flight.
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    config = struct_pb2.Struct()
    config.update({"url": f"http://127.0.0.1:{port}/", "timeout": 120})
    node = workflow_pb2.Node(name="call", type="HTTPRequestNode", config=config)
    async with AsyncClient(f"127.0.0.1:{running.port}", api_key=ADMIN_KEY) as c:
        made = await c.workflows.CreateWorkflow(
            workflow_pb2.CreateWorkflowRequest(workflow=workflow_pb2.Workflow(name="hangs", nodes=[node]))
        )
        waited = asyncio.ensure_future(
            c.executions.CreateExecution(
                execution_pb2.CreateExecutionRequest(workflow_id=made.workflow_id, wait=True), timeout=120
            )
        )
        for _ in range(200):
            if held:
                break
            await asyncio.sleep(0.05)
        assert held, "the HTTP node never connected"
        hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.ensure_future(stop(running, 120.0, drain=120.0, hurry=hurry))
        await asyncio.sleep(0.3)
        assert not stopping.done(), "the first signal drains"
        hurry.set()
        # Without the second signal the drain alone would take 120 s, and the call its 120 s of grace.
        await asyncio.wait_for(stopping, 30)
        with pytest.raises(ApiError) as caught:
            await waited
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert loop.time() - began < 60
    silent.close()
    for writer in held:
        writer.close()


async def test_a_stream_its_client_closes_is_not_an_error(client: AsyncClient) -> None:
    from flowport.v1 import event_pb2

    before = (await client.gateway.GetStats(gateway_pb2.GetStatsRequest())).requests
    stream = client.events.StreamEvents(event_pb2.StreamEventsRequest())
    first = await stream.read()
    assert first.type == "heartbeat"
    stream.cancel()
    for _ in range(100):  # the server sees the cancel a moment later
        stats = await client.gateway.GetStats(gateway_pb2.GetStatsRequest())
        if stats.realtime.active_streams == 0:
            break
        await asyncio.sleep(0.02)
    assert stats.realtime.active_streams == 0
    assert stats.requests.errors == before.errors, "a client closing its stream is how streams end"
