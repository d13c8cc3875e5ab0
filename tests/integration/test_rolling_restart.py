"""A rolling restart drops nothing (issue 21): three `flowport serve` on 127.0.0.2, 127.0.0.3 and
127.0.0.4 (separate loopback addresses standing for separate hosts, one port) share PostgreSQL
and Redis behind one Envoy. While a small load runs through Envoy (REST and gRPC: reads, and
executions with request ids), each server in turn gets SIGTERM, drains, exits and is started
again. No call fails, each request id made one execution that ended once, and event streams
(the SDK's over gRPC, an SSE reader reconnecting with Last-Event-ID) resume without gaps."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from flowport.clients import Client
from flowport.server.settings import Settings
from flowport.server.shutdown import DEFAULT_DRAIN
from flowport.transcoder.envoy_routes import CLUSTER
from flowport.v1 import event_pb2, execution_pb2, workflow_pb2

from ..backends import free_port
from ..conftest import ADMIN_HEADERS, ADMIN_KEY, EnvoyProcess, ServeProcess, make_settings
from .test_stream_edge import _sse

pytestmark = pytest.mark.integration

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
WORKFLOW = "rolling"
TYPES = "execution.*"
# Each load worker stops after this many rounds even if the restarts take longer.
MAX_ROUNDS = 300
SSE = {"Accept": "text/event-stream"}
END_EVENTS = ("execution.completed", "execution.failed", "execution.cancelled")


@dataclass
class Load:
    """What the load's workers did: every failure, and the execution each request id made."""

    done: threading.Event = field(default_factory=threading.Event)
    failures: list[str] = field(default_factory=list)
    executions: dict[str, execution_pb2.Execution] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)


def _answered(load: Load, name: str, call: Callable[[], httpx.Response]) -> httpx.Response | None:
    """`call()`'s response when it is a 200; anything else is a failure of the load."""
    load.calls["rest"] += 1
    try:
        response = call()
    except httpx.HTTPError as exc:
        load.failures.append(f"{name}: {type(exc).__name__}: {exc}")
        return None
    if response.status_code != 200:
        load.failures.append(f"{name}: {response.status_code} {response.text[:300]}")
        return None
    return response


def _rest_worker(base: str, load: Load) -> None:
    with httpx.Client(base_url=base, headers=ADMIN_HEADERS, timeout=30) as http:
        for n in range(MAX_ROUNDS):
            if load.done.is_set():
                return
            request_id = f"rest-{n}"
            body = {"workflow_id": WORKFLOW, "request_id": request_id, "wait": True}
            made = _answered(load, "POST /api/executions", lambda: http.post("/api/executions", json=body))  # noqa: B023
            if made is not None:
                execution = json_format.ParseDict(made.json(), execution_pb2.Execution(), ignore_unknown_fields=True)
                load.executions[request_id] = execution
                path = f"/api/executions/{execution.execution_id}"
                _answered(load, "GET /api/executions/{id}", lambda: http.get(path))  # noqa: B023
            _answered(load, "GET /api/workflows/{id}", lambda: http.get(f"/api/workflows/{WORKFLOW}"))


def _grpc_worker(target: str, load: Load) -> None:
    # No retries of its own: whatever the restarts do, Envoy alone must hide it.
    with Client(target, api_key=ADMIN_KEY, retries=1, timeout=30) as client:
        for n in range(MAX_ROUNDS):
            if load.done.is_set():
                return
            request_id = f"grpc-{n}"
            try:
                load.calls["grpc"] += 3
                made = client.executions.CreateExecution(
                    execution_pb2.CreateExecutionRequest(workflow_id=WORKFLOW, request_id=request_id, wait=True)
                )
                load.executions[request_id] = made
                client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=made.execution_id))
                client.workflows.GetWorkflow(workflow_pb2.GetWorkflowRequest(workflow_id=WORKFLOW))
            except grpc.RpcError as exc:
                load.failures.append(f"gRPC {request_id}: {exc.code().name} {exc.details()}")  # type: ignore[attr-defined]


@dataclass
class Followed:
    """Events one resumable stream yielded, and how many times it (re)connected."""

    events: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    errors: list[str] = field(default_factory=list)


def _follow_sdk(target: str, after: str, into: Followed, stop: threading.Event) -> Client:
    """The SDK's resuming stream over gRPC through Envoy, read by a thread until `stop` (then the client closes)."""
    client = Client(target, api_key=ADMIN_KEY, retries=1)

    def stream_events(request: event_pb2.StreamEventsRequest) -> Any:
        into.connections += 1
        return client.events.StreamEvents(request)

    def read() -> None:
        from flowport.clients import streams

        try:
            for event in streams.events(stream_events, event_pb2.StreamEventsRequest(types=[TYPES], after_id=after)):
                into.events.append({"id": event.id, "type": event.type, "execution_id": event.execution_id})
        except Exception as exc:  # noqa: BLE001 - the client closing ends the stream; anything before is a failure
            if not stop.is_set():
                into.errors.append(f"{type(exc).__name__}: {exc}")

    threading.Thread(target=read, daemon=True).start()
    return client


def _follow_sse(base: str, after: str, into: Followed, stop: threading.Event) -> None:
    """As an EventSource does: reconnect when the stream ends, sending the last `id:` as Last-Event-ID."""
    last_id = after
    with httpx.Client(base_url=base, headers={**ADMIN_HEADERS, **SSE}, timeout=httpx.Timeout(30, read=5)) as http:
        while not stop.is_set():
            into.connections += 1
            try:
                with http.stream("GET", "/events", params={"types": TYPES}, headers={"Last-Event-ID": last_id}) as r:
                    if r.status_code != 200:
                        into.errors.append(f"GET /events: {r.status_code} {r.read()[:300]!r}")
                        return
                    for event in _sse(r.iter_lines()):
                        last_id = event.get("id", last_id)
                        if event.get("event") != "heartbeat":
                            data = json.loads(event["data"])
                            into.events.append(
                                {"id": data["id"], "type": data["type"], "execution_id": data["execution_id"]}
                            )
                        if stop.is_set():
                            return
            except httpx.HTTPError as exc:  # a stream cut rather than ended
                into.errors.append(f"GET /events: {type(exc).__name__}: {exc}")
                time.sleep(0.2)


def _hosts_healthy(admin_port: int, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        clusters = httpx.get(f"http://127.0.0.1:{admin_port}/clusters?format=json", timeout=5).json()
        servers = next(c for c in clusters["cluster_statuses"] if c["name"] == CLUSTER)
        hosts = servers.get("host_statuses", [])
        healthy = [h for h in hosts if h["health_status"].get("eds_health_status") == "HEALTHY"]
        if len(healthy) == count and not any(h["health_status"].get("failed_active_health_check") for h in hosts):
            return
        assert time.monotonic() < deadline, f"Envoy's servers not all healthy: {hosts}"
        time.sleep(0.1)


def _logged(target: str, after: str, executions: int) -> list[dict[str, Any]]:
    """The log's events after `after`, once it has the end of each of the `executions` (or 10 s on)."""
    deadline = time.monotonic() + 10
    while True:
        found = _replayed(target, after)
        if sum(e["type"] in END_EVENTS for e in found) >= executions or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _replayed(target: str, after: str) -> list[dict[str, Any]]:
    """A fresh stream's replay of the log after `after`, read up to the heartbeat that follows it."""
    with Client(target, api_key=ADMIN_KEY) as client:
        stream = client.events.StreamEvents(event_pb2.StreamEventsRequest(types=[TYPES], after_id=after), timeout=30)
        found: list[dict[str, Any]] = []
        for n, event in enumerate(stream):
            if event.type == "heartbeat":
                if n:
                    break
                continue
            found.append({"id": event.id, "type": event.type, "execution_id": event.execution_id})
        stream.cancel()
        return found


def _in_turn(servers: list[ServeProcess], admin_port: int, between: Callable[[], None]) -> None:
    """Restart each server in turn, the next one only once Envoy sees all of them healthy again."""
    for server in servers:
        assert server.process is not None
        server.process.terminate()  # SIGTERM: drain, then stop
        assert server.process.wait(DEFAULT_DRAIN + 20) == 0
        server.start()
        _hosts_healthy(admin_port, len(servers))
        between()


@dataclass
class Cluster:
    """The three servers and the Envoy in front of them."""

    servers: list[ServeProcess]
    edge: Settings

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.edge.http_port}"


def shared_servers(tmp_path: Path, port: int, postgres_url: str, redis_url: str) -> dict[str, ServeProcess]:
    """A `flowport serve` (not started) on each of HOSTS at `port`, sharing one PostgreSQL and one Redis,
    draining as in production."""
    shared = {"database_url": postgres_url, "redis_url": redis_url, "websocket_port": 0, "metrics_port": 0}
    return {
        host: ServeProcess(
            make_settings(
                tmp_path / host,
                grpc_host=host,
                grpc_port=port,
                drain_seconds=DEFAULT_DRAIN,
                sandbox_workers=1,
                stream_heartbeat=0.5,
                **shared,
            )
        )
        for host in HOSTS
    }


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[Cluster]:
    port = free_port()
    servers = list(shared_servers(tmp_path, port, postgres_url, redis_url).values())
    upstreams = ",".join(f"{host}:{port}" for host in HOSTS)
    edge = make_settings(tmp_path / "edge", no_local_server=True, upstream=upstreams, websocket_port=0)
    envoy = EnvoyProcess(edge)
    try:
        for server in servers:
            server.start()
        envoy.start()
        _hosts_healthy(edge.admin_port, len(servers))
        yield Cluster(servers, edge)
    finally:
        envoy.stop()
        # SIGINT: no drain, all at once.
        running = [s.process for s in servers if s.process is not None and s.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGINT)
        for process in running:
            process.wait(30)


def _prepare(target: str) -> str:
    """The workflow the load runs, and a cursor from before its first event."""
    nap = {"type": "PythonCodeNode", "name": "nap", "config": {"code": "import time\ntime.sleep(0.2)\nresult = 1"}}
    workflow = json_format.ParseDict({"name": WORKFLOW, "nodes": [nap]}, workflow_pb2.Workflow())
    with Client(target, api_key=ADMIN_KEY) as client:
        client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=workflow))
        newest = client.events.ListRecentEvents(event_pb2.ListRecentEventsRequest(page_size=1)).events
    return newest[0].id if newest else "0"


def _each_ran_once(target: str, load: Load, logged: list[dict[str, Any]]) -> None:
    """Each request id made one execution, which succeeded and ended once."""
    with Client(target, api_key=ADMIN_KEY) as client:
        for request_id, made in load.executions.items():
            stored = client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=made.execution_id))
            assert stored.request_id == request_id
            assert stored.state == execution_pb2.Execution.STATE_SUCCEEDED, (request_id, stored.error)
        request = execution_pb2.ListExecutionsRequest(workflow_id=WORKFLOW, page_size=1000)
        listed = client.executions.ListExecutions(request).executions
    assert sorted(e.request_id for e in listed) == sorted(load.executions)
    ends = [e for e in logged if e["type"] in END_EVENTS]
    assert {e["type"] for e in ends} == {"execution.completed"}
    assert Counter(e["execution_id"] for e in ends) == Counter(e.execution_id for e in listed)


@pytest.mark.timeout(150)
def test_a_rolling_restart_fails_no_call_and_loses_no_event(cluster: Cluster) -> None:
    base, target = cluster.edge.http_url, cluster.target
    start = _prepare(target)
    stop, load = threading.Event(), Load()
    sdk_stream, sse_stream = Followed(), Followed()
    sdk_client = _follow_sdk(target, start, sdk_stream, stop)
    try:
        threading.Thread(target=_follow_sse, args=(base, start, sse_stream, stop), daemon=True).start()
        workers = [
            threading.Thread(target=_rest_worker, args=(base, load)),
            threading.Thread(target=_grpc_worker, args=(target, load)),
        ]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        try:
            _in_turn(cluster.servers, cluster.edge.admin_port, lambda: time.sleep(0.5))
        finally:
            load.done.set()
            for worker in workers:
                worker.join(60)

        assert load.failures == [], f"{len(load.failures)} of {sum(load.calls.values())} calls failed"
        assert len(load.executions) >= 10, load.calls  # the load did run across the restarts
        logged = _logged(target, start, len(load.executions))
        _each_ran_once(target, load, logged)
        # Both streams saw exactly the log, in order, across the restarts, each resuming at least once.
        deadline = time.monotonic() + 15
        while min(len(sdk_stream.events), len(sse_stream.events)) < len(logged) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        assert sdk_stream.errors == [] and sse_stream.errors == []
        assert sdk_stream.events == logged
        assert sse_stream.events == logged
        assert sdk_stream.connections >= 2 and sse_stream.connections >= 2
    finally:
        stop.set()
        load.done.set()
        sdk_client.close()


class _Unavailable(grpc.GenericRpcHandler):
    """A server that passes its health checks and answers every API call UNAVAILABLE, noting which."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if not method.startswith("/flowport.v1."):
            return None

        def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls.append((method, request))
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

        return grpc.unary_unary_rpc_method_handler(refuse)


@pytest.mark.timeout(90)
def test_envoy_retries_on_another_server_only_what_is_safe_to_repeat(tmp_path: Path) -> None:
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc

    fake = _Unavailable()
    bad = grpc.server(futures.ThreadPoolExecutor(4), handlers=[fake])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), bad)  # SERVING
    bad_port = bad.add_insecure_port("127.0.0.1:0")
    bad.start()
    good = ServeProcess(make_settings(tmp_path / "good", websocket_port=0, metrics_port=0))
    upstreams = f"127.0.0.1:{good.settings.grpc_port},127.0.0.1:{bad_port}"
    edge = make_settings(tmp_path / "edge", no_local_server=True, upstream=upstreams, websocket_port=0)
    envoy = EnvoyProcess(edge)
    try:
        good.start()
        envoy.start()
        _hosts_healthy(edge.admin_port, 2)
        _prepare(good.settings.grpc_target)
        rounds = 12
        with (
            httpx.Client(base_url=edge.http_url, headers=ADMIN_HEADERS, timeout=30) as http,
            Client(f"127.0.0.1:{edge.http_port}", api_key=ADMIN_KEY, retries=1, timeout=30) as client,
        ):
            for n in range(rounds):
                # Safe to repeat: a read, and creates carrying a request_id (REST and gRPC).
                assert http.get(f"/api/workflows/{WORKFLOW}").status_code == 200
                made = http.post("/api/executions", json={"workflow_id": WORKFLOW, "request_id": f"rest-{n}"})
                assert made.status_code == 200, made.text
                client.executions.CreateExecution(
                    execution_pb2.CreateExecutionRequest(workflow_id=WORKFLOW, request_id=f"grpc-{n}")
                )
            # Not safe: a create without a request_id fails where it reached the server that refused it.
            refused = sum(http.post("/api/sessions", json={}).status_code == 503 for _ in range(rounds))
        reached = Counter(method.rsplit("/", 1)[1] for method, _ in fake.calls)
        # Each of those reached the refusing server once and was not retried; the others were, elsewhere.
        assert refused == reached["CreateSession"]
        assert reached["CreateExecution"] > 0 and reached["GetWorkflow"] > 0, reached
        for method, body in fake.calls:
            if method.endswith("/CreateExecution"):
                assert execution_pb2.CreateExecutionRequest.FromString(body).request_id
    finally:
        envoy.stop()
        good.stop()
        bad.stop(None)
