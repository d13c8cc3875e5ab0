"""Two flowport processes sharing one PostgreSQL database and one Redis:
events published on one reach streams on the other, in one order that a
resume by id follows without gaps; an execution started on one is watched
through the other; and without Redis both keep serving, degraded."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flowport.clients import ApiError, Client
from flowport.v1 import apikey_pb2, event_pb2, execution_pb2, gateway_pb2, session_pb2, webhook_pb2, workflow_pb2

from ..backends import RedisServer
from ..conftest import ADMIN_KEY, ServeProcess, make_settings
from ..gate import Gate

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def _two_servers(
    tmp_path: Path, postgres_url: str, redis_url: str, **overrides: object
) -> Iterator[list[ServeProcess]]:
    """Servers "a" and "b" sharing one PostgreSQL database and one Redis; stopped afterwards."""
    servers: list[ServeProcess] = []
    try:
        for name in ("a", "b"):
            server = ServeProcess(
                make_settings(tmp_path / name, database_url=postgres_url, redis_url=redis_url, **overrides)
            )
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def clients(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[list[Client]]:
    with (
        _two_servers(tmp_path, postgres_url, redis_url, stream_heartbeat=0.5) as servers,
        Client(servers[0].settings.grpc_target, api_key=ADMIN_KEY) as a,
        Client(servers[1].settings.grpc_target, api_key=ADMIN_KEY) as b,
    ):
        yield [a, b]


def _take(stream: grpc.Future, count: int, timeout: float = 15.0) -> list[event_pb2.Event]:
    """The next `count` events of a stream that are not heartbeats."""
    got: list[event_pb2.Event] = []
    deadline = time.monotonic() + timeout
    for event in stream:
        if event.type != "heartbeat":
            got.append(event)
        if len(got) == count or time.monotonic() > deadline:
            break
    return got


def _subscribed(stream: grpc.Future) -> None:
    """Wait for a stream's first message: a heartbeat, sent once it has subscribed."""
    assert next(stream).type == "heartbeat"


def _bus_healthy(client: Client, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while client.gateway.GetHealth(gateway_pb2.GetHealthRequest()).components["bus"].status != "healthy":
        assert time.monotonic() < deadline, "the bus never recovered"
        time.sleep(0.2)


def _session(client: Client) -> str:
    return client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session_pb2.Session())).session_id


def test_a_stream_on_one_process_sees_the_other_and_resumes_without_gaps(clients: list[Client]) -> None:
    a, b = clients
    request = event_pb2.StreamEventsRequest(types=["session.*"])
    stream = b.events.StreamEvents(request, timeout=30)
    _subscribed(stream)
    published = [_session(a), _session(b), _session(a)]
    seen = _take(stream, 3)
    stream.cancel()
    # Redis orders them (not the order the calls returned in: a process adds
    # its events to the stream just after answering).
    assert sorted(e.session_id for e in seen) == sorted(published)
    ids = [int(e.id) for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == 3
    # Events published while nobody listens, on both processes...
    missed = [_session(a), _session(b)]
    # ...come back on a resume from the last id seen, on either process.
    for client in (a, b):
        resumed = client.events.StreamEvents(event_pb2.StreamEventsRequest(types=["session.*"], after_id=str(ids[-1])))
        again = _take(resumed, 2)
        resumed.cancel()
        assert sorted(e.session_id for e in again) == sorted(missed)
        assert [int(e.id) for e in again] == sorted(int(e.id) for e in again)


def test_an_execution_started_on_one_process_is_watched_through_the_other(clients: list[Client]) -> None:
    a, b = clients
    workflow = json_format.ParseDict(
        {
            "name": "slowish",
            "nodes": [
                {"type": "PythonCodeNode", "name": "nap", "config": {"code": "import time\ntime.sleep(1)\nresult = 7"}}
            ],
        },
        workflow_pb2.Workflow(),
    )
    a.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
    started = a.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="slowish"))
    watch = b.executions.WatchExecution(
        execution_pb2.WatchExecutionRequest(execution_id=started.execution_id), timeout=30
    )
    responses = list(watch)
    assert responses[0].HasField("execution")
    last = responses[-1]
    finished = last.execution.state if last.HasField("execution") else None
    assert (last.event.type if last.HasField("event") else "") == "execution.completed" or (
        finished == execution_pb2.Execution.STATE_SUCCEEDED
    )


def test_without_redis_both_keep_serving_degraded_and_recover(clients: list[Client], redis_server: RedisServer) -> None:
    a, b = clients
    redis_server.stop()
    try:
        assert _session(a) and _session(b)  # requests keep working
        health = a.gateway.GetHealth(gateway_pb2.GetHealthRequest())
        assert health.components["bus"].status == "degraded"
        assert health.status == "degraded"
        # Streams still get this process's own events.
        stream = a.events.StreamEvents(event_pb2.StreamEventsRequest(types=["session.*"]), timeout=30)
        _subscribed(stream)
        own = _session(a)
        assert [e.session_id for e in _take(stream, 1)] == [own]
        stream.cancel()
    finally:
        redis_server.start()
    # Both processes: A publishes through Redis again, and B reads from it again.
    _bus_healthy(a)
    _bus_healthy(b)
    stream = b.events.StreamEvents(event_pb2.StreamEventsRequest(types=["session.*"]), timeout=30)
    _subscribed(stream)
    crossed = _session(a)
    assert [e.session_id for e in _take(stream, 1)] == [crossed]
    stream.cancel()


class _SlowReceiver(ThreadingHTTPServer):
    """Counts POSTs and answers each after a pause (so a node calling it is caught RUNNING)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.posts = 0
        super().__init__(("127.0.0.1", 0), _SlowHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


class _SlowHandler(BaseHTTPRequestHandler):
    server: _SlowReceiver

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.posts += 1
        time.sleep(4)
        with contextlib.suppress(OSError):  # the caller may be gone (killed)
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")


@pytest.fixture
def leased(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[list[ServeProcess]]:
    """Two servers with short execution leases (2 s)."""
    with _two_servers(tmp_path, postgres_url, redis_url, execution_lease_seconds=2.0) as servers:
        yield servers


def _wait_for(client: Client, execution_id: str, states: set[int], seconds: float) -> execution_pb2.Execution:
    deadline = time.monotonic() + seconds
    while True:
        got = client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=execution_id))
        if got.state in states or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_when_a_process_dies_another_takes_over_its_executions(leased: list[ServeProcess]) -> None:
    a_server, b_server = leased
    receiver = _SlowReceiver()
    try:
        with (
            Client(a_server.settings.grpc_target, api_key=ADMIN_KEY) as a,
            Client(b_server.settings.grpc_target, api_key=ADMIN_KEY) as b,
        ):
            nap = {
                "type": "PythonCodeNode",
                "name": "nap",
                "config": {"code": "import time\ntime.sleep(3)\nresult = 1"},
            }
            post = {
                "type": "HTTPRequestNode",
                "name": "post",
                "config": {"url": f"http://127.0.0.1:{receiver.server_port}/hook", "method": "POST", "body": {}},
            }
            for name, node in (("safe", nap), ("unsafe", post)):
                workflow = json_format.ParseDict({"name": name, "nodes": [node]}, workflow_pb2.Workflow())
                a.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
            safe = a.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="safe"))
            unsafe = a.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="unsafe"))
            running = {execution_pb2.Execution.STATE_RUNNING}
            for started in (safe, unsafe):
                assert _wait_for(b, started.execution_id, running, 10).state in running
            # The POST is under way (its receiver holds it 4 s) when A dies.
            deadline = time.monotonic() + 10
            while receiver.posts < 1:
                assert time.monotonic() < deadline, "the POST was never sent"
                time.sleep(0.05)
            a_server.kill()
            finished = {
                execution_pb2.Execution.STATE_SUCCEEDED,
                execution_pb2.Execution.STATE_FAILED,
            }
            # The lease (2 s) runs out; B takes both over within a few renewals.
            done_safe = _wait_for(b, safe.execution_id, finished, 30)
            done_unsafe = _wait_for(b, unsafe.execution_id, finished, 30)
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert done_safe.state == execution_pb2.Execution.STATE_SUCCEEDED, done_safe.error.message
    assert done_unsafe.state == execution_pb2.Execution.STATE_FAILED
    assert "interrupted" in done_unsafe.error.message and "not safe to run twice" in done_unsafe.error.message
    assert receiver.posts == 1, "the POST must not be sent twice"


class _Collector(ThreadingHTTPServer):
    """Collects webhook deliveries."""

    daemon_threads = True

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        super().__init__(("127.0.0.1", 0), _CollectHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


class _CollectHandler(BaseHTTPRequestHandler):
    server: _Collector

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.server.bodies.append(self.rfile.read(int(self.headers.get("content-length", "0"))))
        self.send_response(204)
        self.end_headers()


def test_a_webhook_made_on_one_process_gets_the_events_of_the_other(clients: list[Client]) -> None:
    a, b = clients
    collector = _Collector()
    try:
        url = f"http://127.0.0.1:{collector.server_port}/hook"
        a.webhooks.CreateWebhook(
            webhook_pb2.CreateWebhookRequest(webhook=webhook_pb2.Webhook(url=url, event_types=["session.created"]))
        )
        # The other process hears of the new webhook through the bus, some time later on a
        # busy machine: sessions are made on it until one is delivered.
        created: list[str] = []
        deadline = time.monotonic() + 15
        while not collector.bodies and time.monotonic() < deadline:
            created.append(_session(b))
            time.sleep(0.5)
        time.sleep(0.5)  # a duplicate would arrive by now
    finally:
        collector.shutdown()
        collector.server_close()
    assert collector.bodies, "no event of the other process was delivered"
    delivered = [next(s for s in created if s.encode() in body) for body in collector.bodies]
    assert len(delivered) == len(set(delivered)), delivered  # each event once, from one process


def test_sessions_created_on_either_process_are_counted_by_both(clients: list[Client]) -> None:
    a, b = clients
    first = _session(a)
    _session(b)
    _session(b)
    b.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=first))
    for client in clients:
        sessions = client.gateway.GetStats(gateway_pb2.GetStatsRequest()).sessions
        assert (sessions.active, sessions.created) == (2, 3), client.target


def test_a_key_revoked_on_one_process_is_refused_at_once_by_the_other(clients: list[Client]) -> None:
    a, b = clients
    created = a.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme")))
    target = b.target
    with Client(target, api_key=created.key) as user:
        user.sessions.ListSessions(session_pb2.ListSessionsRequest())  # B now has the key cached
        a.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=created.api_key.key_id))
        # The revocation crosses the bus in milliseconds; without it B would keep the key for its
        # cache's 30 s, so 10 s on a slow machine still tells the two apart.
        deadline = time.monotonic() + 10
        while True:
            try:
                user.sessions.ListSessions(session_pb2.ListSessionsRequest())
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() < deadline, "process B kept accepting a revoked key"
            time.sleep(0.05)


def test_a_key_revoked_on_one_process_ends_its_open_streams_on_the_other(clients: list[Client]) -> None:
    a, b = clients
    created = a.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=apikey_pb2.ApiKey(tenant="acme")))
    with Client(b.target, api_key=created.key) as user:
        # Heartbeats every 0.5 s keep it busy; the deadline bounds the wait for its end.
        stream = user.events.StreamEvents(event_pb2.StreamEventsRequest(), timeout=20)
        assert next(stream).type == "heartbeat"  # open on process B
        a.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=created.api_key.key_id))
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
    error = ApiError.from_rpc_error(ended.value)
    assert (error.code(), error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_REVOKED")


def test_an_execution_running_on_one_process_is_cancelled_through_the_other(clients: list[Client]) -> None:
    a, b = clients
    code = "import time\ntime.sleep(20)\nresult = 1"
    workflow = json_format.ParseDict(
        {"name": "long", "nodes": [{"type": "PythonCodeNode", "name": "nap", "config": {"code": code}}]},
        workflow_pb2.Workflow(),
    )
    a.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
    started = a.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="long"))
    running = {execution_pb2.Execution.STATE_RUNNING}
    assert _wait_for(b, started.execution_id, running, 10).state in running
    cancelled = b.executions.CancelExecution(execution_pb2.CancelExecutionRequest(execution_id=started.execution_id))
    assert cancelled.state == execution_pb2.Execution.STATE_CANCELLED
    time.sleep(1)  # a run that went on in process A would record its own end by now... or in 20 s
    again = a.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=started.execution_id))
    assert again.state == execution_pb2.Execution.STATE_CANCELLED
    assert again.end_time.ToNanoseconds() - again.start_time.ToNanoseconds() < 15 * 10**9, "the run was stopped"


@pytest.fixture
def one_slot(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[list[ServeProcess]]:
    """Two servers that each run one execution at a time."""
    with _two_servers(tmp_path, postgres_url, redis_url, max_concurrent_executions=1) as servers:
        yield servers


def _nap_workflow(client: Client, name: str, seconds: float) -> None:
    code = f"import time\ntime.sleep({seconds})\nresult = {{'n': n * 2}}"
    workflow = json_format.ParseDict(
        {"name": name, "nodes": [{"type": "PythonCodeNode", "name": "nap", "config": {"code": code}}]},
        workflow_pb2.Workflow(),
    )
    client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))


def _held_workflow(client: Client, name: str, gate: Gate) -> None:
    """A workflow whose one node runs until `gate` opens."""
    workflow = json_format.ParseDict({"name": name, "nodes": [gate.node()]}, workflow_pb2.Workflow())
    client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))


def _execution_stats(client: Client) -> gateway_pb2.ExecutionStats:
    return client.gateway.GetStats(gateway_pb2.GetStatsRequest()).executions


@pytest.fixture
def gate() -> Iterator[Gate]:
    with Gate() as held:
        yield held


def test_work_a_full_process_takes_runs_on_a_process_with_room(one_slot: list[ServeProcess], gate: Gate) -> None:
    a_server, b_server = one_slot
    with (
        Client(a_server.settings.grpc_target, api_key=ADMIN_KEY) as a,
        Client(b_server.settings.grpc_target, api_key=ADMIN_KEY) as b,
    ):
        # "long" runs until the gate opens, however slow the machine: the slots stay taken.
        _held_workflow(a, "long", gate)
        _nap_workflow(a, "short", 0)
        inputs = {"n": 21}
        long_run = a.executions.CreateExecution(
            execution_pb2.CreateExecutionRequest(workflow_id="long", inputs=json_format.ParseDict(inputs, Struct()))
        )
        running = {execution_pb2.Execution.STATE_RUNNING}
        assert _wait_for(a, long_run.execution_id, running, 10).state in running
        # A is full: the next one goes to the shared queue, and B runs it
        # (synchronously waited for through A) while A's slot is still taken.
        short_run = a.executions.CreateExecution(
            execution_pb2.CreateExecutionRequest(
                workflow_id="short", inputs=json_format.ParseDict(inputs, Struct()), wait=True
            ),
            timeout=30,
        )
        assert short_run.state == execution_pb2.Execution.STATE_SUCCEEDED, short_run.error.message
        assert json_format.MessageToDict(short_run.outputs) == {"nap": {"result": {"n": 42.0}}}
        assert (
            a.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=long_run.execution_id)).state
            in running
        ), "B ran it while A was still busy"
        a_stats, b_stats = _execution_stats(a), _execution_stats(b)
        assert (a_stats.queued, a_stats.taken_from_queue) == (1, 0)
        assert (b_stats.queued, b_stats.taken_from_queue) == (0, 1)
        # Both full now: a third one waits in the queue, and a cancel through
        # either process ends it there, before any process runs it.
        b_long = b.executions.CreateExecution(
            execution_pb2.CreateExecutionRequest(workflow_id="long", inputs=json_format.ParseDict(inputs, Struct()))
        )
        assert _wait_for(b, b_long.execution_id, running, 10).state in running
        queued = a.executions.CreateExecution(
            execution_pb2.CreateExecutionRequest(workflow_id="short", inputs=json_format.ParseDict(inputs, Struct()))
        )
        assert queued.state == execution_pb2.Execution.STATE_PENDING
        cancelled = b.executions.CancelExecution(execution_pb2.CancelExecutionRequest(execution_id=queued.execution_id))
        assert cancelled.state == execution_pb2.Execution.STATE_CANCELLED
        gate.release.set()
        finished = {execution_pb2.Execution.STATE_SUCCEEDED}
        assert _wait_for(a, long_run.execution_id, finished, 15).state in finished
        assert _wait_for(b, b_long.execution_id, finished, 15).state in finished
        time.sleep(1.5)  # a slot is free on both: nothing may take the cancelled one
        again = a.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=queued.execution_id))
        assert again.state == execution_pb2.Execution.STATE_CANCELLED and not again.node_runs


def test_an_execution_asked_of_a_draining_process_runs_on_one_that_stays(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    with _two_servers(tmp_path, postgres_url, redis_url, drain_seconds=60) as (a_server, b_server):
        assert a_server.process is not None
        with (
            Client(a_server.settings.grpc_target, api_key=ADMIN_KEY) as a,
            Client(b_server.settings.grpc_target, api_key=ADMIN_KEY) as b,
        ):
            _nap_workflow(a, "short", 0)
            a_server.process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(a.channel)
            for _ in range(100):
                if health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
            # Draining, A still answers the call Envoy sent it before noticing; B runs the execution.
            four = json_format.ParseDict({"n": 4}, Struct())
            made = a.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="short", inputs=four))
            finished = {execution_pb2.Execution.STATE_SUCCEEDED, execution_pb2.Execution.STATE_FAILED}
            done = _wait_for(b, made.execution_id, finished, 30)
            assert done.state == execution_pb2.Execution.STATE_SUCCEEDED, done.error.message
            assert json_format.MessageToDict(done.outputs) == {"nap": {"result": {"n": 8.0}}}
            a_stats, b_stats = _execution_stats(a), _execution_stats(b)
            assert (a_stats.queued, a_stats.taken_from_queue) == (1, 0)
            assert (b_stats.queued, b_stats.taken_from_queue) == (0, 1)
            # One its caller waits for runs on A, within the drain: its call is in flight there anyway.
            waited = a.executions.CreateExecution(
                execution_pb2.CreateExecutionRequest(
                    workflow_id="short", inputs=json_format.ParseDict({"n": 5}, Struct()), wait=True
                ),
                timeout=30,
            )
            assert waited.state == execution_pb2.Execution.STATE_SUCCEEDED, waited.error.message
            assert _execution_stats(a).queued == 1 and _execution_stats(b).taken_from_queue == 1
        # A second SIGTERM each: neither sits out its drain.
        a_server.process.send_signal(signal.SIGTERM)
        assert a_server.process.wait(30) == 0
        assert b_server.process is not None
        for _ in range(2):
            b_server.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        assert b_server.process.wait(30) == 0


def test_without_the_queue_a_full_process_refuses_more_work(
    one_slot: list[ServeProcess], redis_server: RedisServer, gate: Gate
) -> None:
    a_server, _ = one_slot
    with Client(a_server.settings.grpc_target, api_key=ADMIN_KEY) as a:
        _held_workflow(a, "long", gate)
        inputs = json_format.ParseDict({"n": 1}, Struct())
        first = a.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="long", inputs=inputs))
        redis_server.stop()
        try:
            with pytest.raises(grpc.RpcError) as refused:
                a.executions.CreateExecution(execution_pb2.CreateExecutionRequest(workflow_id="long", inputs=inputs))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "maximum of 1 executions" in (refused.value.details() or "")
            assert _execution_stats(a).queue_failures >= 1
        finally:
            redis_server.start()
        gate.release.set()
        finished = {execution_pb2.Execution.STATE_SUCCEEDED}
        assert _wait_for(a, first.execution_id, finished, 15).state in finished
