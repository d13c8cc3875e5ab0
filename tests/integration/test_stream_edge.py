"""Streams through a real Envoy and server: SSE events carry `id:` lines
(heartbeats are `event: heartbeat`), a quiet stream answers at once, a
reconnect with Last-Event-ID resumes without gaps, and open streams end
with UNAUTHENTICATED when their API key is revoked or their JWT expires:
over SSE, NDJSON, gRPC through Envoy and gRPC straight to the server."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import jwt
import pytest

from flowport.clients import ApiError, Client
from flowport.v1 import event_pb2

from ..conftest import ADMIN_HEADERS, Stack, make_settings, start_up, stop_up
from ..gate import Gate

pytestmark = pytest.mark.integration

SECRET = "0123456789abcdef0123456789abcdef"
LEEWAY = 1.0
SSE = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The default heartbeat interval (15 s): quiet streams are quiet for longer than a client's read timeout.
    settings = make_settings(
        tmp_path_factory.mktemp("streams"), stream_heartbeat=15.0, jwt_secret=SECRET, jwt_leeway=LEEWAY
    )
    stack = start_up(settings)
    yield stack
    stop_up(stack)


@pytest.fixture
def admin(edge: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.http, timeout=30, headers=ADMIN_HEADERS) as client:
        yield client


def _sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events as an EventSource reads them: field name to value; comments skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    if fields:
        yield fields


def _sessions(admin: httpx.Client, count: int, tag: str) -> list[str]:
    made = []
    for _ in range(count):
        response = admin.post("/api/sessions", json={"user_id": tag})
        assert response.status_code == 200, response.text
        made.append(response.json()["session_id"])
    return made


def _user_key(admin: httpx.Client) -> tuple[str, str]:
    response = admin.post("/api/keys", json={"tenant": "default", "roles": ["user"]})
    assert response.status_code == 200, response.text
    body = response.json()
    return body["api_key"]["key_id"], body["key"]


def _latest_event_id(admin: httpx.Client) -> str:
    """A cursor after every event so far: the id of a session made now, read back from the log."""
    (marker,) = _sessions(admin, 1, "marker")
    params = {"after_id": "0", "types": "session.created"}
    with admin.stream("GET", "/events", params=params, headers=SSE, timeout=10) as response:
        for event in _sse(response.iter_lines()):
            if "id" in event and json.loads(event["data"])["session_id"] == marker:
                return event["id"]
    raise AssertionError("the stream ended")


def test_sse_events_carry_id_lines_and_heartbeats_their_own_type(admin: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    start = _latest_event_id(admin)
    created = _sessions(admin, 3, tag)
    seen: list[dict[str, str]] = []
    with admin.stream(
        "GET", "/events", params={"after_id": start, "types": "session.created"}, headers=SSE, timeout=10
    ) as response:
        assert response.status_code == 200
        for event in _sse(response.iter_lines()):
            seen.append(event)
            if sum("id" in e for e in seen) == 3:
                break
    heartbeat, *events = seen
    # First a heartbeat, named so that EventSource's onmessage never sees it, without an id (which would
    # reset the browser's Last-Event-ID).
    assert heartbeat["event"] == "heartbeat" and "id" not in heartbeat
    assert json.loads(heartbeat["data"])["type"] == "heartbeat"
    payloads = [json.loads(e["data"]) for e in events]
    assert [e["id"] for e in events] == [p["id"] for p in payloads], "each id: line is its event's id"
    assert [p["session_id"] for p in payloads] == created
    assert all("event" not in e for e in events), "events stay `message` events"


def test_watch_events_carry_id_lines(admin: httpx.Client) -> None:
    name = f"idlines_{uuid.uuid4().hex[:8]}"
    with Gate() as gate:
        # The run waits at the gate until its watch has begun.
        workflow = {"name": name, "nodes": [gate.node()]}
        assert admin.post("/api/workflows", json=workflow).status_code == 200
        started = admin.post("/api/executions", json={"workflow_id": name}).json()
        with admin.stream("GET", f"/api/executions/{started['execution_id']}:watch", headers=SSE) as response:
            updates = []
            for update in _sse(response.iter_lines()):
                updates.append(update)
                gate.release.set()
    first, *rest = updates
    assert "execution" in json.loads(first["data"]) and "id" not in first
    for update in rest:
        event = json.loads(update["data"]).get("event", {})
        if event.get("id"):
            assert update["id"] == event["id"]
        else:
            assert "id" not in update
    assert any("id" in u for u in rest), updates


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json"])
def test_a_quiet_stream_answers_at_once(edge: Stack, accept: str) -> None:
    # No event matches and the next heartbeat is 15 s away: a client with a 5 s read timeout still
    # gets the status line, the headers and a first heartbeat.
    with (
        httpx.Client(base_url=edge.http, headers=ADMIN_HEADERS, timeout=httpx.Timeout(10, read=5)) as client,
        client.stream("GET", "/events", params={"types": "nothing.ever"}, headers={"Accept": accept}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(accept)
        first = next(line for line in response.iter_lines() if line.strip())
    if accept == "text/event-stream":
        assert first == "event: heartbeat"
    else:
        assert json.loads(first)["type"] == "heartbeat"


def test_a_reconnect_with_last_event_id_resumes_without_gaps(admin: httpx.Client) -> None:
    tag = uuid.uuid4().hex
    start = _latest_event_id(admin)
    # The URL stays the same across reconnects, as an EventSource's does; its after_id is where the
    # first connection started.
    params = {"after_id": start, "types": "session.created"}
    first = _sessions(admin, 2, tag)
    seen: list[dict[str, str]] = []
    with admin.stream("GET", "/events", params=params, headers=SSE, timeout=10) as response:
        for event in _sse(response.iter_lines()):
            if "id" in event:
                seen.append(event)
            if len(seen) == 2:
                break
    missed = _sessions(admin, 3, tag)  # published while disconnected
    resumed: list[dict[str, str]] = []
    with admin.stream(
        "GET", "/events", params=params, headers={**SSE, "Last-Event-ID": seen[-1]["id"]}, timeout=10
    ) as response:
        for event in _sse(response.iter_lines()):
            if "id" in event:
                resumed.append(event)
            if len(resumed) == 3:
                break
    sessions = [json.loads(e["data"])["session_id"] for e in seen + resumed]
    assert sessions == first + missed, "everything once, in order"
    ids = [int(e["id"]) for e in seen + resumed]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


class _Reader(threading.Thread):
    """Reads one stream until it ends, in the background; what it got and how it ended."""

    def __init__(self, read: Any) -> None:
        super().__init__(daemon=True)
        self._read = read
        self.first = threading.Event()
        self.received: list[Any] = []
        self.error: BaseException | None = None
        self.ended_at: float | None = None  # wall-clock time

    def run(self) -> None:
        try:
            for item in self._read():
                self.received.append(item)
                self.first.set()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            self.error = error
        finally:
            self.ended_at = time.time()
            self.first.set()


def _rest_stream(edge: Stack, headers: dict[str, str], accept: str) -> _Reader:
    def read() -> Iterator[str]:
        with (
            httpx.Client(base_url=edge.http, headers=headers, timeout=httpx.Timeout(10, read=30)) as client,
            client.stream("GET", "/events", headers={"Accept": accept}) as response,
        ):
            assert response.status_code == 200, response.read()
            yield from (line for line in response.iter_lines() if line.strip())

    return _Reader(read)


def _grpc_stream(target: str, key: str) -> _Reader:
    def read() -> Iterator[event_pb2.Event]:
        with Client(target, api_key=key) as client:
            yield from client.events.StreamEvents(event_pb2.StreamEventsRequest(), timeout=60)

    return _Reader(read)


def _last_json(reader: _Reader) -> dict[str, Any]:
    last = reader.received[-1]
    return dict(json.loads(last.removeprefix("data: ")))


def _wait_ended(readers: list[_Reader], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))
        assert not reader.is_alive(), "the stream went on after its credential ended"


def test_revoking_a_key_ends_its_streams_on_every_transport(edge: Stack, admin: httpx.Client) -> None:
    key_id, key = _user_key(admin)
    headers = {"x-api-key": key}
    sse, ndjson = _rest_stream(edge, headers, "text/event-stream"), _rest_stream(edge, headers, "application/json")
    via_envoy, direct = _grpc_stream(edge.envoy_target, key), _grpc_stream(edge.grpc_target, key)
    readers = [sse, ndjson, via_envoy, direct]
    for reader in readers:
        reader.start()
    for reader in readers:
        assert reader.first.wait(10) and reader.error is None, reader.error
    response = admin.post(f"/api/keys/{key_id}:revoke")
    assert response.status_code == 200, response.text
    _wait_ended(readers)
    # Over HTTP/1.1 the end is a last `error` event (no trailers to carry a status), then the end of the body.
    for reader in (sse, ndjson):
        assert reader.error is None, reader.error
        last = _last_json(reader)
        assert last["type"] == "error", reader.received
        assert last["data"]["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert last["data"]["reason"] == "CREDENTIAL_REVOKED"
    for reader in (via_envoy, direct):
        assert isinstance(reader.error, grpc.RpcError), reader.error
        error = ApiError.from_rpc_error(reader.error)
        assert (error.code(), error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_REVOKED")
    # A reconnect is refused outright.
    again = httpx.get(f"{edge.http}/events", headers={**headers, **SSE}, timeout=10)
    assert again.status_code == 401


def test_a_jwt_stream_ends_once_exp_and_leeway_pass(edge: Stack) -> None:
    exp = time.time() + 5  # time for the stream to open first, on a slow machine
    token = jwt.encode({"sub": "ada", "tenant": "default", "exp": exp}, SECRET, algorithm="HS256")
    sse = _rest_stream(edge, {"authorization": f"Bearer {token}"}, "text/event-stream")
    sse.start()
    assert sse.first.wait(10) and sse.error is None, sse.error
    _wait_ended([sse], within=exp + LEEWAY - time.time() + 10)
    assert sse.ended_at is not None and sse.ended_at >= exp + LEEWAY, "not before exp + leeway"
    last = _last_json(sse)
    assert (last["type"], last["data"]["reason"]) == ("error", "CREDENTIAL_EXPIRED")
