"""Kailash's event names and parameters through a real Envoy and server: `GET /events` takes
`event_types` (comma-separated, repeated, or both) as well as `types`; Kailash names give copies of
flowport's events under them (a browser EventSource gets `workflow_progress` without asking);
webhooks registered with Kailash names fire, with unknown names refused, and a Content-Type header
accepted."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WANTED = {"session.created", "workflow.created"}


def _make_workflow_then_session(http: httpx.Client) -> tuple[str, str]:
    """A new workflow, a session made and deleted, then a session whose creation ends the stream read."""
    name = f"alias_{uuid.uuid4().hex[:8]}"
    code = {"type": "PythonCodeNode", "name": "a", "config": {"code": "result = 1"}}
    assert http.post("/api/workflows", json={"name": name, "nodes": [code]}).status_code == 200
    # A session.deleted in between: an event of a type the streams do not ask for.
    doomed = http.post("/api/sessions", json={"user_id": name}).json()["session_id"]
    assert http.delete(f"/api/sessions/{doomed}").status_code == 200
    response = http.post("/api/sessions", json={"user_id": name})
    assert response.status_code == 200, response.text
    return name, response.json()["session_id"]


def _events_until_session(http: httpx.Client, params: Any, session_id: str) -> list[dict[str, Any]]:
    """NDJSON events of /events?<params> from the start, up to the creation of `session_id` (within 20 s)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    with http.stream("GET", "/events", params=params, timeout=20) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"the stream never got there: {events[-5:]}"
            if line.strip():
                event = json.loads(line)
                if event.get("type") == "heartbeat":
                    continue
                events.append(event)
                if event.get("type") == "session.created" and event.get("session_id") == session_id:
                    return events
    raise AssertionError(f"the stream ended: {events[-5:]}")


@pytest.mark.parametrize(
    "params",
    [
        [("event_types", "session.created,workflow.created")],
        [("event_types", "session.created"), ("event_types", "workflow.created")],
        [("event_types", "session.created,workflow.*")],
        [("types", "session.created"), ("event_types", "workflow.created")],
    ],
    ids=["comma-separated", "repeated", "family", "with-types"],
)
def test_event_types_is_an_alias_of_types(http: httpx.Client, params: list[tuple[str, str]]) -> None:
    name, session_id = _make_workflow_then_session(http)
    events = _events_until_session(http, [("after_id", "0"), *params], session_id)
    # The stack is shared: earlier tests left events of every type in the log. `workflow.*`
    # asks for the whole family (workflow.deleted included), the other forms for two types.
    family = any(value.endswith("workflow.*") for _, value in params)
    unwanted = {e["type"] for e in events if e["type"] not in WANTED}
    assert all(kind.startswith("workflow.") for kind in unwanted) if family else not unwanted, unwanted
    assert any(e["type"] == "workflow.created" and name in json.dumps(e) for e in events)


def test_too_many_event_types_is_400_naming_the_parameter(http: httpx.Client) -> None:
    many = ",".join(f"t{i}.created" for i in range(51))
    response = http.get("/events", params={"event_types": many})
    assert response.status_code == 400, response.text
    body = response.json()
    assert "at most 50 types" in body["message"]
    assert "event_types" in json.dumps(body["details"])
    assert many not in response.text


def test_a_webhook_with_content_type_is_accepted_and_the_header_dropped(http: httpx.Client) -> None:
    # A loopback receiver that is not there (port 9, discard): nothing leaves this machine, and the
    # webhook is removed at once, so the shared stack does not deliver every later event to it.
    webhook = {"url": "http://127.0.0.1:9/hook", "headers": {"Content-Type": "text/plain", "X-Team": "a"}}
    response = http.post("/api/webhooks", json=webhook)
    assert response.status_code == 200, response.text
    assert set(response.json()["headers"]) == {"X-Team"}
    assert http.delete(f"/api/webhooks/{response.json()['webhook_id']}").status_code == 200


def _run_in_session(http: httpx.Client, session_id: str, nodes: int = 2) -> tuple[str, str]:
    """A workflow of `nodes` code nodes in a row, run to its end in `session_id`: (workflow id, execution id)."""
    name = f"alias_{uuid.uuid4().hex[:8]}"
    steps = [{"type": "PythonCodeNode", "name": f"n{i}", "config": {"code": "result = 1"}} for i in range(nodes)]
    links = [
        {"from_node": f"n{i}", "from_output": "result", "to_node": f"n{i + 1}", "to_input": "x"}
        for i in range(nodes - 1)
    ]
    assert http.post("/api/workflows", json={"name": name, "nodes": steps, "connections": links}).status_code == 200
    run = http.post("/api/executions", json={"workflow_id": name, "session_id": session_id, "wait": True})
    assert run.status_code == 200 and run.json()["state"] == "STATE_SUCCEEDED", run.text
    return name, str(run.json()["execution_id"])


def test_an_event_source_without_types_gets_kailash_progress_copies(http: httpx.Client) -> None:
    session_id = http.post("/api/sessions", json={"user_id": "progress"}).json()["session_id"]
    workflow_id, execution_id = _run_in_session(http, session_id)
    frames: list[dict[str, Any]] = []
    params = {"session_id": session_id, "after_id": "0"}
    with http.stream("GET", "/events", params=params, headers={"accept": "text/event-stream"}, timeout=20) as sse:
        assert sse.status_code == 200
        for line in sse.iter_lines():
            if line.startswith("data:"):
                frames.append(json.loads(line[5:]))
                if frames[-1]["type"] == "workflow_completed":
                    break
    progress = [f for f in frames if f["type"] == "workflow_progress"]
    # The seed's handler: data.type === 'workflow_progress' -> updateProgressBar(data.workflow_id, data.progress).
    assert [(f["workflow_id"], f["progress"]) for f in progress] == [(workflow_id, 50.0), (workflow_id, 100.0)]
    natives = [f for f in frames if f["type"] == "execution.progress"]
    assert [f["id"] for f in natives] == [f["id"] for f in progress]
    assert all("progress" not in f for f in natives)
    assert {f["execution_id"] for f in frames if not f["type"].startswith(("heartbeat", "session"))} == {execution_id}


def test_ndjson_without_types_gets_no_copies_and_kailash_names_get_only_copies(http: httpx.Client) -> None:
    session_id = http.post("/api/sessions", json={"user_id": "ndjson"}).json()["session_id"]
    _run_in_session(http, session_id, nodes=1)
    for params, expected in (
        ({}, "execution.completed"),
        ({"event_types": "workflow.completed"}, "workflow.completed"),
    ):
        seen: list[str] = []
        query = {"session_id": session_id, "after_id": "0", **params}
        with http.stream("GET", "/events", params=query, timeout=20) as stream:
            for line in stream.iter_lines():
                kind = json.loads(line)["type"] if line.strip() else "heartbeat"
                if kind != "heartbeat":
                    seen.append(kind)
                if kind == expected:
                    break
        copies = [kind for kind in seen if not kind.startswith(("execution.", "node.", "session."))]
        assert copies == ([] if not params else [expected]), seen


class _Receiver(BaseHTTPRequestHandler):
    bodies: queue.Queue[dict[str, Any]] = queue.Queue()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.bodies.put(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_a_webhook_with_kailash_names_fires_under_them(http: httpx.Client) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        session_id = http.post("/api/sessions", json={"user_id": "hooked"}).json()["session_id"]
        webhook = {
            "url": f"http://127.0.0.1:{receiver.server_port}/hook",
            "event_types": ["workflow.completed", "workflow.failed", "system.error"],
            "headers": {"Authorization": "Bearer your-webhook-token", "X-Source": "KailashSDK"},
            "secret": "webhook-signature-secret",
        }
        created = http.post("/api/webhooks", json=webhook)
        assert created.status_code == 200, created.text
        try:
            workflow_id, execution_id = _run_in_session(http, session_id, nodes=1)
            body = _Receiver.bodies.get(timeout=20)
            while body.get("execution_id") != execution_id:  # earlier tests' executions on the shared stack
                body = _Receiver.bodies.get(timeout=20)
            assert (body["type"], body["workflow_id"]) == ("workflow.completed", workflow_id)
        finally:
            http.delete(f"/api/webhooks/{created.json()['webhook_id']}")
    finally:
        receiver.shutdown()


def test_a_webhook_for_types_nothing_publishes_is_400_naming_the_entry(http: httpx.Client) -> None:
    webhook = {"url": "https://example.com/hook", "event_types": ["workflow.completed", "workflow.finished"]}
    response = http.post("/api/webhooks", json=webhook)
    assert response.status_code == 400, response.text
    assert "[1] 'workflow.finished'" in response.text and "[0]" not in response.text
